"""CPU µs per event of the worker's in-process stages, without Kafka: a same-run A/B harness (issue 17).

    .venv/bin/python -m bench.worker_stages [--events 100000] [--sessions 10000] [--repeat 5] [--code DIR]

The bench's usage events (bench.pipeline.make_events) are decoded and priced once; then each stage runs over
all of them, fresh state each run, timed with `time.process_time()` (min of the repeats):
- detectors: `Detectors.usage` per event (what the worker calls), with the worker's integer second;
- priced.v2: `PricedV2Writer.write` per event (a fresh writer: its string cache fills as in a worker);
- price: `Catalog.price_pico`; spend: `SpendBook.add_many` per 5,000-row batch (the worker's rows).
`--code DIR` also loads DIR/streams (e.g. a `git worktree` of the branch point) as a second package: each repeat
runs after, then before, in this one process, so both see the same load; the ratio is of the minima.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from .common import parser as make_parser
from .pipeline import make_events


def _package(directory: str | None) -> str:
    """The name to import streams modules from: this checkout's, or DIR/streams loaded as a second package."""
    if directory is None:
        return "meterline.streams"
    root = Path(directory) / "streams"
    spec = importlib.util.spec_from_file_location("streams_before", root / "__init__.py", submodule_search_locations=[str(root)])
    sys.modules["streams_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["streams_before"])
    return "streams_before"


def _stages(package: str, n: int, sessions: int) -> dict:
    """Each stage as a function that runs it once over the bench's events, with fresh state (this package's code)."""
    mod = {name: importlib.import_module(f"{package}.{name}") for name in ("anomalies", "codec", "pricing", "spend", "state_store")}
    catalog, now = mod["pricing"].load_catalog(), datetime.now(UTC)
    events = [mod["codec"].decode_usage(value) for _, value in make_events(n, sessions, seed=3)]
    rows = []
    for e in events:
        listed = catalog.price_pico(e)
        second = mod["anomalies"].second_of(e.ts)  # the integer second the worker hands the detectors
        rows.append((e, listed[4] if listed else 0, listed or (0,) * 5, second, listed is None))

    def detectors() -> None:
        usage = mod["anomalies"].Detectors().usage
        for e, cost, _, second, unpriced in rows:
            usage(e, cost, unpriced, second)

    def priced_v2() -> None:
        write = mod["codec"].PricedV2Writer().write
        for e, cost, parts, _, unpriced in rows:
            write(e, cost, parts, "unpriced" if unpriced else "catalog", catalog.version, now)

    def price() -> None:
        price_pico = catalog.price_pico
        for e in events:
            price_pico(e)

    batch = [((e.tenant_id, e.team, e.project, e.agent_id, e.session_id), second // 60, cost, e.input_tokens,
              e.output_tokens, unpriced) for e, cost, _, second, unpriced in rows]

    def spend() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            book = mod["spend"].SpendBook(mod["state_store"].StateStore(Path(tmp) / "s.sqlite3", 16))
            for i in range(0, len(batch), 5000):
                book.add_many(batch[i:i + 5000])

    return {"detectors": detectors, "priced_v2": priced_v2, "price": price, "spend": spend}


def _timed(fn, n: int) -> float:
    """µs per event of one run of fn(), garbage collected first."""
    gc.collect()
    c0 = time.process_time()
    fn()
    return (time.process_time() - c0) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--code", help="a checkout whose streams/ is measured instead of this one's")
    parser.add_argument("--stages", default="detectors,priced_v2,price,spend")
    args = parser.parse_args(argv)
    after = _stages("meterline.streams", args.events, args.sessions)
    before = _stages(_package(args.code), args.events, args.sessions) if args.code else None
    print(f"load average {os.getloadavg()[0]:.2f}; {args.events:,} events, {args.sessions:,} sessions; min of {args.repeat}")
    for name in args.stages.split(","):
        runs: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(args.repeat):  # alternated, in turn first, so both see the same load and the same order
            for label in (("after", "before") if i % 2 else ("before", "after")):
                if label == "after" or before:
                    runs[label].append(_timed((after if label == "after" else before)[name], args.events))
        line = f"{name}: after {min(runs['after']):.2f} µs ({' '.join(f'{r:.2f}' for r in runs['after'])})"
        if before:
            line += (f"; before {min(runs['before']):.2f} µs ({' '.join(f'{r:.2f}' for r in runs['before'])}); "
                     f"after/before {min(runs['after']) / min(runs['before']):.3f}")
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
