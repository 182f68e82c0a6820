"""Stand-in for ``xprof.cli.tools``: importable, refuses to profile (see ../__init__.py)."""


class _KernelStatsStub:

  @staticmethod
  def compute_kernel_stats(*args, **kwargs):
    raise RuntimeError("xprof is not installed: this is attnax's benchmark stand-in")


get_kernel_stats_tool = _KernelStatsStub()
