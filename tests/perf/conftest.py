"""`tests/perf/` holds the benchmark (run as a script, see docs/benchmarks.md), not tests: collect nothing."""

collect_ignore_glob = ["*"]
