"""Spend-state restore: seconds to rebuild a worker's state store from an N-scope changelog (issue 17).

    .venv/bin/python -m bench.restore [--scopes 1000000] [--repeat 3] [--code DIR]

N changelog records in the worker's own form (one SpendUpdate per session scope, as publish_spend writes them),
already in memory, are handed to `StateStore.load` (decode, validate, write to SQLite): the CPU part of a
restore, without the broker. `--code DIR` loads the streams package from another checkout's DIR/streams, for a
before/after in the same conditions (`git archive <commit> streams | tar -x -C DIR`).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from .common import code_option, load_code, parser as make_parser

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


def changelog(scopes: int) -> list[tuple[bytes, bytes, int, int]]:
    """One record per session scope, from a SpendBook's own drain (its form, its key)."""
    from meterline.streams.codec import encode
    from meterline.streams.spend import SpendBook

    book, records = SpendBook(), []
    book.add(("acme", "", "", "bot", "s0"), NOW, 1_234_567, 10, 2, gpu_ps=5 * 10**12, gpu_cost=7, cpu_ps=3)
    (key, update), = [(k, u) for k, u in book.drain(NOW) if k[1] == "session"]
    body = encode(update).decode()
    for i in range(scopes):
        sid = f"acme////s{i}"
        records.append((f"acme\x1fsession\x1f{sid}".encode(), body.replace(key[2], sid).encode(), i % 6, i // 6))
    return records


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--scopes", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    code_option(parser, "streams")
    args = parser.parse_args()
    load_code("streams", args.code)
    from meterline.streams import spend
    from meterline.streams.state_store import StateStore

    minute_key = getattr(spend, "minute_key", None) or spend._minute_key  # private before session 9
    records, month = changelog(args.scopes), spend.month_of(minute_key(NOW))[2]
    for _ in range(args.repeat):
        store = StateStore()
        start, cpu = time.perf_counter(), time.process_time()
        damaged, missing = store.load(records, month)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert not damaged and not missing and len(store) == args.scopes, (damaged[:1], len(store))
        print(f"{args.code or 'this tree'}: {args.scopes} scopes restored in {wall:.2f} s wall, {cpu:.2f} s CPU "
              f"({wall / args.scopes * 1e6:.2f} µs/scope)", flush=True)
        store.close()


if __name__ == "__main__":
    main()
