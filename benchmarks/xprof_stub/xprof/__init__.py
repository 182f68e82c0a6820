"""Stand-in for the ``xprof`` package (benchmarks only; see benchmarks/README.md).

tokamax imports ``xprof.cli.tools.get_kernel_stats_tool`` for its own profiling helpers; the
attnax benchmark never calls them, so this stub only has to make the import succeed.
"""
