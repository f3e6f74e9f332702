"""CPU µs per event of the worker's in-process stages, without Kafka: a same-run A/B harness (issue 17).

    .venv/bin/python -m bench.worker_stages [--events 100000] [--sessions 10000] [--repeat 5] [--code DIR]

The bench's usage events (bench.pipeline.make_events) are decoded and priced once; then each stage runs over
all of them, fresh state each run, timed with `time.process_time()` (min of the repeats; the stages are
bench.common.worker_stages, which bench.compiled times too):
- detectors: `Detectors.usage` per event (what the worker calls), with the worker's integer second;
- priced_v2: `PricedV2Writer.write` per event (a fresh writer: its string cache fills as in a worker);
- price: `Catalog.price_pico`; spend: `SpendBook.add_many` per 5,000-row batch (the worker's rows);
- with --stages, also decode (`decode_usage`: decode + validate), digest (`usage_digest`, the dedupe's) and chdb_parse
  (chDB parsing all the values as JSONEachRow into typed columns, no checks: what a columnar core's decode would cost at least).
`--code DIR` also loads DIR/streams (e.g. a `git worktree` of the branch point) as a second package: each repeat
runs after, then before, in this one process, so both see the same load; the ratio is of the minima.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .common import STAGES, cpu_us_per_event, parser as make_parser, worker_stages
from .pipeline import make_events

# chdb_parse's columns: UsageEvent's fields as the bench's events carry them (no checks: a lower bound)
USAGE_COLUMNS = ("event_id UUID, ts DateTime64(6), tenant_id String, team String, project String, agent_id String, session_id String, "
                 "kind LowCardinality(String), provider LowCardinality(String), model LowCardinality(String), input_tokens UInt64, "
                 "output_tokens UInt64, cache_read_tokens UInt64, latency_ms UInt64, tool String")


def chdb_parse(values: list[bytes]):
    """Not a worker stage: every value parsed by chDB in one query and read back as one Arrow table (fewer calls
    than a worker's batches would make, and no checks), what a columnar core's decode would cost at least."""
    def run() -> None:
        import tempfile

        import chdb.session

        with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
            f.write(b"\n".join(values))
            f.flush()
            chdb.session.Session().query(f"SELECT * FROM file('{f.name}', JSONEachRow, '{USAGE_COLUMNS}')", "Arrow")
    return run


def _package(directory: str | None) -> str:
    """The name to import streams modules from: this checkout's, or DIR/streams loaded as a second package."""
    if directory is None:
        return "meterline.streams"
    root = Path(directory) / "streams"
    spec = importlib.util.spec_from_file_location("streams_before", root / "__init__.py", submodule_search_locations=[str(root)])
    sys.modules["streams_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["streams_before"])
    return "streams_before"


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--code", metavar="DIR", help="also measure DIR/streams (a baseline), alternated with this tree's")
    parser.add_argument("--stages", default="detectors,priced_v2,price,spend", help=f"of {', '.join(STAGES)}, chdb_parse")
    args = parser.parse_args(argv)
    values = [value for _, value in make_events(args.events, args.sessions, seed=3)]
    after = worker_stages("meterline.streams", values) | {"chdb_parse": chdb_parse(values)}
    before = worker_stages(_package(args.code), values) | {"chdb_parse": chdb_parse(values)} if args.code else None
    print(f"load average {os.getloadavg()[0]:.2f}; {args.events:,} events, {args.sessions:,} sessions; min of {args.repeat}")
    for name in args.stages.split(","):
        runs: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(args.repeat):  # alternated, in turn first, so both see the same load and the same order
            for label in (("after", "before") if i % 2 else ("before", "after")):
                if label == "after" or before:
                    runs[label].append(cpu_us_per_event((after if label == "after" else before)[name], args.events))
        line = f"{name}: after {min(runs['after']):.2f} µs ({' '.join(f'{r:.2f}' for r in runs['after'])})"
        if before:
            line += (f"; before {min(runs['before']):.2f} µs ({' '.join(f'{r:.2f}' for r in runs['before'])}); "
                     f"after/before {min(runs['after']) / min(runs['before']):.3f}")
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
