"""The topic catalog and an idempotent `topics create`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
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
    # A topic created a moment ago may be listed with no partitions yet: count them once it has its leaders.
    ready = _wait_for_leaders(admin, [name for name in wanted if name in listed], timeout)
    existing = {name: len(meta.partitions) for name, meta in ready.items()}
    result = {name: "exists" for name in wanted if name in existing}
    short = [NewPartitions(name, s.partitions) for name, s in wanted.items() if 0 < existing.get(name, 0) < s.partitions]
    for name, future in (admin.create_partitions(short, operation_timeout=timeout) if short else {}).items():
        future.result(timeout)  # e.g. gpu: 6 -> 12, to match usage (its keys move to their new partitions)
        result[name] = f"grown to {wanted[name].partitions}"
    missing = [NewTopic(name, s.partitions, replication_factor, config=s.config) for name, s in wanted.items() if name not in existing]
    for name, future in (admin.create_topics(missing, operation_timeout=timeout) if missing else {}).items():
        try:
            future.result(timeout)
            result[name] = "created"
        except KafkaException as err:
            if err.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: another process won the race
                raise
            result[name] = "exists"
    _wait_for_leaders(admin, list(wanted), timeout)
    return dict(sorted(result.items()))


def _wait_for_leaders(admin: AdminClient, topics: list[str], timeout: float) -> dict:
    """Once every partition of `topics` has a leader, return the metadata that showed it: a new topic's
    partitions answer NOT_LEADER for a moment, and clients that start right away would trip on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin.list_topics(timeout=timeout).topics
        if all(t in meta and meta[t].partitions and not meta[t].error
               and all(p.leader >= 0 and not p.error for p in meta[t].partitions.values()) for t in topics):
            return meta
        time.sleep(0.1)
    raise TimeoutError(f"topics {topics} have partitions without a leader after {timeout:.0f} s")
