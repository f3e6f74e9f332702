"""Budget policies on the compacted budgets topic (key = policy_id, tombstone = delete)."""
from __future__ import annotations

import time
import uuid

from meterline.schemas.events import BudgetPolicy, InvalidEvent, decode

from ._kafka import assign_from_beginning, caught_up


def _producer(settings):
    from confluent_kafka import Producer

    return Producer(settings.kafka_config(**{"enable.idempotence": True, "linger.ms": 0}))


def publish_policy(settings, policy: BudgetPolicy) -> None:
    producer = _producer(settings)
    producer.produce(settings.topic("budgets"), key=policy.policy_id.encode(), value=policy.to_json())
    if producer.flush(15):
        raise RuntimeError(f"the budget was not acknowledged by {settings.bootstrap} within 15 s")


def delete_policy(settings, policy_id: str) -> None:
    producer = _producer(settings)
    producer.produce(settings.topic("budgets"), key=policy_id.encode(), value=None)
    if producer.flush(15):
        raise RuntimeError(f"the delete was not acknowledged by {settings.bootstrap} within 15 s")


def read_policies(settings, timeout: float = 15.0) -> dict[str, BudgetPolicy]:
    """Every live policy: the topic read from the beginning to its current end."""
    from confluent_kafka import Consumer

    topic = settings.topic("budgets")
    consumer = Consumer(settings.kafka_config(**{"group.id": f"meterline-budgets-{uuid.uuid4().hex}", "enable.auto.commit": False}))
    try:
        ends = assign_from_beginning(consumer, topic, timeout)
        partitions = list(ends)
        policies: dict[str, BudgetPolicy] = {}
        positions = {p: 0 for p in partitions}
        deadline = time.monotonic() + timeout
        while any(positions[p] < end for p, end in ends.items()):
            msg = consumer.poll(0.5)
            if msg is None:
                if caught_up(consumer, ends):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {topic} stalled at {positions} of {ends}")
                continue
            if msg.error():
                continue
            positions[msg.partition()] = msg.offset() + 1
            apply_policy_record(policies, msg.key(), msg.value())
        return policies
    finally:
        consumer.close()


def apply_policy_record(policies: dict[str, BudgetPolicy], key: bytes | None, value: bytes | None) -> BudgetPolicy | str | None:
    """Fold one budgets-topic record into `policies`. Returns the policy, the deleted id, or None if unreadable."""
    if key is None:
        return None
    if value is None:
        policies.pop(key.decode(), None)
        return key.decode()
    try:
        policy = decode(BudgetPolicy, value)
    except InvalidEvent:
        return None
    policies[policy.policy_id] = policy
    return policy
