"""Run every benchmark against the broker in METERLINE_KAFKA_BOOTSTRAP (default: the local one).

Each writes its markdown section to bench/results/<name>.md; BENCHMARKS.md summarises them.
Usage: python -m bench [sdk pipeline sink profile allocator otlp]
"""
import runpy
import sys

ALL = ("sdk", "pipeline", "sink", "profile", "allocator", "otlp")

for name in sys.argv[1:] or ALL:
    if name not in ALL:
        sys.exit(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}")
    print(f"== bench.{name}", flush=True)
    sys.argv = [f"bench.{name}"]
    runpy.run_module(f"bench.{name}", run_name="__main__")
