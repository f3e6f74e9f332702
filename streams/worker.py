"""The stream worker: one lean confluent-kafka batch consumer (why not Faust: ARCHITECTURE.md → Streams).

    usage ──▶ validate ─▶ dedupe ─▶ price ─▶ priced        (PricedEvent, key tenant_id)
      │          └──────────────────────────▶ dlq           (DeadLetter: reason + original bytes)
    gpu  ──▶ validate ─▶ GPU-seconds + cost ─┐
                                             ▼
                 spend per tenant/team/project/agent/session ─▶ spend (SpendUpdate, key tenant_id)
                                             │                  spend-state (compacted changelog)
                 anomaly detectors ──────────┴────────────────▶ anomalies (`meterline alerts` → webhook)

Keys and state: usage (and GPU process rows) are keyed by tenant_id, so one worker owns a tenant's events
and its spend state (co-partitioned, no cross-worker merge). A huge tenant is one
partition's work; see ARCHITECTURE.md for the trade-off and mitigations.

Spend is published every `publish_interval` (1 s) for tenant/team/project scopes and at
every checkpoint (5 s) for all scopes. Delivery (at-least-once, errs toward over-counting):
every checkpoint writes every changed scope to the spend topic and the compacted spend-state changelog, flushes
the producer (priced, dlq, spend, anomalies all acknowledged), and only then commits the
consumer offsets. A crash replays at most one checkpoint of input: priced rows may repeat
(the ledger dedupes by event_id) and restored spend may count replayed events twice,
never zero times.

Dedupe: event ids are remembered per usage partition in an insertion-ordered dict capped
at `dedupe_per_partition` ids (FIFO eviction), so memory is bounded (~100 B per id) and a
producer retry within the last N events of its partition is dropped. The window restarts
empty after a restart; the ledger's dedupe by event_id catches what it misses.
"""
from __future__ import annotations

import base64
import gc
import logging
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.topics import create_topics

from .anomalies import DetectorConfig, Detectors
from .codec import PICO, ZERO_USD, FastUsage, decode_usage, encode, to_pico, usd
from .pricing import Catalog, load_catalog
from .spend import ScopeKey, SpendBook

log = logging.getLogger("meterline.streams")
UTC = timezone.utc
STATE_TOPIC = "spend-state"
KEY_SEP = "\x1f"
NO_PARTS = (0, 0, 0, 0, 0)
TOP_SCOPES = frozenset(("tenant", "team", "project"))


class DedupeWindow:
    """The last `capacity` event ids of one partition (bounded; oldest forgotten first)."""

    __slots__ = ("capacity", "ids")

    def __init__(self, capacity: int) -> None:
        self.capacity, self.ids = capacity, {}

    def seen(self, event_id: int) -> bool:
        ids = self.ids
        if event_id in ids:
            return True
        ids[event_id] = None
        if len(ids) > self.capacity:
            del ids[next(iter(ids))]
        return False


def ensure_state_topic(settings: Settings) -> str:
    """The compacted spend-state changelog (in the topic catalog; created with the others if missing)."""
    create_topics(settings)
    return settings.topic(STATE_TOPIC)


def restore_spend(settings: Settings, now: datetime | None = None) -> dict[ScopeKey, dict[str, Any]]:
    """The last published state of every scope in the current month, read from the changelog."""
    topic, now = ensure_state_topic(settings), now or datetime.now(UTC)
    period = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    consumer = Consumer(settings.kafka_config(**{"group.id": "meterline-streams-restore", "enable.auto.commit": False}))
    try:
        parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts}
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        latest: dict[ScopeKey, dict[str, Any]] = {}
        while todo:
            for msg in consumer.consume(10_000, timeout=1.0):
                if msg.error():
                    continue
                key = tuple(msg.key().decode().split(KEY_SEP, 2))
                if msg.value() is None:
                    latest.pop(key, None)
                else:
                    latest[key] = msgspec.json.decode(msg.value())
                if msg.offset() + 1 >= ends[msg.partition()]:
                    todo.discard(msg.partition())
        return {k: v for k, v in latest.items() if datetime.fromisoformat(v["period_start"]) >= period}
    finally:
        consumer.close()


class StreamWorker:
    def __init__(self, settings: Settings, catalog: Catalog | None = None, group_id: str | None = None,
                 checkpoint_interval: float = 5.0, publish_interval: float = 1.0, dedupe_per_partition: int = 100_000,
                 detector_config: DetectorConfig | None = None,
                 batch_size: int = 5000, session_idle: timedelta = timedelta(hours=1),
                 instance_id: str | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or load_catalog()
        self.topics = {name: settings.topic(name) for name in ("usage", "gpu", "priced", "dlq", "spend", "anomalies")}
        self.state_topic = ensure_state_topic(settings)
        group_id = group_id or settings.group("streams")
        self.group_id, self.checkpoint_interval, self.batch_size = group_id, checkpoint_interval, batch_size
        self.publish_interval = min(publish_interval, checkpoint_interval)
        self.dedupe_per_partition, self.session_idle = dedupe_per_partition, session_idle
        self.dedupe: dict[int, DedupeWindow] = {}
        self.tenant_partition: dict[str, int] = {}
        self.spend = SpendBook(restore_spend(settings))
        self.detectors = Detectors(detector_config)
        self.stats: Counter[str] = Counter()
        self.stream_now = datetime.min.replace(tzinfo=UTC)
        self._delivery_error: str | None = None
        self._suffix_now: datetime | None = None
        self._suffix = ""
        self._last_evict = time.monotonic()
        self.producer = Producer(settings.kafka_config(**{
            "enable.idempotence": True, "linger.ms": 20, "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000, "queue.buffering.max.kbytes": 65_536,  # bounded: backpressure via BufferError
            "batch.num.messages": 10_000, "on_delivery": self._on_delivery,
        }))
        static = {"group.instance.id": instance_id} if instance_id else {}  # restart resumes without a session timeout
        self.consumer = Consumer(settings.kafka_config(**static, **{
            "group.id": group_id, "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "fetch.min.bytes": 65536, "fetch.wait.max.ms": 50, "queued.max.messages.kbytes": 16_384,
            # range: a member gets the same partition indexes of usage and gpu (equal counts, both keyed by
            # tenant), so a tenant's token and GPU spend live in one worker. (cooperative-sticky does not.)
            "partition.assignment.strategy": "range", "on_commit": self._on_commit,
        }))
        self._check_co_partitioned()

    def _check_co_partitioned(self) -> None:
        counts = {name: len(self.consumer.list_topics(self.topics[name], timeout=10).topics[self.topics[name]].partitions)
                  for name in ("usage", "gpu")}
        if counts["usage"] and counts["gpu"] and counts["usage"] != counts["gpu"]:
            raise RuntimeError(f"{self.topics['usage']} has {counts['usage']} partitions and {self.topics['gpu']} {counts['gpu']}: "
                               "a tenant's token and GPU spend would be counted by different workers. Give both the same "
                               "partition count (kafka-topics.sh --alter --partitions N on the smaller one).")

    # ------------------------------------------------------------------ loop
    def run(self, stop: threading.Event | None = None, exit_when_idle: float | None = None,
            until_caught_up: bool = False) -> Counter[str]:
        """Consume until `stop` is set, nothing arrived for exit_when_idle seconds, or (until_caught_up)
        every assigned partition is read to its end; checkpoints on exit."""
        stop = stop or threading.Event()
        gc.freeze()  # the catalog and price snapshot (long-lived) leave the collector's scans: fewer µs per event
        self.consumer.subscribe([self.topics["usage"], self.topics["gpu"]], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=lambda c, p: self._on_revoke(c, p, commit="none"))  # lost: the group moved on
        next_checkpoint, idle_since = time.monotonic() + self.checkpoint_interval, time.monotonic()
        next_publish = time.monotonic() + self.publish_interval
        try:
            while not stop.is_set():
                msgs = self.consumer.consume(self.batch_size, timeout=0.1)
                if msgs:
                    self.process(msgs)
                    idle_since = time.monotonic()
                elif exit_when_idle is not None and time.monotonic() - idle_since > exit_when_idle:
                    break
                elif until_caught_up and self.caught_up():
                    break
                if time.monotonic() >= next_checkpoint:
                    self.checkpoint()
                    next_checkpoint = time.monotonic() + self.checkpoint_interval
                    next_publish = time.monotonic() + self.publish_interval
                elif time.monotonic() >= next_publish:
                    self.publish_spend(TOP_SCOPES)  # fast path for budgets; sessions and agents wait for the checkpoint
                    next_publish = time.monotonic() + self.publish_interval
            self.checkpoint()
        finally:
            self.consumer.close()
        return self.stats

    def caught_up(self) -> bool:
        """Every assigned partition consumed to its high watermark (and something is assigned)."""
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        positions = self.consumer.position(assigned)
        unread = [tp for tp in positions if tp.offset < 0]  # nothing consumed since start: where the group left off
        committed = {(tp.topic, tp.partition): tp.offset for tp in (self.consumer.committed(unread, timeout=10) if unread else [])}
        for tp in positions:
            offset = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            high = self.consumer.get_watermark_offsets(tp, timeout=10)[1]
            if high > 0 and offset < high:
                return False
        return True

    def process(self, msgs: list[Any]) -> None:
        """One consumed batch: usage events through the hot path (priced records produced at the end
        of the batch), GPU samples after them. Per-event work stays in locals; counters per batch."""
        usage_topic, now = self.topics["usage"], datetime.now(UTC)
        latest = now + ev.MAX_FUTURE_SKEW  # the newest acceptable event time, once per batch
        dedupe, tenant_partition, stats = self.dedupe, self.tenant_partition, self.stats
        price, unpriced_counts = self.catalog.price_pico, self.catalog.unpriced
        spend_add, detect, priced_json = self.spend.add, self.detectors.usage, self._priced_json
        gpu_samples, priced, newest = [], [], self.stream_now
        duplicates = unpriced_events = 0
        for msg in msgs:
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", msg.error())
                continue
            if msg.topic() != usage_topic:
                sample = self._decode_or_dlq(msg, ev.GpuSample, now)
                if sample is not None:
                    gpu_samples.append(sample)
                continue
            raw = msg.value()
            try:
                if raw is None:
                    raise ev.InvalidEvent("UsageEvent", [("(record)", "empty record (tombstone)")])
                event = decode_usage(raw, latest=latest)
            except ev.InvalidEvent as err:
                self._dead_letter(msg, err.reason, "InvalidEvent", now)
                continue
            partition = msg.partition()
            window = dedupe.get(partition)
            if window is None:
                window = dedupe[partition] = DedupeWindow(self.dedupe_per_partition)
            if window.seen(event.event_id.int):
                duplicates += 1
                continue
            tenant = event.tenant_id
            tenant_partition[tenant] = partition
            listed = price(event)
            unpriced = False
            if event.cost_usd is not None:
                cost, source = to_pico(event.cost_usd), "provider"
            elif listed is not None:
                cost, source = listed[4], "catalog"
            else:
                cost, source, unpriced = 0, "unpriced", True
                unpriced_counts[(event.provider, event.model or event.tool)] += 1
                unpriced_events += 1
            priced.append((priced_json(event, cost, listed or NO_PARTS, source, now), tenant))
            ts = event.ts
            second = ts.toordinal() * 86400 + ts.hour * 3600 + ts.minute * 60 + ts.second  # anomalies.second_of, inlined
            spend_add((tenant, event.team, event.project, event.agent_id, event.session_id), ts, cost,
                      event.input_tokens, event.output_tokens, unpriced, minute=second // 60)
            if ts > newest:
                newest = ts
            found = detect(event, cost, unpriced, second)
            if found:
                for anomaly in found:
                    self._anomaly(anomaly)
        self.stream_now = newest
        if priced:
            self._produce_all(self.topics["priced"], priced)
            stats["priced"] += len(priced)
        if unpriced_events:
            stats["unpriced"] += unpriced_events
        if duplicates:
            stats["duplicates"] += duplicates
        if gpu_samples:
            self._gpu(gpu_samples)

    def _priced_json(self, event: Any, cost: int, parts: tuple[int, ...], source: str, now: datetime) -> bytes:
        """PricedEvent JSON: the usage fields (cost_usd = the charge) + price fields, without building a model."""
        if now is not self._suffix_now:  # once per batch
            self._suffix_now = now
            self._suffix = f',"catalog_version":{msgspec.json.encode(self.catalog.version).decode()},"priced_at":"{now.isoformat().replace("+00:00", "Z")}"}}'
        prices = (f',"list_cost_usd":"{usd(parts[4])}","input_cost_usd":"{usd(parts[0])}","output_cost_usd":"{usd(parts[1])}",'
                  f'"cache_read_cost_usd":"{usd(parts[2])}","cache_write_cost_usd":"{usd(parts[3]) if parts[3] else ZERO_USD}",'
                  f'"cost_source":"{source}"{self._suffix}')
        if type(event) is FastUsage:
            event.cost_usd = usd(cost)
            head = encode(event)
        else:
            record = dict(event)
            record["cost_usd"] = usd(cost)
            head = encode(record)
        return head[:-1] + prices.encode()

    # ------------------------------------------------------------------- GPU
    def _gpu(self, samples: list[ev.GpuSample]) -> None:
        """Charge process rows (each row carries its share of a device that processes share)."""
        for sample in samples:
            self.stats["gpu_samples"] += 1
            gpu_ps = cost = 0
            try:
                seconds, usd_cost = self.catalog.gpu_sample_cost(sample)
                gpu_ps, cost = to_pico(seconds), to_pico(usd_cost)
            except LookupError:
                self.stats["gpu_unpriced"] += 1
            if sample.level == "process":
                if sample.attributed and sample.tenant_id:
                    ids = (sample.tenant_id, sample.team, sample.project, sample.agent_id, sample.session_id)
                else:  # unattributed GPU time accrues to its tenant, or to the explicit tenant "unattributed"
                    ids = (sample.tenant_id or "unattributed", "", "", "", "")
                self.spend.add(ids, sample.ts, cost, gpu_ps=gpu_ps, gpu_cost=cost, events=0)
            for anomaly in self.detectors.gpu(sample, gpu_ps, cost):
                self._anomaly(anomaly)

    # ------------------------------------------------------------- outputs
    def _decode_or_dlq(self, msg: Any, contract: type, now: datetime) -> Any | None:
        try:
            if msg.value() is None:
                raise ev.InvalidEvent(contract.__name__, [("(record)", "empty record (tombstone)")])
            return ev.decode(contract, msg.value())
        except ev.InvalidEvent as err:
            self._dead_letter(msg, err.reason, "InvalidEvent", now)
            return None

    def _dead_letter(self, msg: Any, reason: str, error_type: str, now: datetime) -> None:
        letter = {"dlq_id": ev.new_id(), "ts": now, "stage": "streams", "source_topic": msg.topic(),
                  "partition": msg.partition(), "offset": msg.offset(), "reason": reason[: ev.MAX_TEXT_LEN],
                  "error_type": error_type, "payload_b64": base64.b64encode(msg.value() or b"").decode()}
        self._produce(self.topics["dlq"], encode(letter), msg.key())
        self.stats["dead_letters"] += 1

    def _anomaly(self, anomaly: ev.Anomaly) -> None:
        body = anomaly.to_json()
        self._produce(self.topics["anomalies"], body, anomaly.tenant_id)
        self.stats["anomalies"] += 1

    def _produce_all(self, topic: str, records: list[tuple[bytes, Any]]) -> None:
        produce = self.producer.produce
        for value, key in records:
            try:
                produce(topic, value, key)
            except BufferError:
                self._produce(topic, value, key)

    def _produce(self, topic: str, value: bytes, key: Any) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None and self._delivery_error is None:
            self._delivery_error = f"{msg.topic()}: {err}"

    # ----------------------------------------------------------- checkpoint
    def publish_spend(self, scopes: frozenset[str] | None = None) -> None:
        """SpendUpdate of every changed scope (of `scopes`) to the spend topic and the changelog."""
        now = datetime.now(UTC)
        for key, update in self.spend.drain(now, scopes):
            body = encode(update)
            self._produce(self.topics["spend"], body, key[0])
            self._produce(self.state_topic, body, KEY_SEP.join(key))
            self.stats["spend_updates"] += 1

    def checkpoint(self, commit: str = "async") -> None:
        """Publish all changed spend, wait for every output to be acknowledged, then commit input offsets.

        `commit`: "async" on the timer, "sync" in the revoke callback, "none" when the assignment is lost.
        Never a synchronous commit outside a rebalance callback: after a broker outage it can wait
        forever for a group that is itself waiting for this thread to serve the revoke (the stall of
        issue 10). A lost async commit only replays input, which the ledger dedupes."""
        self.publish_spend()
        self.detectors.tick(self.stream_now) if self.stream_now.year > 1 else None
        remaining = self.producer.flush(60)
        if remaining or self._delivery_error:
            raise RuntimeError(f"could not deliver to Kafka ({self._delivery_error or f'{remaining} records pending'}); "
                               "offsets were not committed, a restart replays from the last checkpoint")
        try:
            if commit != "none":
                self.consumer.commit(asynchronous=commit == "async")
        except KafkaException as err:
            if err.args[0].code() != KafkaError._NO_OFFSET:
                raise
        if time.monotonic() - self._last_evict > 60:
            self._last_evict = time.monotonic()
            self.stats["evicted_scopes"] += self.spend.evict_idle(self.stream_now, self.session_idle)

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:  # the next checkpoint commits again
            self.stats["commit_failures"] += 1
            log.warning("offset commit failed (%s); the next checkpoint retries", err)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self.spend.states or self.stats:  # a rebalance: newly owned tenants continue from the changelog
            self.spend.baseline = restore_spend(self.settings)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition], commit: str = "sync") -> None:
        self.checkpoint(commit)
        lost = {p.partition for p in partitions if p.topic == self.topics["usage"]}
        for p in lost:
            self.dedupe.pop(p, None)
        self.spend.drop_tenants({t for t, p in self.tenant_partition.items() if p in lost})


__all__ = ["StreamWorker", "DedupeWindow", "restore_spend", "ensure_state_topic", "PICO"]
