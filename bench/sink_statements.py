"""Where the sink's CPU goes, per SQL statement: in process, no broker read (issue 17, session 8).

    .venv/bin/python -m bench.sink_statements [--events 100000] [--batch-rows 50000] [--repeat 2] [--code DIR]

N synthetic priced.v2 records (sql/synth.py) are handed to `LedgerSink._take_many` as `run()` does (10,000 per
consume), flushed every `--batch-rows` into a fresh migrated database of one embedded chDB. Every client call is
timed (`time.process_time()`: chDB's threads count); per statement: CPU µs per row, wall µs per row, calls. The
rest of the total is Python (intake, batching, the bodies). chDB keeps no system.query_log, hence the wrapper.
`--code DIR` loads the sink package (sql/) from another checkout's DIR/sql, for an A/B in the same conditions
(`git archive <commit> sql | tar -x -C DIR`).
"""
from __future__ import annotations

import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from .common import code_option, load_code, parser as make_parser


def timed(client, stats: dict) -> None:
    for name in ("command", "query", "raw_insert", "insert"):
        original = getattr(client, name)

        def call(sql, *args, _original=original, _name=name, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return _original(sql, *args, **kwargs)
            finally:
                s = stats[f"{_name}: {re.sub(r'[ ]+', ' ', str(sql))[:60]}"]
                s[0] += 1
                s[1] += time.process_time() - cpu
                s[2] += time.perf_counter() - wall
        setattr(client, name, call)


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=2)
    code_option(parser, "sql")
    args = parser.parse_args()
    load_code("sql", args.code)
    from meterline.schemas.events import PricedEvent, decode
    from meterline.settings import Settings
    from meterline.sql import ledger
    from meterline.sql.sink import LedgerSink
    from meterline.sql.synth import priced_events
    from meterline.streams.codec import encode_priced_v2

    from .profile import Msg

    n = args.events
    values = [encode_priced_v2(decode(PricedEvent, r)) for r in priced_events(n, seed=1)[0]]
    data = Path(tempfile.mkdtemp(prefix="bench-sink-statements-"))
    runs, stats = [], {}
    for rep in range(args.repeat):
        settings = Settings(topic_prefix="stm", data_dir=data, clickhouse_dsn=f"chdb://{data / 'ch'}")
        topic = settings.topic("priced")
        msgs = [Msg(topic, i % 12, i // 12, None, v) for i, v in enumerate(values)]
        client = ledger.connect(settings, database=f"r{rep}")
        ledger.migrate(client)
        sink = LedgerSink(settings, client=client, group="stm", batch_rows=args.batch_rows)
        sink.tables = {topic: sink.tables[topic]}
        stats = collections.defaultdict(lambda: [0, 0.0, 0.0])
        timed(client, stats)
        cpu0 = time.process_time()
        for i in range(0, n, 10_000):
            sink._take_many(msgs[i:i + 10_000])
            if sink.batch.rows >= args.batch_rows:
                sink.flush()
        sink.flush()
        runs.append((time.process_time() - cpu0) / n * 1e6)
        sink.consumer.close()
        assert client.query(f"SELECT count() FROM r{rep}.priced_events").result_rows[0][0] == n
    import meterline.sql.sink as code
    print(f"code: {code.__file__}; load average {os.getloadavg()[0]:.1f}; {n:,} rows, batches of {args.batch_rows:,}")
    print(f"sink CPU µs/row per run: {', '.join(f'{r:.2f}' for r in runs)} (min {min(runs):.2f}); statements of the last run:")
    total = 0.0
    for key, (calls, cpu, wall) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        total += cpu
        if cpu / n * 1e6 >= 0.02:
            print(f"  {cpu / n * 1e6:6.2f} CPU µs/row {wall / n * 1e6:6.2f} wall  x{calls}  {key}")
    print(f"  statements {total / n * 1e6:.2f} of {runs[-1]:.2f} µs/row; the rest is Python (intake, bodies)")


if __name__ == "__main__":
    sys.exit(main())
