"""Small confluent-kafka helpers shared by the service, the guard and the budget commands."""
from __future__ import annotations

from meterline.topics import partition_ends

ANNOUNCE_HEADER = "meterline-announce"   # on a zero-cost SpendUpdate: a guard's session wants a lease; value = its class
NEED_HEADER = "meterline-need"           # ... the USD its waiting call needs
SPENT_HEADER = "meterline-spent"         # ... and what it has spent this lease period, as its guard counts
RELEASE_HEADER = "meterline-release"     # ... it gives back its lease above what it spent; value = the ceiling it held
GPU_WAIT_HEADER = "meterline-gpu-wait"   # ... it waits for this many GPUs (a scheduler's queue; 0: no longer waits)


def assign_from_beginning(consumer, topic: str, timeout: float = 30.0) -> dict[int, int]:
    """Assign every partition of a (compacted) topic from offset 0; returns the ends at assignment."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    ends = partition_ends(consumer, topic, timeout)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    return ends


def assign_from_time(consumer, topics: list[str], since_ms: int, timeout: float = 30.0) -> None:
    """Assign every partition of `topics` from the first record at or after `since_ms` (epoch ms)."""
    from confluent_kafka import OFFSET_END, TopicPartition

    wanted = [TopicPartition(t, p, since_ms) for t in topics for p in partition_ends(consumer, t, timeout)]
    found = consumer.offsets_for_times(wanted, timeout=timeout)
    consumer.assign([TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END) for tp in found])


def caught_up(consumer, ends: dict[int, int]) -> bool:
    """Has the consumer's position reached `ends` on every partition? (Works when compaction
    removed the last offsets, where waiting to *see* the record at end-1 would never finish.)"""
    positions = {tp.partition: tp.offset for tp in consumer.position(consumer.assignment())}
    return all(positions.get(p, -1) >= end or end == 0 for p, end in ends.items())
