"""The ledger sink: Kafka → ClickHouse, every row exactly once, no external dedupe store.

Flush order (the whole contract, tested in tests/test_sql_sink.py):

1. decode each record; a bad one becomes a DeadLetter (reason + original bytes), the rest go on;
2. drop duplicate ids (priced events, GPU samples): repeats within the batch and ids the ledger
   already holds for the batch's time range;
3. produce the dead letters and wait for the broker's ack;
4. insert the rows, each with its Kafka (topic, partition, offset): one insert per table and
   month partition, retried with exponential backoff while ClickHouse is unavailable;
5. commit the offsets to Kafka (a hint for tools; the sink itself never reads it).

On partition assignment the sink asks the ledger, not Kafka, where to resume: after the
highest stored offset of each partition. Because a crash can split a batch that spans
months (one insert per month partition), it re-reads the last batch of each partition
(`_batch_start`) and skips the offsets the ledger already has. A crash anywhere therefore
neither loses nor doubles a row. Dead letters are at-least-once: a record that failed after
the last stored row may be dead-lettered again after a crash.

The parts, as quix-streams keeps them apart: this module is the sink (the consumer loop, intake of
records into a batch, the flush's order, retries, dead letters to Kafka); sql/writer.py makes a
batch into inserts (staged in ClickHouse, checked, settled by the contract, de-duplicated by id);
sql/batching.py decides when a batch is flushed and runs the one insert in flight;
sql/checkpoint.py owns the consumer's side (resume points from the ledger on assignment, what
each offset read means, lag, commit).
"""
from __future__ import annotations

import logging
import signal
import struct
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from meterline.allocator.budgets import CHANGED_BY
from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.topics import CATALOG

from . import ledger
from .batching import Batch, FlushPolicy, InFlight, idle_exit_due
from .checkpoint import Checkpoint, Seen, resume_points
from .rows import budget_policy_row, compute_sample_row, contract_row, gpu_sample_row
from .writer import STAGED_TABLES, LedgerWriter, dead_letter, json_line

log = logging.getLogger("meterline.sink")

# A tombstone there deletes its key's latest value (the allocator retires expired decisions): nothing to store.
COMPACTED = frozenset(spec.name for spec in CATALOG if spec.config.get("cleanup.policy") == "compact")
V2 = ev.PRICED_V2_MAGIC
# What the sink appends to a priced.v2 row (sql/checks.py BINARY_KAFKA_COLUMNS): partition, offset, batch start, nonce.
BINARY_TAIL = struct.Struct("<IQQQ").pack


def month_of(ts: datetime) -> int:
    ts = ts.astimezone(timezone.utc)
    return ts.year * 100 + ts.month


class Revoked(Exception):
    """Partitions were taken away mid-flush: drop what is not inserted; the new owner redoes it."""


class LedgerSink:
    def __init__(
        self,
        settings: Settings,
        *,
        client=None,
        group: str | None = None,
        batch_rows: int = 50_000,
        batch_seconds: float = 1.0,
        max_backoff_s: float = 30.0,
        catalog=None,
        consumer_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client if client is not None else ledger.connect(settings)
        self.cluster = settings.clickhouse_cluster
        self.tables = {settings.topic(t.topic): t for t in ledger.TABLES}
        self.policy, self.max_backoff_s = FlushPolicy(batch_rows, batch_seconds), max_backoff_s
        self._last_activity = time.monotonic()  # a record taken or partitions assigned (for idle_exit_s)
        self._catalog = catalog
        self.consumer = Consumer(settings.kafka_config(**{
            "group.id": group or settings.group("sink"),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
            "max.poll.interval.ms": 600_000,
            **(consumer_overrides or {}),
        }))
        self.producer = Producer(settings.kafka_config(**{"enable.idempotence": True, "linger.ms": 20}))
        self.dlq_topic = settings.topic("dlq")
        self.batch = Batch()
        self.checkpoint = Checkpoint()
        self.flushing = False
        self.revoked_mid_flush = False
        self.stop = threading.Event()
        self.inflight = InFlight()
        self._staged_cache: tuple[dict, dict[str, tuple[str, bytes, bool]]] = ({}, {})
        self._consuming_thread = threading.get_ident()  # the one thread that calls the consumer (run() resets it)
        self.anomalies_topic = settings.topic("anomalies")
        self.stats = {"rows": 0, "duplicates": 0, "conflicting_duplicates": 0, "dead_letters": 0, "flushes": 0, "retries": 0,
                      "tombstones": 0, "ledger_check_rejections": 0}
        self.writer = LedgerWriter(self.client, {t.name: settings.topic(t.topic) for t in ledger.TABLES}, self.cluster, self.stats)

    # ------------------------------------------------------------------ lifecycle

    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None) -> None:
        """Consume until `stop` is set (or, with idle_exit_s, until nothing arrived that long since the last
        record or the last assignment and every assigned partition is read to its end: joining the group,
        or a first fetch, may take longer than idle_exit_s on a busy machine)."""
        stop = self.stop = stop or threading.Event()
        self._consuming_thread = threading.get_ident()
        self.consumer.subscribe(list(self.tables), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        self._last_activity = time.monotonic()
        try:
            while not stop.is_set():
                messages = self.consumer.consume(num_messages=10_000, timeout=0.2)
                self._reap_inflight()
                self._take_many(messages)
                if messages:
                    self._last_activity = time.monotonic()
                if self.policy.due(self.batch, time.monotonic()):
                    self.flush(wait=False)
                if idle_exit_due(idle_exit_s, bool(messages), self._last_activity, time.monotonic(),
                                 lambda: self.checkpoint.drained(self.consumer)):
                    break
            self.flush()
        finally:
            self.inflight.abandon()
            self.consumer.close()
            self.producer.flush(10)

    # ------------------------------------------------------------------ assignment

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Resume every partition from the ledger: re-read its last batch, skip what is stored."""
        topics = {tp.topic for tp in partitions}
        resume = self._retry(lambda: resume_points(self.client, self.tables, self.cluster, topics), "read resume offsets")
        self.checkpoint.assign(partitions, resume)
        consumer.assign(partitions)
        # librdkafka keeps a partition's pause across revoke and re-assignment: one paused by an insert in
        # flight (_join_inflight) and then revoked would stay paused for good (the freeze of issue 10).
        consumer.resume(partitions)
        self._last_activity = time.monotonic()
        log.info("assigned %d partitions; resuming from the ledger", len(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.inflight.busy:
            self.revoked_mid_flush = True  # a retrying insert gives up; one under way completes first
            self.inflight.abandon()
        try:
            self.flush(retry=False)
        except Exception as err:  # noqa: BLE001 - safe to drop: the next owner resumes from the ledger
            log.warning("could not flush on revoke (%s); the next owner will re-read from the ledger", err)
        self.batch = Batch()
        self.checkpoint.revoke(partitions)

    # ------------------------------------------------------------------ intake

    def _take(self, msg: Message) -> None:
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", msg.error())
            return
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        key = (topic, partition)
        seen = self.checkpoint.classify(key, offset)
        if seen is Seen.TAKEN:
            return
        if seen is Seen.STORED:
            self._advance(key, offset)
            return
        already_dead = seen is Seen.REDELIVERED
        batch = self.batch
        if already_dead:
            batch.redelivered.add((topic, partition, offset))
        start = batch.start.setdefault(key, offset)
        self._advance(key, offset)
        table = self.tables[topic]
        try:
            self._add_row(batch, table, msg, start, already_dead)
        except Exception as err:  # noqa: BLE001 - one bad record never stops the sink: it is dead-lettered
            if not already_dead:
                reason = err.reason if isinstance(err, ev.InvalidEvent) else f"could not make a ledger row: {err!r}"
                batch.dead.append(dead_letter(msg, reason, type(err).__name__))

    def _take_many(self, messages: list[Message]) -> None:
        """`_take` for a consumed batch, with the common case inline (a new record of a staged table: append its
        line with the Kafka columns): ~1 µs instead of ~8 per record. Anything else goes through `_take`."""
        batch, checkpoint, staged = self.batch, self.checkpoint, self._staged_topics
        position, replay, starts, next_offset = checkpoint.position, checkpoint.replay, batch.start, batch.next_offset
        appended, nonce = 0, batch.nonce
        for msg in messages:
            topic = msg.topic()
            target = staged.get(topic)
            raw = msg.value()
            if target is None or raw is None or msg.error() is not None:
                self._take(msg)
                continue
            partition, offset = msg.partition(), msg.offset()
            key = (topic, partition)
            if key in replay or offset < position.get(key, 0):  # the checkpoint's verdict is needed
                self._take(msg)
                continue
            start = starts.get(key)
            if start is None:
                start = starts[key] = offset
            next_offset[key] = position[key] = offset + 1
            rows = batch.tables[target[0]]
            if raw and raw[0] == V2 and target[2]:  # priced.v2: the RowBinary row as it came, then the Kafka columns
                rows.binary.add(len(rows.lines))
                rows.lines.append(raw[1:] + BINARY_TAIL(partition, offset, start, nonce))
            else:
                rows.lines.append(raw.rstrip()[:-1] + b',"_topic":"%s","_partition":%d,"_offset":%d,"_batch_start":%d}' % (
                    target[1], partition, offset, start))
            rows.msgs.append(msg)
            appended += 1
        batch.rows += appended

    @property
    def _staged_topics(self) -> dict[str, tuple[str, bytes, bool]]:
        """topic -> (staged table, topic as bytes, takes priced.v2), for the topics `self.tables` maps now (tests and
        benches narrow it)."""
        if self._staged_cache[0] is not self.tables:
            self._staged_cache = (self.tables, {topic: (table.name, topic.encode(), ev.CONTRACTS[table.contract] is ev.PricedEvent)
                                                for topic, table in self.tables.items() if table.name in STAGED_TABLES})
        return self._staged_cache[1]

    def _advance(self, key: tuple[str, int], offset: int) -> None:
        self.batch.next_offset[key] = offset + 1
        self.checkpoint.advance(key, offset)

    def _add_row(self, batch: Batch, table: ledger.LedgerTable, msg: Message, start: int, already_dead: bool) -> None:
        raw = msg.value()
        rows = batch.tables[table.name]
        if raw is None:  # a tombstone
            if table.name == "budget_policies":
                ts = datetime.fromtimestamp(msg.timestamp()[1] / 1000, timezone.utc)
                rows.dict_rows[month_of(ts)].append({"policy_id": (msg.key() or b"").decode(errors="replace"),
                                                      "created_at": ts, "deleted": True, "changed_by": _changed_by(msg),
                                                      **self._coords(msg, start)})
                batch.rows += 1
                return
            if table.topic in COMPACTED:
                self.stats["tombstones"] += 1
                return
            raise ev.InvalidEvent(table.contract, [("(record)", "empty record (tombstone) on a topic that is not compacted")])
        if table.name in STAGED_TABLES:  # checked by ClickHouse at flush time (sql/checks.py)
            if already_dead:
                rows.already_dead.add(len(rows.lines))
            if raw and raw[0] == V2 and ev.CONTRACTS[table.contract] is ev.PricedEvent:
                rows.binary.add(len(rows.lines))
                rows.lines.append(raw[1:] + BINARY_TAIL(msg.partition(), msg.offset(), start, batch.nonce))
            else:
                rows.lines.append(json_line(raw.rstrip(), msg, start))
            rows.msgs.append(msg)
        else:
            record = ev.decode(ev.CONTRACTS[table.contract], raw)
            row = self._row(record)
            if table.name == "budget_policies":
                row["changed_by"] = _changed_by(msg)
            month = month_of(row[table.ts_column])
            rows.dict_rows[month].append({**row, **self._coords(msg, start)})
            if table.id_column:
                rows.ids[month].append((str(row[table.id_column]), row[table.ts_column]))
                rows.dict_msgs[month].append(msg)
        batch.rows += 1

    @staticmethod
    def _coords(msg: Message, start: int) -> dict[str, Any]:
        return {"_topic": msg.topic(), "_partition": msg.partition(), "_offset": msg.offset(), "_batch_start": start}

    def _row(self, record: ev.Contract) -> dict[str, Any]:
        if isinstance(record, ev.GpuSample):
            return self._gpu_row(record)
        if isinstance(record, ev.ComputeSample):
            return self._compute_row(record)
        if isinstance(record, ev.BudgetPolicy):
            return budget_policy_row(record)
        return contract_row(record)

    def _gpu_row(self, sample: ev.GpuSample) -> dict[str, Any]:
        catalog = self.catalog
        try:
            seconds, cost = catalog.gpu_sample_cost(sample)
            version = catalog.version
        except LookupError as err:  # a GPU without a $/hour: keep the time, flag the row, never invent a price
            log.warning("%s", err)
            seconds, cost, version = Decimal(sample.interval_ms) / 1000, Decimal(0), "unpriced"
        return gpu_sample_row(sample, seconds, cost, version)

    def _compute_row(self, sample: ev.ComputeSample) -> dict[str, Any]:
        catalog = self.catalog
        try:
            cpu, memory = catalog.compute_sample_cost(sample)
            version = catalog.version
        except LookupError as err:  # a node class without rates: keep the usage, flag the row, never invent a price
            log.warning("%s", err)
            cpu, memory, version = Decimal(0), Decimal(0), "unpriced"
        return compute_sample_row(sample, cpu, memory, version)

    @property
    def catalog(self):
        if self._catalog is None:
            from meterline.streams.pricing import load_catalog

            self._catalog = load_catalog(self.settings.catalog)
        return self._catalog

    # ------------------------------------------------------------------ flush

    def flush(self, retry: bool = True, wait: bool = True) -> None:
        """Insert the batch (rows with offsets), then commit its offsets. See the module doc.

        With wait=False the insert runs in a worker thread (chDB and the HTTP client release the
        GIL) while the next batch is decoded; batches still land and commit strictly in order,
        because a flush first waits for the one before it.
        """
        batch, self.batch = self.batch, Batch()
        self._join_inflight()
        if not batch.next_offset:
            return
        if wait or not retry:
            self._flush_batch(batch, retry)
            return
        self.inflight.start(lambda b: self._flush_batch(b, retry=True, commit=False), batch)

    def _reap_inflight(self) -> None:
        """Commit a finished background insert (called from the consuming thread)."""
        if self.inflight.finished():
            self._join_inflight()

    def _join_inflight(self) -> None:
        """Wait for the insert in flight, then commit it; while it retries, keep the group membership alive."""
        inserted = self.inflight.join(self._poll_paused)
        if inserted is not None:
            self.checkpoint.commit(self.consumer, inserted.next_offset)

    def _poll_paused(self) -> None:
        """Serve rebalance callbacks until the insert in flight is done; paused partitions deliver nothing new."""
        self.consumer.pause(self.consumer.assignment())
        try:
            while self.inflight.running():
                self._total_lag()  # measured here, for the insert thread's retry log
                msg = self.consumer.poll(0.2)
                if msg is not None:
                    self._take(msg)  # fetched before the pause: it joins the next batch
        finally:
            self.consumer.resume(self.consumer.assignment())  # what a rebalance re-assigned, _on_assign resumed

    def _flush_batch(self, batch: Batch, retry: bool, commit: bool = True) -> bool:
        """Steps 2-5 of the module doc; False when partitions were revoked mid-way."""
        self.flushing, self.revoked_mid_flush = True, False
        try:
            inserts = self.writer.inserts(batch, self._retry if retry else None)
            self._send_dead_letters(batch.dead, batch.anomalies)
            for describe, insert in inserts:
                self._retry(insert, describe) if retry else insert()
            if commit:
                self.checkpoint.commit(self.consumer, batch.next_offset)
            self.stats["flushes"] += 1
            self.stats["rows"] += batch.rows
            return True
        except Revoked:
            log.warning("partitions revoked mid-flush; the new owner resumes from the ledger")
            return False
        finally:
            self.flushing = False

    def _send_dead_letters(self, dead: list[ev.DeadLetter], anomalies: list[ev.Anomaly] = ()) -> None:
        for letter in dead:
            self.producer.produce(self.dlq_topic, key=letter.source_topic.encode(), value=letter.to_json())
        for anomaly in anomalies:
            self.producer.produce(self.anomalies_topic, key=anomaly.tenant_id.encode(), value=anomaly.to_json())
        if dead:
            if self.producer.flush(30) != 0:
                raise RuntimeError("dead letters were not acknowledged by Kafka")
            self.stats["dead_letters"] += len(dead)
            log.warning("%d records dead-lettered to %s", len(dead), self.dlq_topic)
        if bugs := [d for d in dead if d.error_type == "LedgerCheck"]:  # not bad input: valid records the ledger lacks
            self.stats["ledger_check_rejections"] += len(bugs)
            log.error("%d records valid by the contract were rejected by the ledger's SQL checks, first %s[%d] offset %d: "
                      "a meterline bug, please report it; they are kept on %s", len(bugs), bugs[0].source_topic,
                      bugs[0].partition, bugs[0].offset, self.dlq_topic)

    def _retry(self, action: Callable[[], Any], what: str) -> Any:
        """Run `action` until it succeeds, backing off exponentially; keeps the group membership alive."""
        delay = 0.2
        while True:
            try:
                return action()
            except Exception as err:  # noqa: BLE001 - ClickHouse down, disk full, ...: keep the data, wait
                if self.stop.is_set():
                    raise  # stopping: nothing was committed, the next start resumes from the ledger
                self.stats["retries"] += 1
                log.warning("ledger unavailable (%s: %s); retry in %.1fs, lag %d", what, str(err).splitlines()[0][:200],
                            delay, self._total_lag())
                self._wait(delay)
                delay = min(delay * 2, self.max_backoff_s)

    def _wait(self, seconds: float) -> None:
        """Back off; a flush gives up at once when its partitions are revoked or the sink stops."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.flushing and self.revoked_mid_flush:
                raise Revoked()
            time.sleep(min(0.05, seconds))

    # ------------------------------------------------------------------ observability

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages not yet in the ledger, per assigned partition (high watermark - next offset)."""
        return self.checkpoint.lag(self.consumer)

    def _total_lag(self) -> int:
        """The lag for a log line. Only the consuming thread asks the consumer: the insert thread calling it while
        that thread polls waited forever on confluent-kafka's per-handle lock (a retried insert in flight hung the
        sink); it reports the figure the consuming thread last measured."""
        if threading.get_ident() == self._consuming_thread:
            self.checkpoint.last_lag = sum(self.lag().values())
        return self.checkpoint.last_lag


def run_sink(settings: Settings, idle_exit_s: float | None = None, **options: Any) -> None:
    """`meterline sink`: run until SIGINT/SIGTERM, then flush and stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sink = LedgerSink(settings, **options)
    ledger.migrate(sink.client, cluster=settings.clickhouse_cluster)
    log.info("sink consuming %s into %s", ", ".join(sink.tables), settings.dsn)
    sink.run(stop, idle_exit_s=idle_exit_s)
    log.info("sink stopped: %s", sink.stats)


def _changed_by(msg: Message) -> str:
    """The budgets record's `changed_by` header (allocator/budgets.py): who made the change."""
    for key, value in msg.headers() or ():
        if key == CHANGED_BY and value:
            return value.decode(errors="replace")[:256]
    return ""
