"""The stream worker: one lean confluent-kafka batch consumer (why not Faust: ARCHITECTURE.md → Streams).

    usage ──▶ validate ─▶ dedupe ─▶ price ─▶ priced        (PricedEvent, key tenant_id)
      │          └──────────────────────────▶ dlq           (DeadLetter: reason + original bytes)
    gpu  ──▶ validate ─▶ GPU-seconds + cost ─┐
                                             ▼
                 spend per tenant/team/project/agent/session ─▶ spend (SpendUpdate, key tenant_id)
                                             │                  spend-state (compacted changelog)
                 anomaly detectors ──────────┴────────────────▶ anomalies (`meterline alerts` → webhook)

Keys and state: usage, GPU process rows and CPU samples are keyed by tenant_id ("unattributed" when a sample
has none: charged_ids), so one worker owns a tenant's events and its spend state (co-partitioned, no
cross-worker merge); on revoke it forgets every tenant it charged from the partitions it lost. A huge tenant is one
partition's work; see ARCHITECTURE.md for the trade-off and mitigations.

Spend is published every `publish_interval` (1 s) for tenant/team/project scopes and at
every checkpoint (5 s) for all scopes. Delivery (at-least-once, errs toward over-counting):
every checkpoint writes every changed scope to the spend topic and the compacted spend-state changelog, flushes
the producer (priced, dlq, spend, anomalies all acknowledged), and only then commits the
consumer offsets. A crash replays at most one checkpoint of input: priced rows may repeat
(the ledger dedupes by event_id) and restored spend may count replayed events twice,
never zero times.

Dedupe, first write wins: one window per worker, across its usage partitions, remembers the
last `dedupe_per_partition` x (assigned usage partitions) event ids (FIFO eviction: bounded memory,
~200 B per id; a busy partition may push out a quiet one's ids early, the total stays the same) with a
64-bit digest of each one's decoded usage fields and the tenant, partition and offset of its first
copy. The first copy in consume order is charged; a later copy with the same digest is a producer
retry (dropped, counted); one with another digest (another tenant or another cost: a forgery or a
reused id) is never priced or counted: it is dead-lettered as `conflicting_duplicate`, naming both
copies, and raised as an anomaly. A revoked partition's ids are forgotten (its new owner builds its
own window); the window restarts empty after a restart, and the ledger's dedupe by event_id catches
what it misses.

Faults: no single record stops the worker. Whatever one record raises while being decoded, deduped,
priced, aggregated or checked for anomalies sends it to the dlq (reason names the stage, error_type the
exception) and the batch goes on. A record's effects are ordered so that a failure leaves no charge:
everything that can fail on its own runs before spend (the detectors first: their baselines are advisory,
an event that fails later may have nudged one, nothing more); spend is charged once per batch, after every
record's own stages (SpendBook.add_many: the batch's rows, ancestors pre-aggregated), so a record that
failed, including a priced record that produce() refused, was never charged; the one thing spend could fail
on (an event's month at the calendar's ends) is computed in the record's own stage. A record the broker refuses later (delivery report: too large, invalid) is dead-lettered
at the checkpoint, bounded (its spend stays counted: errs toward over-counting). Retriable commit errors
are retried, lost assignments and rebalances skip the commit (the next checkpoint commits; replay is
at-least-once); a lost assignment, or a batch that outlasted max.poll.interval, publishes no spend (the new
owner replays and counts that input: a late copy from here would overwrite its totals with less); only errors that concern every record (configuration, authorization, fatal) stop it.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
from msgspec.structs import astuple
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.topics import COORDINATOR_MOVING, committed_offsets, create_topics, partition_end

from .anomalies import DetectorConfig, Detectors, conflicting_duplicate
from .codec import PICO, PRICED_V2, ZERO_USD, FastUsage, decode_usage, encode, to_pico, usage_fields, usd
from .pricing import Catalog, Components, load_catalog
from .spend import ScopeKey, SpendBook, minute_key, month_of as spend_month
from .state_store import KEY_SEP, Damaged, StateStore, parked_from_update  # KEY_SEP: the changelog key the store reads

log = logging.getLogger("meterline.streams")
UTC = timezone.utc
STATE_TOPIC = "spend-state"
NO_PARTS = (0, 0, 0, 0, 0)
# PricedEvent fields of the components price_pico gives after the total (events that use more of the sheet)
SHEET_COST_FIELDS = tuple(f"{name}_cost_usd" for name in Components._fields[4:])


def _sheet_json(parts: tuple[int, ...]) -> str:
    """The components after the total as JSON members ('' for most events: the fields default to 0)."""
    return "".join(f'"{name}":"{usd(value)}",' for name, value in zip(SHEET_COST_FIELDS, parts[5:]))
MAX_DLQ_KEY = 1024  # bytes of a dead letter's key kept (the key only picks the dlq partition)
TOP_SCOPES = frozenset(("tenant", "team", "project"))


M64, M48 = (1 << 64) - 1, (1 << 48) - 1


class DedupeWindow:
    """The last `capacity` event ids of a worker's usage partitions, each with its first copy:
    (digest, tenant, partition, offset). Bounded; oldest forgotten first. The hot path reads and
    writes `ids` inline (no method call per event). A copy is one packed int (~50 B instead of a tuple and its
    ints, ~140 B: the window holds up to 100k ids per partition): digest (64 bits), offset + 1 (48),
    partition + 1 (16), then the tenant's index in `tenants`."""

    __slots__ = ("capacity", "ids", "tenants", "tenant_index")

    def __init__(self, capacity: int) -> None:
        self.capacity, self.ids = capacity, {}
        self.tenants: list[str] = []
        self.tenant_index: dict[str, int] = {}

    def pack(self, digest: int, tenant: str, partition: int, offset: int) -> int:
        index = self.tenant_index.get(tenant)
        if index is None:
            index = self.index_of(tenant)
        return (digest & M64) | ((offset + 1) & M48) << 64 | (partition + 1) << 112 | index << 128

    def index_of(self, tenant: str) -> int:
        """The tenant's number (made when new); the table is rebuilt from the window when it outgrows it."""
        if len(self.tenants) > max(4 * len(self.ids), 100_000):  # tenants whose ids all left the window
            copies = {k: self.unpack(v) for k, v in self.ids.items()}
            self.tenants, self.tenant_index = [], {}
            self.ids = {k: self.pack(*copy) for k, copy in copies.items()}
        index = self.tenant_index.get(tenant)
        if index is None:
            index = self.tenant_index[tenant] = len(self.tenants)
            self.tenants.append(tenant)
        return index

    def unpack(self, packed: int) -> tuple[int, str, int, int]:
        digest = packed & M64
        return (digest - (1 << 64) if digest >> 63 else digest, self.tenants[packed >> 128],
                ((packed >> 112) & 0xFFFF) - 1, ((packed >> 64) & M48) - 1)

    def first(self, event_id: int, copy: tuple[int, str, int, int]) -> tuple[int, str, int, int] | None:
        """The first copy of event_id, or None when it is new (and now remembered as `copy`)."""
        known = self.ids.get(event_id)
        if known is None:
            self.remember(event_id, copy)
            return None
        return self.unpack(known)

    def remember(self, event_id: int, copy: tuple[int, str, int, int]) -> None:
        ids = self.ids
        ids[event_id] = self.pack(*copy)
        if len(ids) > self.capacity:
            del ids[next(iter(ids))]

    def seen(self, event_id: int) -> bool:
        return self.first(event_id, (0, "", -1, -1)) is not None

    def forget_partitions(self, partitions: set[int]) -> None:
        self.ids = {k: v for k, v in self.ids.items() if ((v >> 112) & 0xFFFF) - 1 not in partitions}


_FIELDS = tuple(FastUsage.__struct_fields__)
_ATTRS, _EVENT_ID = _FIELDS.index("attributes"), _FIELDS.index("event_id")
assert _ATTRS == len(_FIELDS) - 1  # the one unhashable field, last


def usage_digest(event: FastUsage | ev.UsageEvent) -> int:
    """64-bit digest of a usage event's decoded fields (not its bytes: key order, spacing and equal
    spellings of a time or an amount do not matter); FastUsage and UsageEvent agree. Python's hash:
    in-process only (like the window), and keyed for strings, so a forger cannot aim a collision."""
    if type(event) is FastUsage:
        values = astuple(event)
    else:
        fields = usage_fields(event)
        values = tuple(fields[name] for name in _FIELDS)
    # event_id left out: it is the window's key (equal by construction), and UUID's hash is Python code (~0.7 µs)
    attrs, body = values[_ATTRS], (values[:_EVENT_ID], values[_EVENT_ID + 1:_ATTRS])
    return hash((body, frozenset(attrs.items()))) if attrs else hash(body)


# a produce() or delivery error that concerns one record (its size or shape), not the connection
PER_RECORD_ERRORS = frozenset((KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
                               KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE))
# commit errors that pass: retried here a few times (COORDINATOR_MOVING: it moves or loads, a request timed out),
# or skipped: the partitions were lost or are being reassigned; the next checkpoint (or the new
# owner) commits, and what was not committed is replayed (at-least-once)
COMMIT_SKIP = frozenset((KafkaError._ASSIGNMENT_LOST, KafkaError.REBALANCE_IN_PROGRESS,
                         KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID))
COMMIT_BACKOFF = (0.1, 0.3, 1.0, 3.0)


def commit_offsets(consumer: Any, asynchronous: bool = False, backoff: tuple[float, ...] = COMMIT_BACKOFF) -> bool:
    """Commit the consumer's positions of this moment; True when committed (or requested, asynchronous; or
    nothing to commit). Retriable errors are retried with backoff, lost assignments and rebalances skipped
    (logged; False); any other error raises.

    The offsets are taken here, not left to librdkafka: an offset-less async commit reads the stored offsets
    when its thread sends the request, after the next consume() may have stored records nobody processed yet
    (librdkafka #4534), and a crash then loses them."""
    offsets = [tp for tp in consumer.position(consumer.assignment()) if tp.offset >= 0]
    if not offsets:
        return True
    for attempt in range(len(backoff) + 1):
        try:
            consumer.commit(offsets=offsets, asynchronous=asynchronous)
            return True
        except KafkaException as exc:
            err = exc.args[0]
            code = err.code()
            if code == KafkaError._NO_OFFSET:
                return True
            if code in COMMIT_SKIP:
                log.warning("commit skipped (%s); the next checkpoint commits, uncommitted input is replayed", err)
                return False
            if not (code in COORDINATOR_MOVING or err.retriable()) or err.fatal():
                raise
            if attempt == len(backoff):
                log.warning("commit failed %d times (%s); the next checkpoint tries again", attempt + 1, err)
                return False
            time.sleep(backoff[attempt])
    return False


def ensure_state_topic(settings: Settings) -> str:
    """The compacted spend-state changelog (in the topic catalog; created with the others if missing)."""
    create_topics(settings)
    return settings.topic(STATE_TOPIC)


def _read_topic(settings: Settings, topic: str) -> Iterator[tuple[bytes | None, bytes | None, int, int]]:
    """Every record of `topic` now, oldest first per partition: (key, value, partition, offset)."""
    consumer = Consumer(settings.kafka_config(**{"group.id": "meterline-streams-restore", "enable.auto.commit": False}))
    try:
        parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        ends = {p: partition_end(consumer, TopicPartition(topic, p)) for p in parts}
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        while todo:
            for msg in consumer.consume(10_000, timeout=1.0):
                if msg.error():
                    continue
                yield msg.key(), msg.value(), msg.partition(), msg.offset()
                if msg.offset() + 1 >= ends[msg.partition()]:
                    todo.discard(msg.partition())
    finally:
        consumer.close()


def restore_spend(settings: Settings, store: StateStore, now: datetime | None = None) -> tuple[list[Damaged], set[ScopeKey]]:
    """Rebuild the worker's state store from the changelog: the last published state of every scope in the
    current month (streamed to disk, not held in memory). A damaged record is returned (the worker dead-letters
    it) and its scope keeps its newest good state: the changelog's previous record if compaction left one, else
    the newest good copy of it on the `spend` topic (every checkpoint writes the same update to both; read only
    when needed). Returns (damaged records, scopes with no good state anywhere: they continue from zero)."""
    topic, now = ensure_state_topic(settings), now or datetime.now(UTC)
    month = spend_month(minute_key(now))[2]
    damaged, missing = store.load(_read_topic(settings, topic), month)
    if missing:
        found: dict[ScopeKey, tuple[int, ...]] = {}
        for _, value, _, _ in _read_topic(settings, settings.topic("spend")):
            try:
                key, parked = parked_from_update(value)
                if key in missing and parked[0] >= month:
                    found[key] = parked  # the newest good one wins (a tenant's updates are in one partition)
            except Exception:  # noqa: BLE001 - an unreadable spend update is skipped here (the sink dead-letters it)
                continue
        store.put_many(found.items())
        missing -= set(found)
    for key in missing:
        log.error("spend-state of %s is damaged and no good copy was found (changelog, spend topic): it continues from "
                  "zero this month and may under-count; check the ledger", key)
    return damaged, missing


def charged_ids(sample: ev.GpuSample | ev.ComputeSample) -> tuple[str, str, str, str, str]:
    """The scope ids a GPU process row or a CPU sample charges. Unattributed time accrues to its tenant, or to the
    explicit tenant "unattributed": always the tenant of the sample's Kafka key (`sample.key`), so one worker,
    the owner of the tenant's usage partition, holds every part of its spend (tests/test_streams_spend.py)."""
    if sample.attributed and sample.tenant_id:
        return (sample.tenant_id, sample.team, sample.project, sample.agent_id, sample.session_id)
    return (sample.tenant_id or "unattributed", "", "", "", "")


def _remove_orphan_stores(state_dir: Path, group: str) -> None:
    """Store files of this group's workers that died without stopping (named <group>-<pid>-<tag>): a cache of
    the changelog, never read again."""
    for path in state_dir.glob(f"{group}-*-*.sqlite3"):
        pid = path.name[len(group) + 1:].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                path.unlink(missing_ok=True)
            except PermissionError:  # alive, another user's
                pass


class StreamWorker:
    def __init__(self, settings: Settings, catalog: Catalog | None = None, group_id: str | None = None,
                 checkpoint_interval: float = 5.0, publish_interval: float = 1.0, dedupe_per_partition: int = 100_000,
                 detector_config: DetectorConfig | None = None,
                 batch_size: int = 5000, session_idle: timedelta = timedelta(hours=1),
                 instance_id: str | None = None, consumer_overrides: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or load_catalog(settings.catalog)
        self.topics = {name: settings.topic(name) for name in ("usage", "gpu", "compute", "priced", "dlq", "spend", "anomalies")}
        self.state_topic = ensure_state_topic(settings)
        group_id = group_id or settings.group("streams")
        self.group_id, self.checkpoint_interval, self.batch_size = group_id, checkpoint_interval, batch_size
        self.publish_interval = min(publish_interval, checkpoint_interval)
        self.dedupe_per_partition, self.session_idle = dedupe_per_partition, session_idle
        self.dedupe = DedupeWindow(dedupe_per_partition)  # one per worker; capacity x usage partitions on assign
        self.tenant_partition: dict[str, int] = {}
        self.stats: Counter[str] = Counter()
        # one store file per worker (its instance id, else pid + a random tag: two workers of one process),
        # rebuilt from the changelog at each assignment, removed at stop
        state_dir = settings.streams_state_dir or settings.data_dir / "streams-state"
        name = f"{group_id}-{instance_id or f'{os.getpid()}-{uuid.uuid4().hex[:8]}'}".replace("/", "_")
        _remove_orphan_stores(Path(state_dir), group_id.replace("/", "_"))
        self.spend = SpendBook(StateStore(Path(state_dir) / f"{name}.sqlite3", settings.streams_state_cache_mib))
        self._damaged: list[Damaged] = []
        self.detectors = Detectors(detector_config)
        self.stream_now = datetime.min.replace(tzinfo=UTC)
        self._delivery_error: str | None = None
        self._refused_later: list[tuple[str, bytes | None, Any, KafkaError]] = []
        self.last_progress = time.monotonic()  # of the last batch processed or commit made (for a supervisor)
        self._suffix_now: datetime | None = None
        self._suffix = ""
        self._last_evict = time.monotonic()
        self.producer = Producer(settings.kafka_config(**{
            "enable.idempotence": True, "linger.ms": 20, "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000, "queue.buffering.max.kbytes": 65_536,  # bounded: backpressure via BufferError
            "batch.num.messages": 10_000, "on_delivery": self._on_delivery, "delivery.report.only.error": True,
        }))
        static = {"group.instance.id": instance_id} if instance_id else {}  # restart resumes without a session timeout
        # a batch that outlasts this has lost its partitions (librdkafka leaves the group): nothing of it is published
        self.max_poll_s = int((consumer_overrides or {}).get("max.poll.interval.ms", 300_000)) / 1000
        self.consumer = Consumer(settings.kafka_config(**static, **{
            "group.id": group_id, "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "fetch.min.bytes": 65536, "fetch.wait.max.ms": 50, "queued.max.messages.kbytes": 16_384,
            # range: a member gets the same partition indexes of usage and gpu (equal counts, both keyed by
            # tenant), so a tenant's token and GPU spend live in one worker. (cooperative-sticky does not.)
            "partition.assignment.strategy": "range", "on_commit": self._on_commit, **(consumer_overrides or {}),
        }))
        self._check_co_partitioned()

    def _restore(self) -> list[Damaged]:
        assert self.spend.store is not None
        damaged, lost = restore_spend(self.settings, self.spend.store)
        self.stats["spend_state_damaged"] += len(damaged)
        self.stats["spend_state_lost"] += len(lost)
        self.stats["spend_state_restored"] = len(self.spend.store)
        return damaged

    def _letter_damaged(self) -> None:
        """Dead-letter the changelog records the restore could not read (with why; their scopes kept their newest
        good state where one was found: restore_spend)."""
        damaged, self._damaged = self._damaged, []
        for d in damaged:
            self._letter(self.state_topic, d.partition, d.offset, d.value, d.raw_key, d.reason, "damaged_spend_state",
                         datetime.now(UTC))

    def _check_co_partitioned(self) -> None:
        counts = {name: len(self.consumer.list_topics(self.topics[name], timeout=10).topics[self.topics[name]].partitions)
                  for name in ("usage", "gpu", "compute")}
        for name in ("gpu", "compute"):
            if counts["usage"] and counts[name] and counts["usage"] != counts[name]:
                raise RuntimeError(f"{self.topics['usage']} has {counts['usage']} partitions and {self.topics[name]} {counts[name]}: "
                                   f"a tenant's token and {name} spend would be counted by different workers. Give both the "
                                   "same partition count (kafka-topics.sh --alter --partitions N on the smaller one).")

    # ------------------------------------------------------------------ loop
    def run(self, stop: threading.Event | None = None, exit_when_idle: float | None = None,
            until_caught_up: bool = False) -> Counter[str]:
        """Consume until `stop` is set, nothing arrived for exit_when_idle seconds, or (until_caught_up)
        every assigned partition is read to its end; checkpoints on exit."""
        stop = stop or threading.Event()
        gc.freeze()  # the catalog and price snapshot (long-lived) leave the collector's scans: fewer µs per event
        self.consumer.subscribe([self.topics["usage"], self.topics["gpu"], self.topics["compute"]], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=lambda c, p: self._on_revoke(c, p, commit="none"))  # lost: the group moved on
        next_checkpoint, idle_since = time.monotonic() + self.checkpoint_interval, time.monotonic()
        next_publish = time.monotonic() + self.publish_interval
        stalled = False
        try:
            while not stop.is_set():
                msgs = self.consumer.consume(self.batch_size, timeout=0.1)
                polled = time.monotonic()
                if msgs:
                    self.process(msgs)
                    self.last_progress = time.monotonic()
                    idle_since = time.monotonic()
                elif exit_when_idle is not None and time.monotonic() - idle_since > exit_when_idle:
                    break
                elif until_caught_up and self.caught_up():
                    break
                stalled = time.monotonic() - polled > self.max_poll_s
                if stalled:  # the group gave our partitions away: consume() reports it (on_lost), spend stays unpublished
                    continue
                if time.monotonic() >= next_checkpoint:
                    self.checkpoint()
                    next_checkpoint = time.monotonic() + self.checkpoint_interval
                    next_publish = time.monotonic() + self.publish_interval
                elif time.monotonic() >= next_publish:
                    self.publish_spend(TOP_SCOPES)  # fast path for budgets; sessions and agents wait for the checkpoint
                    next_publish = time.monotonic() + self.publish_interval
            if not stalled:
                self.checkpoint()
        finally:
            self.consumer.close()
            if self.spend.store is not None:
                self.spend.store.close()  # a cache of the changelog: the next start rebuilds it
        return self.stats

    def caught_up(self) -> bool:
        """Every assigned partition consumed to its high watermark (and something is assigned)."""
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        positions = self.consumer.position(assigned)
        unread = [tp for tp in positions if tp.offset < 0]  # nothing consumed since start: where the group left off
        committed = {(tp.topic, tp.partition): tp.offset for tp in committed_offsets(self.consumer, unread)}
        for tp in positions:
            offset = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            high = partition_end(self.consumer, tp)  # a just-created topic may still be electing leaders
            if high > 0 and offset < high:
                return False
        return True

    def process(self, msgs: list[Any]) -> None:
        """One consumed batch: usage events through the hot path, GPU samples after them. Per-event work
        stays in locals; counters per batch. A record that fails is dead-lettered and the batch goes on
        (module docstring, Faults: the order of the stages below is what makes a failure leave no charge)."""
        usage_topic, now = self.topics["usage"], datetime.now(UTC)
        latest = now + ev.MAX_FUTURE_SKEW  # the newest acceptable event time, once per batch
        dedupe = self.dedupe
        window, capacity, tenant_index = dedupe.ids, dedupe.capacity, dedupe.tenant_index
        first_copy, tenant_partition = window.get, self.tenant_partition
        price, unpriced_counts = self.catalog.price_pico, self.catalog.unpriced
        detect, rows = self.detectors.usage, []  # rows: spend, charged once per batch
        priced_json = self._priced_v2 if self.settings.priced_format == "v2" else self._priced_json  # METERLINE_PRICED_FORMAT
        charge, month_of, last_minute = rows.append, spend_month, -1
        produce, priced_topic = self.producer.produce, self.topics["priced"]
        gpu_samples, compute_samples, newest = [], [], self.stream_now
        compute_topic = self.topics["compute"]
        priced = duplicates = unpriced_events = 0
        for msg in msgs:
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", msg.error())
                continue
            if msg.topic() == compute_topic:
                sample = self._decode_or_dlq(msg, ev.ComputeSample, now)
                if sample is not None:
                    compute_samples.append((msg, sample))
                continue
            if msg.topic() != usage_topic:
                sample = self._decode_or_dlq(msg, ev.GpuSample, now)
                if sample is not None:
                    gpu_samples.append((msg, sample))
                continue
            stage = "decode"
            try:  # one try per record (free in 3.11 unless it raises); `stage` names the step for the reason
                raw = msg.value()
                if raw is None:
                    raise ev.InvalidEvent("UsageEvent", [("(record)", "empty record (tombstone)")])
                event = decode_usage(raw, latest=latest)
                stage = "dedupe"
                event_id, digest, tenant = event.event_id.int, usage_digest(event), event.tenant_id
                known = first_copy(event_id)
                if known is not None:  # first write wins: a retry is dropped, another body is refused
                    if known & M64 == digest & M64:
                        duplicates += 1
                    else:
                        self._conflicting_duplicate(msg, event, dedupe.unpack(known), now)
                    continue
                stage = "pricing"
                listed = price(event)
                if event.cost_usd is not None:
                    cost, source, unpriced = to_pico(event.cost_usd), "provider", False
                elif listed is not None:
                    cost, source, unpriced = listed[4], "catalog", False
                else:
                    cost, source, unpriced = 0, "unpriced", True
                body = priced_json(event, cost, listed or NO_PARTS, source, now)
                stage = "anomaly detection"  # before spend: detector state is advisory, spend is money
                ts = event.ts
                second = ts.toordinal() * 86400 + ts.hour * 3600 + ts.minute * 60 + ts.second  # anomalies.second_of, inlined
                found = detect(event, cost, unpriced, second)
                stage = "spend"  # charges every scope or none (module docstring)
                minute = second // 60
                if minute != last_minute:  # its month (cached): what SpendBook could fail on, computed here
                    month_of(minute)
                    last_minute = minute
                charge(((tenant, event.team, event.project, event.agent_id, event.session_id), minute, cost,
                        event.input_tokens, event.output_tokens, unpriced))
                stage = "producing the priced record"
                try:
                    produce(priced_topic, body, tenant)
                except BufferError:
                    self._produce(priced_topic, body, tenant, refused_to_dlq=False)
            except Exception as exc:  # noqa: BLE001 - one record's failure, whatever it is, is that record's
                if stage == "producing the priced record" and self._is_per_record(exc):
                    rows.pop()  # refused: not charged
                self._failed(msg, stage, exc, now)
                continue
            # charged: the rest cannot fail on its own
            index = tenant_index.get(tenant)
            if index is None:  # a new tenant (index_of may rebuild the window and its table)
                index = dedupe.index_of(tenant)
                window, tenant_index = dedupe.ids, dedupe.tenant_index
                first_copy = window.get
            window[event_id] = (digest & M64) | ((msg.offset() + 1) & M48) << 64 | (msg.partition() + 1) << 112 | index << 128  # as pack()
            if len(window) > capacity:
                del window[next(iter(window))]
            priced += 1
            tenant_partition[tenant] = msg.partition()
            if unpriced:
                unpriced_counts[(event.provider, event.model or event.tool)] += 1
                unpriced_events += 1
            if ts > newest:
                newest = ts
            if found:
                for anomaly in found:
                    self._anomaly(anomaly)
        self.spend.add_many(rows)  # after every record's own stages (the rows of records that failed are not in it)
        self.stream_now = newest
        stats = self.stats
        if priced:
            stats["priced"] += priced
        if unpriced_events:
            stats["unpriced"] += unpriced_events
        if duplicates:
            stats["duplicates"] += duplicates
        if gpu_samples:
            self._gpu(gpu_samples, now)
        if compute_samples:
            self._compute(compute_samples, now)

    @staticmethod
    def _is_per_record(exc: BaseException) -> bool:
        """Not a Kafka error, or one that concerns only this record (its size or shape)."""
        return not isinstance(exc, KafkaException) or exc.args[0].code() in PER_RECORD_ERRORS

    def _failed(self, msg: Any, stage: str, exc: Exception, now: datetime) -> None:
        """Dead-letter the record that `stage` failed on; a Kafka error that concerns every record propagates."""
        if not self._is_per_record(exc):
            raise exc
        if isinstance(exc, ev.InvalidEvent):
            self._dead_letter(msg, exc.reason, "InvalidEvent", now)
            return
        log.warning("%s failed for %s[%s]@%s: %r", stage, msg.topic(), msg.partition(), msg.offset(), exc)
        error_type = exc.args[0].name() if isinstance(exc, KafkaException) else type(exc).__name__
        message = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
        self._dead_letter(msg, f"{stage} failed: {message}", error_type, now)

    def _conflicting_duplicate(self, msg: Any, event: Any, first: tuple[int, str, int, int], now: datetime) -> None:
        """An event id seen before with another body: refused (dead letter) and raised (anomaly); never charged."""
        _, first_tenant, partition, offset = first
        topic = msg.topic()
        reason, anomaly = conflicting_duplicate("event_id", str(event.event_id), (first_tenant, f"{topic}[{partition}]@{offset}"),
                                                (event.tenant_id, f"{topic}[{msg.partition()}]@{msg.offset()}"), stage="streams")
        self._dead_letter(msg, reason, "conflicting_duplicate", now)
        self._anomaly(anomaly)
        self.stats["conflicting_duplicates"] += 1

    def _priced_json(self, event: Any, cost: int, parts: tuple[int, ...], source: str, now: datetime) -> bytes:
        """PricedEvent JSON: the usage fields (cost_usd = the charge) + price fields, without building a model."""
        if now is not self._suffix_now:  # once per batch
            self._suffix_now = now
            self._suffix = f',"catalog_version":{msgspec.json.encode(self.catalog.version).decode()},"priced_at":"{now.isoformat().replace("+00:00", "Z")}"}}'
        prices = (f',"list_cost_usd":"{usd(parts[4])}","input_cost_usd":"{usd(parts[0])}","output_cost_usd":"{usd(parts[1])}",'
                  f'"cache_read_cost_usd":"{usd(parts[2])}","cache_write_cost_usd":"{usd(parts[3]) if parts[3] else ZERO_USD}",'
                  f'{_sheet_json(parts)}"cost_source":"{source}"{self._suffix}')
        if type(event) is FastUsage:
            event.cost_usd = usd(cost)
            head = encode(event)
        else:
            record = dict(event)
            record["cost_usd"] = usd(cost)
            head = encode(record)
        return head[:-1] + prices.encode()

    def _priced_v2(self, event: Any, cost: int, parts: tuple[int, ...], source: str, now: datetime) -> bytes:
        """The PricedEvent as priced.v2 (streams/codec.py): integer pico-USD as they are, no JSON, no money strings."""
        return PRICED_V2.write(event, cost, parts, source, self.catalog.version, now)

    # ------------------------------------------------------------------- GPU
    def _gpu(self, samples: list[tuple[Any, ev.GpuSample]], now: datetime) -> None:
        """Charge process rows (each row carries its share of a device that processes share); same
        order as usage: what can fail on its own before spend."""
        for msg, sample in samples:
            stage = "pricing"
            try:
                gpu_ps = cost = 0
                unpriced = False
                try:
                    seconds, usd_cost = self.catalog.gpu_sample_cost(sample)
                    gpu_ps, cost = to_pico(seconds), to_pico(usd_cost)
                except LookupError:
                    unpriced = True
                stage = "anomaly detection"
                found = self.detectors.gpu(sample, gpu_ps, cost)
                stage = "spend"
                if sample.level == "process":
                    ids = charged_ids(sample)
                    self.spend.add(ids, sample.ts, cost, gpu_ps=gpu_ps, gpu_cost=cost, events=0)
                    self.tenant_partition[ids[0]] = msg.partition()  # dropped on revoke like a usage tenant
            except Exception as exc:  # noqa: BLE001 - one sample's failure is that sample's
                self._failed(msg, stage, exc, now)
                continue
            self.stats["gpu_samples"] += 1
            if unpriced:
                self.stats["gpu_unpriced"] += 1
            for anomaly in found:
                self._anomaly(anomaly)

    # ------------------------------------------------------------ CPU, memory
    def _compute(self, samples: list[tuple[Any, ev.ComputeSample]], now: datetime) -> None:
        """CPU and memory cost (`collect node`) into spend, like GPU process rows: unattributed rows accrue to
        tenant "unattributed"; a node class the catalog lacks is counted (compute_unpriced), charged 0."""
        for msg, sample in samples:
            stage = "pricing"
            try:
                try:
                    cost = sum(to_pico(part) for part in self.catalog.compute_sample_cost(sample))
                    unpriced = False
                except LookupError:
                    cost, unpriced = 0, True
                stage = "anomaly detection"
                found = self.detectors.compute(sample, cost)  # idle reserved CPU
                stage = "spend"
                ids = charged_ids(sample)
                self.spend.add(ids, sample.ts, cost, events=0, cpu_ps=to_pico(sample.cpu_seconds))  # vCPU-hour budgets
                self.tenant_partition[ids[0]] = msg.partition()  # dropped on revoke like a usage tenant
            except Exception as exc:  # noqa: BLE001 - one sample's failure is that sample's
                self._failed(msg, stage, exc, now)
                continue
            self.stats["compute_samples"] += 1
            if unpriced:
                self.stats["compute_unpriced"] += 1
            for anomaly in found:
                self._anomaly(anomaly)

    # ------------------------------------------------------------- outputs
    def _decode_or_dlq(self, msg: Any, contract: type, now: datetime) -> Any | None:
        try:
            if msg.value() is None:
                raise ev.InvalidEvent(contract.__name__, [("(record)", "empty record (tombstone)")])
            return ev.decode(contract, msg.value())
        except Exception as exc:  # noqa: BLE001 - a record that cannot be decoded, for any reason, is that record's
            self._failed(msg, "decode", exc, now)
            return None

    def _dead_letter(self, msg: Any, reason: str, error_type: str, now: datetime) -> None:
        self._letter(msg.topic(), msg.partition(), msg.offset(), msg.value(), msg.key(), reason, error_type, now)

    def _letter(self, topic: str, partition: int, offset: int, raw: bytes | None, key: Any, reason: str,
                error_type: str, now: datetime) -> None:
        """A DeadLetter that always fits the dlq topic: a long payload keeps its head (+ length and SHA-256),
        a long key its head (the key only picks the dlq partition)."""
        payload, reason = ev.dead_letter_payload(raw, reason)
        letter = {"dlq_id": ev.new_id(), "ts": now, "stage": "streams", "source_topic": topic, "partition": partition,
                  "offset": offset, "reason": reason, "error_type": error_type, "payload_b64": payload}
        self._produce(self.topics["dlq"], encode(letter), key[:MAX_DLQ_KEY] if key else key)
        self.stats["dead_letters"] += 1

    def _anomaly(self, anomaly: ev.Anomaly) -> None:
        body = anomaly.to_json()
        self._produce(self.topics["anomalies"], body, anomaly.tenant_id)
        self.stats["anomalies"] += 1

    def _produce(self, topic: str, value: bytes, key: Any, refused_to_dlq: bool = True) -> None:
        """produce(), waiting for room in the queue. A record Kafka refuses on its own (too large, invalid)
        becomes a dead letter (refused_to_dlq) instead of stopping the worker; other Kafka errors raise."""
        while True:
            try:
                self.producer.produce(topic, value, key)
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                if not refused_to_dlq or exc.args[0].code() not in PER_RECORD_ERRORS:
                    raise
                self._refused(topic, value, key, exc.args[0])
                return

    def _refused(self, topic: str, value: bytes | None, key: Any, err: KafkaError) -> None:
        """An output record Kafka refused on its own: to the dlq (bounded); a refused dead letter is logged
        and counted (with the bound it cannot be too large; there is nowhere left to send it)."""
        if topic == self.topics["dlq"]:
            log.error("a dead letter was refused (%s) and is lost: %r", err, (value or b"")[:2000])
            self.stats["dead_letters_lost"] += 1
            return
        self.stats["refused_outputs"] += 1
        self._letter(topic, -1, -1, value, key, f"producing to {topic} failed: {err.str()}", err.name(), datetime.now(UTC))

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            return
        if err.code() in PER_RECORD_ERRORS:  # this record only: dead-lettered at the checkpoint, not a stall
            self._refused_later.append((msg.topic(), msg.value(), msg.key(), err))
        elif self._delivery_error is None:
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
        while self._refused_later:  # records the broker refused on their own: dead letters, not a stall
            refused, self._refused_later = self._refused_later, []
            for topic, value, key, err in refused:
                self._refused(topic, value, key, err)
            remaining = self.producer.flush(60)
        if remaining or self._delivery_error:
            raise RuntimeError(f"could not deliver to Kafka ({self._delivery_error or f'{remaining} records pending'}); "
                               "offsets were not committed, a restart replays from the last checkpoint")
        if commit != "none" and commit_offsets(self.consumer, asynchronous=commit == "async"):
            self.last_progress = time.monotonic()
        # no event read yet (a restart on a quiet pipeline): no stream time to age states by (datetime.min - idle overflows)
        if self.stream_now.year > 1 and time.monotonic() - self._last_evict > 60:
            self._last_evict = time.monotonic()
            self.stats["evicted_scopes"] += self.spend.evict_idle(self.stream_now, self.session_idle)

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:  # the next checkpoint commits again
            self.stats["commit_failures"] += 1
            log.warning("offset commit failed (%s); the next checkpoint retries", err)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # every assignment, the first too: the store is rebuilt from the changelog as it is now, after the previous
        # owners' revoke checkpoints (eager rebalance: they flushed before this assignment was handed out); what
        # was evicted here was published there first. Newly owned tenants continue from it.
        self._damaged = self._restore()
        self._letter_damaged()
        owned = sum(1 for p in partitions if p.topic == self.topics["usage"])  # range: the whole assignment
        self.dedupe.capacity = self.dedupe_per_partition * max(owned, 1)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition], commit: str = "sync") -> None:
        # Every tenant charged here, by usage or by samples (co-partitioned: one index), leaves memory with its
        # partition: a copy kept would miss the next owner's share and, should the partition come back, be
        # continued instead of the changelog's total (an under-count written over the true one).
        # A lost assignment publishes none of their spend (dropped first): the new owner, maybe counting already,
        # replays the uncommitted input; a late copy from here, short of its share, would be the scopes' newest record.
        if commit != "none":
            self.checkpoint(commit)
        topics = self.topics
        self.dedupe.forget_partitions({p.partition for p in partitions if p.topic == topics["usage"]})  # the new owner's window
        lost = {p.partition for p in partitions if p.topic in (topics["usage"], topics["gpu"], topics["compute"])}
        gone = {t for t, p in self.tenant_partition.items() if p in lost}
        self.spend.drop_tenants(gone)
        for tenant in gone:
            del self.tenant_partition[tenant]
        if commit == "none":
            self.checkpoint(commit)  # the other outputs still go out (at-least-once; the ledger dedupes priced rows)

__all__ = ["StreamWorker", "charged_ids", "DedupeWindow", "usage_digest", "commit_offsets", "restore_spend", "ensure_state_topic", "PICO"]
