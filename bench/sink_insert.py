"""The sink's ledger insert with its rollup fed three ways, alternated in one process (issue 17, session 9).

    .venv/bin/python -m bench.sink_insert [--events 50000] [--repeat 6]

One batch of synthetic priced.v2 rows (sql/synth.py) is staged and checked as the sink does, then inserted with
the sink's own statement (dedupe predicate, LIMIT 1 BY) into two fresh ledgers of one embedded chDB, each round:
  A  today: the insert fires the ids view and usage_hourly_mv;
  B  A with optimize_on_insert=0 (what the sink runs);
  C  a ledger without usage_hourly_mv: the rollup as one INSERT … SELECT … GROUP BY over the rows the insert adds
     (its own predicate), then the insert.
CPU µs per row (`process_time`, chDB's threads count); every round checks C's rollup against its ledger.
"""
from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from meterline.schemas.events import PricedEvent, decode
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.sink import LedgerSink
from meterline.sql.writer import UNIQUE_ROWS
from meterline.sql.synth import priced_events
from meterline.streams.codec import encode_priced_v2

from .common import parser as make_parser
from .fake_kafka import Message


def ledger_without_rollup_view(client, database: str) -> None:
    """The migrations into `database`, names qualified, minus usage_hourly_mv."""
    client.command(f"CREATE DATABASE {database}")
    for migration in ledger.load_migrations():
        for statement in migration.statements():
            if "usage_hourly_mv" in statement:
                continue
            statement = re.sub(r"(CREATE (?:TABLE|MATERIALIZED VIEW|VIEW) IF NOT EXISTS |ALTER TABLE |\bTO |FROM )(\w+)",
                               rf"\1{database}.\2", statement)
            try:
                client.command(statement)
            except Exception:  # noqa: BLE001 - a statement the qualifying cannot express (parameterized views)
                pass


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    n, data = args.events, Path(tempfile.mkdtemp(prefix="bench-sink-insert-"))
    settings = Settings(topic_prefix="sin", data_dir=data, clickhouse_dsn=f"chdb://{data / 'ch'}")
    client = ledger.connect(settings, database="a")
    ledger.migrate(client)
    ledger_without_rollup_view(client, "c")
    sink = LedgerSink(settings, client=client, group="sin", batch_rows=10**9)
    topic = settings.topic("priced")
    sink.tables = {topic: sink.tables[topic]}
    records = priced_events(n, seed=1)[0]
    sink._take_many([Message(topic, i % 12, i // 12, None, encode_priced_v2(decode(PricedEvent, r)))
                     for i, r in enumerate(records)])
    staged, rows = sink.writer.staged("priced_events"), sink.batch.tables["priced_events"]
    sink.writer.load(staged, rows, sink.batch.nonce)
    _, lo, hi = client.query(staged.accepted_range()).result_rows[0]
    bounds = tuple(f"toDateTime64('{t:%Y-%m-%d %H:%M:%S.%f}', 3, 'UTC')" for t in (lo, hi))
    insert = {db: staged.insert(f"{db}.priced_events", ("event_id", f"{db}.priced_event_ids", *bounds)) for db in "ac"}
    view = client.query("SELECT as_select FROM system.tables WHERE database = 'a' AND name = 'usage_hourly_mv'").result_rows[0][0]
    added = "(SELECT " + ", ".join(f"v_{f.name} AS {f.name}" for f in staged.fields) + f" FROM {staged.typed} WHERE " + \
        insert["c"].split(" WHERE ", 1)[1] + ")"
    rollup = "INSERT INTO c.usage_hourly " + re.sub(r"FROM \S*priced_events", lambda _: "FROM " + added, view)
    off = UNIQUE_ROWS  # what the sink runs an id table's insert with
    variants = {"A today (2 views)": [(insert["a"], {})], "B A + optimize_on_insert=0": [(insert["a"], off)],
                "C rollup statement, then insert": [(rollup, off), (insert["c"], off)]}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, statements in variants.items():
            for db in "ac":
                for table in ("priced_events", "priced_event_ids", "usage_hourly"):
                    client.command(f"TRUNCATE TABLE {db}.{table}")
            start = time.process_time()
            for sql, options in statements:
                client.command(sql, settings=options)
            cpu[name].append((time.process_time() - start) / n * 1e6)
        sums = [client.query(q).result_rows[0] for q in ("SELECT sum(events), toString(sum(cost_usd)) FROM c.usage_hourly",
                                                         "SELECT count(), toString(sum(cost_usd)) FROM c.priced_events")]
        assert sums[0] == sums[1] and sums[1][0] == n, sums
    sink.consumer.close()
    print(f"load average {os.getloadavg()[0]:.1f}; {n:,} rows; CPU µs/row")
    for name, values in cpu.items():
        print(f"  {name}: median {statistics.median(values):.2f}; all {' '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
