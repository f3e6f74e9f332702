"""Ledger sink benchmark: priced events/s from Kafka into ClickHouse (rows visible), as a
ratio to a bare confluent-kafka consume of the same messages in the same run.

    .venv/bin/python -m bench.sink [--events 200000] [--batch-rows 50000] [--formats v1,v2]

Per wire format of `priced` (v1 JSON, priced.v2 RowBinary: the same events), in the same run:
1. Produce N synthetic priced events (sql/synth.py) to fresh topics under a random prefix.
2. Baseline: a bare confluent-kafka consumer reads all N (consume() in batches, no work).
3. Sink: LedgerSink (staging, the contract's checks, duplicate-id check, insert into embedded chDB
   with the rollup views, commit) from a fresh group into a fresh database; the clock stops when
   N rows are inserted, and the ledger count is checked afterwards. CPU seconds of this process
   (process_time: librdkafka's and chDB's threads included) per row are reported beside the rate.

Results go to bench/results/sink.md. Needs Kafka (METERLINE_KAFKA_BOOTSTRAP, default 127.0.0.1:9092).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer

from meterline.schemas.events import PricedEvent, decode
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.sink import LedgerSink
from meterline.sql.synth import priced_events
from meterline.streams.codec import encode_priced_v2
from meterline.topics import catalog_by_name, create_topics

from .common import BARE_CONSUMER

RESULTS = Path(__file__).resolve().parent / "results" / "sink.md"


def produce(settings: Settings, records: list[bytes]) -> None:
    producer = Producer(settings.kafka_config(**{"linger.ms": 50, "batch.size": 1_000_000, "enable.idempotence": True}))
    topic, partitions = settings.topic("priced"), catalog_by_name()["priced"].partitions
    for i, value in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


def bare_consume(settings: Settings, n: int) -> float:
    consumer = Consumer(settings.kafka_config(**{"group.id": f"bare-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
                                                 "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024, **BARE_CONSUMER}))
    consumer.subscribe([settings.topic("priced")])
    seen, start = 0, time.perf_counter()
    while seen < n:
        seen += sum(1 for m in consumer.consume(min(10_000, n - seen), 0.2) if not m.error())  # a batch it cannot fill waits 0.2 s
    elapsed = time.perf_counter() - start
    consumer.close()
    return elapsed


def sink_run(settings: Settings, n: int, batch_rows: int, database: str) -> tuple[float, int, dict, float]:
    client = ledger.connect(settings, database=database)
    ledger.migrate(client)
    sink = LedgerSink(settings, client=client, group=f"sink-{uuid.uuid4().hex[:8]}", batch_rows=batch_rows,
                      consumer_overrides={"topic.metadata.refresh.interval.ms": 1000})
    sink.tables = {settings.topic("priced"): sink.tables[settings.topic("priced")]}  # only the loaded topic
    stop = threading.Event()
    start, cpu0 = time.perf_counter(), time.process_time()
    worker = threading.Thread(target=sink.run, args=(stop,))
    worker.start()
    while sink.stats["rows"] < n and worker.is_alive():
        time.sleep(0.01)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    stop.set()
    worker.join()
    stored = client.query("SELECT count() FROM priced_events").result_rows[0][0]
    return elapsed, stored, dict(sink.stats), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-rows", type=int, default=50_000)
    parser.add_argument("--formats", default="v1,v2", help="wire formats of priced to run, in this order (v1, v2)")
    args = parser.parse_args()
    bootstrap = os.environ.get("METERLINE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    data = Path(tempfile.mkdtemp(prefix="bench-sink-"))
    records, _ = priced_events(args.events, seed=1)
    rows, failures = [], []
    for fmt in args.formats.split(","):
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:8]}", data_dir=data,
                            clickhouse_dsn=f"chdb://{data / 'clickhouse'}")
        create_topics(settings)
        values = records if fmt == "v1" else [encode_priced_v2(decode(PricedEvent, r)) for r in records]
        produce(settings, values)
        bare_s = bare_consume(settings, args.events)
        sink_s, stored, stats, cpu = sink_run(settings, args.events, args.batch_rows, f"bench_{fmt}")
        bare_rate, sink_rate = args.events / bare_s, args.events / sink_s
        rows.append(f"| {fmt} | {sum(map(len, values)) / len(values):.0f} B | {bare_rate:,.0f} | {sink_rate:,.0f} | "
                    f"**{sink_rate / bare_rate:.2f}** | {cpu / args.events * 1e6:.2f} µs | {stored} ({stats['flushes']} flushes) |")
        if stored != args.events:
            failures.append(f"{fmt}: ledger holds {stored} rows, expected {args.events}")
    section = f"""## Ledger sink: Kafka → ClickHouse (rows visible)

`.venv/bin/python -m bench.sink --events {args.events} --batch-rows {args.batch_rows} --formats {args.formats}` on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, embedded chDB, local Kafka (12 partitions); load average {os.getloadavg()[0]:.1f} at the end.

| priced format | record | bare consume events/s | sink rows/s (rollup views, duplicate-id check) | ratio | sink CPU per row | rows stored |
|---|---:|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(section)
    print(section)
    if failures:
        raise SystemExit("; ".join(failures))


if __name__ == "__main__":
    main()
