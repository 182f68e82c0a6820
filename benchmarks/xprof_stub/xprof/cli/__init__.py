"""Stand-in: see xprof_stub/xprof/__init__.py."""
