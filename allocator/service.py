"""`meterline allocator`: the engine behind Kafka.

Reads budgets (compacted topic, from the beginning, own assignment) and spend + GPU
samples (consumer group `meterline-allocator`), and after every batch publishes the
decisions whose content changed to the compacted control topic (key = decision key,
tombstones for retired keys) and threshold alerts to the anomalies topic. Live
decisions are re-published before they expire (heartbeat) and period-to-date spend is
reconciled with the ledger on a timer.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from datetime import datetime
from decimal import Decimal

from meterline.schemas.events import PRIORITIES, Anomaly, GpuSample, InvalidEvent, SpendUpdate, decode
from meterline.topics import partition_ends

from ._kafka import (ANNOUNCE_HEADER, GPU_WAIT_HEADER, NEED_HEADER, RELEASE_HEADER, SPENT_HEADER, assign_from_beginning,
                     assign_from_time, caught_up)
from .budgets import apply_policy_record
from .engine import Engine, Outputs

log = logging.getLogger("meterline.allocator")


class AllocatorService:
    def __init__(self, settings, engine: Engine | None = None, *, tick: float = 0.1, heartbeat_every: float = 2.0,
                 reconcile_every: float = 60.0, group_id: str | None = None, model_stats=None, pacing=None,
                 refresh_every: float = 60.0):
        self.settings = settings
        self.engine = engine or Engine()
        self.tick, self.heartbeat_every, self.reconcile_every = tick, heartbeat_every, reconcile_every
        self.group_id = group_id
        self.counts: Counter[str] = Counter()
        self.ready = threading.Event()   # set once the budgets topic has been read to its end
        # ledger feeds (allocator/slo.py ledger_feeds): measured model stats for SLO downgrades, pacing curves
        self.model_stats, self.pacing, self.refresh_every = model_stats, pacing, refresh_every

    def run(self, stop: threading.Event) -> None:
        from confluent_kafka import Consumer, Producer

        s = self.settings
        # every client closed on this thread whatever raises (the broker away at a restart): one left open is
        # destroyed later by whichever thread's garbage collection finds it, its librdkafka threads running till then
        with ExitStack() as clients:
            budgets = self._budget_consumer()
            clients.callback(budgets.close)
            data = Consumer(s.kafka_config(**{"group.id": self.group_id or f"meterline-allocator-{uuid.uuid4().hex}",
                                              "auto.offset.reset": "earliest", "enable.auto.commit": bool(self.group_id),
                                              "fetch.wait.max.ms": 10}))
            clients.callback(data.close)
            if self.group_id:   # scale-out: instances split tenants (spend is keyed by tenant_id)
                data.subscribe([s.topic("spend"), s.topic("gpu")])
            else:               # one instance: replay the recent past so re-sent windows and rates are known
                since = time.time() - self.engine.config.window_memory.total_seconds()
                assign_from_time(data, [s.topic("spend"), s.topic("gpu")], int(since * 1000))
            producer = Producer(s.kafka_config(**{"enable.idempotence": True, "linger.ms": 2}))
            clients.callback(producer.flush, 10)
            self._serve(stop, budgets, data, producer)

    def _serve(self, stop: threading.Event, budgets, data, producer) -> None:
        s = self.settings
        topics = {s.topic("spend"): SpendUpdate, s.topic("gpu"): GpuSample}
        last_heartbeat = last_reconcile = time.monotonic()
        last_refresh = None
        self._read_budgets(budgets, until_end=True)
        self._restore_fired()
        self.ready.set()
        while not stop.is_set():
            self._read_budgets(budgets, until_end=False)
            for msg in self._batch(data):
                self._apply(topics, msg)
            now = time.monotonic()
            if now - last_reconcile >= self.reconcile_every:
                self.engine.reconcile()
                last_reconcile = now
            if last_refresh is None or now - last_refresh >= self.refresh_every:
                self.refresh_from_ledger()
                last_refresh = now
            self._publish(producer, self.engine.decide())
            if now - last_heartbeat >= self.heartbeat_every:
                self._publish(producer, Outputs(decisions=self.engine.heartbeat()))
                last_heartbeat = now
            producer.poll(0)

    def refresh_from_ledger(self) -> None:
        """Hand the engine fresh measured model stats (budgets with an SLO) and pacing curves (each budget's
        current period). A ledger that fails keeps the previous tables: a warning, never a stopped allocator."""
        states = list(self.engine.budgets.values())
        try:
            if self.model_stats is not None:
                self.engine.load_model_stats(self.model_stats([s.policy for s in states if s.policy.slo is not None]))
            if self.pacing is not None:
                for s in states:
                    self.engine.set_pacing(s.policy.policy_id, self.pacing(s.policy, s.start, s.end))
        except Exception as err:  # noqa: BLE001 - the ledger is advice here; decisions go on without it
            self.counts["refresh_errors"] += 1
            log.warning("ledger refresh (SLO stats, pacing curves) failed: %s", err)

    def _batch(self, consumer) -> list:
        """Wait up to one tick for the first record, then take whatever else is already there."""
        first = consumer.poll(self.tick)
        return [first, *consumer.consume(2000, 0)] if first is not None else []

    def _apply(self, topics: dict, msg) -> None:
        if msg.error():
            self.counts["kafka_errors"] += 1
            return
        contract = topics.get(msg.topic())
        try:
            record = decode(contract, msg.value() or b"")
        except InvalidEvent as err:
            self.counts["invalid"] += 1
            log.warning("skipping an invalid record from %s: %s", msg.topic(), err)
            return
        if isinstance(record, SpendUpdate):
            headers = dict(msg.headers() or ())
            announced = headers.get(ANNOUNCE_HEADER)
            if announced is not None:   # a guard asks for a lease (zero cost: nothing to add)
                if record.scope == "session" and announced.decode() in PRIORITIES:
                    self._announced(record, announced.decode(), headers)
                return
            self.engine.apply_spend(record)
            self.counts["spend"] += 1
        else:
            self.engine.apply_gpu(record)
            self.counts["gpu"] += 1

    def _announced(self, record: SpendUpdate, priority: str, headers: dict) -> None:
        """A guard's session announcement: a lease request, a lease given back, or GPUs it waits for."""
        need, spent = _usd(headers.get(NEED_HEADER)), _usd(headers.get(SPENT_HEADER))
        if RELEASE_HEADER in headers:
            self.engine.release(record.tenant_id, record.scope_id, _usd(headers[RELEASE_HEADER]), spent, need)
            self.counts["releases"] += 1
        elif GPU_WAIT_HEADER in headers:
            self.engine.announce_gpu(record.tenant_id, record.scope_id, _usd(headers[GPU_WAIT_HEADER]))
            self.counts["gpu_waits"] += 1
        else:
            self.engine.announce(record.tenant_id, record.scope_id, priority, need, spent)
            self.counts["announcements"] += 1

    def _budget_consumer(self):
        from confluent_kafka import Consumer

        consumer = Consumer(self.settings.kafka_config(**{"group.id": f"meterline-allocator-budgets-{uuid.uuid4().hex}",
                                                          "enable.auto.commit": False}))
        try:
            self._budget_ends = assign_from_beginning(consumer, self.settings.topic("budgets"))
        except BaseException:
            consumer.close()
            raise
        self._policies: dict = {}
        return consumer

    def _read_budgets(self, consumer, until_end: bool) -> None:
        positions = {p: 0 for p in self._budget_ends}
        while True:
            msgs = consumer.consume(500, 0.2 if until_end else 0)
            for msg in msgs:
                if msg.error():
                    continue
                positions[msg.partition()] = msg.offset() + 1
                result = apply_policy_record(self._policies, msg.key(), msg.value())
                if isinstance(result, str):
                    self.engine.remove_policy(result)
                elif result is not None:
                    self.engine.apply_policy(result)
                    self.counts["budgets"] += 1
            if not until_end or all(positions[p] >= end for p, end in self._budget_ends.items()):
                return
            if not msgs and caught_up(consumer, self._budget_ends):
                return

    def _restore_fired(self) -> None:
        """Mark the thresholds already alerted in each budget's current period (their budget_threshold alerts on the
        anomalies topic), so a restarted allocator does not send them again: fired thresholds live in memory only."""
        from confluent_kafka import Consumer, KafkaException

        starts = [s.start for s in self.engine.budgets.values()]
        if not starts:
            return
        topic = self.settings.topic("anomalies")
        consumer = Consumer(self.settings.kafka_config(**{"group.id": f"meterline-allocator-alerts-{uuid.uuid4().hex}",
                                                          "enable.auto.commit": False}))
        try:
            self._read_alerts(consumer, topic, int(min(starts).timestamp() * 1000))
        except KafkaException as err:  # advice only: at worst a threshold is alerted twice
            log.warning("could not read earlier budget alerts on %s (%s): thresholds may be alerted again", topic, err)
        finally:
            consumer.close()

    def _read_alerts(self, consumer, topic: str, since_ms: int) -> None:
        """Every alert on `topic` from `since_ms` to the end as it is now, handed to _restore_alert."""
        from confluent_kafka import TopicPartition

        ends = partition_ends(consumer, topic)
        found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in ends], timeout=30)
        starts = {tp.partition: tp.offset for tp in found if 0 <= tp.offset < ends[tp.partition]}
        if not starts:
            return
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])
        ends = {p: ends[p] for p in starts}
        while not caught_up(consumer, ends):
            for msg in consumer.consume(500, 0.2):
                raw = msg.value() if msg.error() is None else None
                if raw and b"budget_threshold" in raw:   # most anomalies are the worker's: skip them undecoded
                    self._restore_alert(raw)

    def _restore_alert(self, raw: bytes) -> None:
        try:
            alert = decode(Anomaly, raw)
            if alert.kind == "budget_threshold":
                evidence = alert.evidence
                self.engine.restore_fired(evidence["policy_id"], datetime.fromisoformat(evidence["period_start"]),
                                          int(evidence["threshold_pct"]))
        except (InvalidEvent, KeyError, ValueError):  # another producer's alert, or an older shape: nothing to restore
            return

    def _publish(self, producer, out: Outputs) -> None:
        control, anomalies = self.settings.topic("control"), self.settings.topic("anomalies")
        for decision in out.decisions:
            self._produce(producer, control, decision.key.encode(), decision.to_json())
        for key in out.retired:
            self._produce(producer, control, key.encode(), None)
        for alert in out.alerts:
            self._produce(producer, anomalies, alert.tenant_id.encode(), alert.to_json())
        self.counts["decisions"] += len(out.decisions)
        self.counts["alerts"] += len(out.alerts)

    @staticmethod
    def _produce(producer, topic: str, key: bytes, value: bytes | None) -> None:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                return
            except BufferError:  # local queue full: let the client drain, then retry
                producer.poll(0.05)


def _usd(raw: bytes | None) -> Decimal:
    try:
        value = Decimal(raw.decode()) if raw else Decimal(0)
    except (ArithmeticError, UnicodeDecodeError):
        return Decimal(0)
    return value if value.is_finite() and value >= 0 else Decimal(0)


def run_in_thread(settings, engine: Engine | None = None, **kwargs) -> tuple[AllocatorService, threading.Event, threading.Thread]:
    """Start the service on a daemon thread (tests, `meterline up`). Returns (service, stop, thread)."""
    service = AllocatorService(settings, engine, **kwargs)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), name="meterline-allocator", daemon=True)
    thread.start()
    return service, stop, thread



