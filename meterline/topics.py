"""The topic catalog, an idempotent `topics create`, and offsets read while leaders and coordinators move."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from .settings import Settings

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    purpose: str
    config: dict[str, str] = field(default_factory=dict)


CATALOG: tuple[TopicSpec, ...] = (
    TopicSpec("usage", 12, "usage events from SDKs and the OTel bridge, keyed by tenant_id", {"retention.ms": str(7 * DAY_MS)}),
    # As many partitions as usage: process rows are keyed by tenant_id and must land on the usage partition's index.
    TopicSpec("gpu", 12, "NVML samples: process rows keyed by tenant_id, GPU/MIG rows by node", {"retention.ms": str(7 * DAY_MS)}),
    # Keyed by tenant_id like gpu process rows, with as many partitions as usage.
    TopicSpec("compute", 12, "CPU and memory samples of processes and cgroups (collect node), keyed by tenant_id",
              {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec("priced", 12, "usage events with their exact price, keyed by tenant_id", {"retention.ms": str(7 * DAY_MS)}),
    TopicSpec("spend", 6, "real-time spend per scope, keyed by tenant_id", {"retention.ms": str(3 * DAY_MS)}),
    TopicSpec("anomalies", 3, "cost anomalies, keyed by tenant_id", {"retention.ms": str(30 * DAY_MS)}),
    TopicSpec("control", 6, "throttle decisions, latest per scope (compacted)",
              {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(3600 * 1000)}),
    TopicSpec("budgets", 1, "budget policies, latest per policy_id (compacted)", {"cleanup.policy": "compact"}),
    TopicSpec("gpu-allocations", 1, "who holds each GPU or MIG slice, and when (app/gpu_idle.py charges them its idle time)",
              {"cleanup.policy": "compact"}),
    TopicSpec("scale", 3, "replicas recommended per inference endpoint, latest per endpoint (compacted; allocator/endpoints.py)",
              {"cleanup.policy": "compact"}),
    TopicSpec("spend-state", 6, "the stream worker's spend per scope, latest per scope (compacted changelog)",
              {"cleanup.policy": "compact", "segment.ms": "600000"}),
    TopicSpec("dlq", 3, "records that failed validation, with the reason and original bytes", {"retention.ms": str(30 * DAY_MS)}),
)


def catalog_by_name() -> dict[str, TopicSpec]:
    return {spec.name: spec for spec in CATALOG}


def create_topics(settings: Settings, replication_factor: int = 1, timeout: float = 30.0) -> dict[str, str]:
    """Create every catalog topic that is missing, and add partitions to one that has fewer than the
    catalog says (never fewer: Kafka cannot). Returns {topic: 'created' | 'exists' | 'grown to N'}."""
    admin = AdminClient(settings.kafka_config())
    wanted = {settings.topic(s.name): s for s in CATALOG}
    listed = admin.list_topics(timeout=timeout).topics
    result, present = {}, [name for name in wanted if name in listed]
    missing = [NewTopic(name, s.partitions, replication_factor, config=s.config) for name, s in wanted.items() if name not in listed]
    for name, future in (admin.create_topics(missing, operation_timeout=timeout) if missing else {}).items():
        try:
            future.result(timeout)
            result[name] = "created"
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # made by another client a moment ago, not listed yet
                raise
            present.append(name)  # and perhaps with fewer partitions, like a listed one
    # A topic created a moment ago may be listed with no partitions yet, or not at all: count once it has its leaders.
    existing = {name: len(meta.partitions) for name, meta in _wait_for_leaders(admin, dict.fromkeys(present, 1), timeout).items()}
    short = [NewPartitions(name, wanted[name].partitions) for name in present if existing[name] < wanted[name].partitions]
    result |= {name: "exists" for name in present}
    for name, future in (admin.create_partitions(short, operation_timeout=timeout) if short else {}).items():
        future.result(timeout)  # e.g. gpu: 6 -> 12, to match usage (its keys move to their new partitions)
        result[name] = f"grown to {wanted[name].partitions}"
    _wait_for_leaders(admin, {name: s.partitions for name, s in wanted.items()}, timeout)  # as the catalog says, for clients starting now
    return dict(sorted(result.items()))


def _wait_for_leaders(admin: AdminClient, topics: dict[str, int], timeout: float) -> dict:
    """Once each of `topics` has at least its number of partitions, each with a leader, return the metadata that
    showed it: a new topic's partitions answer NOT_LEADER for a moment, and clients that start right away would trip on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin.list_topics(timeout=timeout).topics
        if all(t in meta and len(meta[t].partitions) >= n and not meta[t].error
               and all(p.leader >= 0 and not p.error for p in meta[t].partitions.values()) for t, n in topics.items()):
            return meta
        time.sleep(0.1)
    raise TimeoutError(f"topics {sorted(topics)} have partitions without a leader after {timeout:.0f} s")


# what a watermark read answers while a partition's leader moves or a just-created topic still elects one
LEADER_MOVING = frozenset((KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                           KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT, KafkaError._TRANSPORT))


def partition_end(consumer, tp: TopicPartition, timeout: float = 30.0) -> int:
    """A partition's high watermark, waiting out a leader that moves (a bare read fails a caller on the first blip)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=min(10.0, max(deadline - time.monotonic(), 1.0)))[1]
        except KafkaException as exc:
            error = exc.args[0]
            if not (error.code() in LEADER_MOVING or error.retriable()) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def partition_ends(consumer, topic: str, timeout: float = 30.0) -> dict[int, int]:
    """High watermark per partition of `topic`; retries while a fresh topic has no partitions or leaders yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            if not partitions:
                raise KafkaException(f"topic {topic} has no partitions yet")
            return {p: partition_end(consumer, TopicPartition(topic, p), max(deadline - time.monotonic(), 0)) for p in partitions}
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# what a commit or a committed() read answers while the group coordinator moves or loads, or a request times out
COORDINATOR_MOVING = frozenset((KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.NOT_COORDINATOR,
                                KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.REQUEST_TIMED_OUT,
                                KafkaError._TIMED_OUT, KafkaError._TRANSPORT))


def committed_offsets(consumer, tps: list[TopicPartition], timeout: float = 30.0) -> list[TopicPartition]:
    """The consumer group's committed offsets of `tps` (-1001 where none), waiting out a coordinator that moves or
    loads: on a fresh broker the first group creates __consumer_offsets and answers NOT_COORDINATOR meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.committed(tps, timeout=min(10.0, max(deadline - time.monotonic(), 1.0))) if tps else []
        except KafkaException as exc:
            error = exc.args[0]
            if not (error.code() in COORDINATOR_MOVING or error.retriable()) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
