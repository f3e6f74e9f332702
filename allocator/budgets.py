"""Budget policies on the compacted budgets topic (key = policy_id, tombstone = delete)."""
from __future__ import annotations

import os
import time
import uuid

from meterline.schemas.events import BudgetPolicy, InvalidEvent, decode

from ._kafka import assign_from_beginning, caught_up


def _producer(settings):
    from confluent_kafka import Producer

    return Producer(settings.kafka_config(**{"enable.idempotence": True, "linger.ms": 0}))


CHANGED_BY = "changed_by"  # record header: who set or deleted the policy (the ledger keeps it for audit)


def publish_policy(settings, policy: BudgetPolicy, changed_by: str | None = None) -> None:
    producer = _producer(settings)
    producer.produce(settings.topic("budgets"), key=policy.policy_id.encode(), value=policy.to_json(),
                     headers=_author(changed_by))
    if producer.flush(15):
        raise RuntimeError(f"the budget was not acknowledged by {settings.bootstrap} within 15 s")


def delete_policy(settings, policy_id: str, changed_by: str | None = None) -> None:
    producer = _producer(settings)
    producer.produce(settings.topic("budgets"), key=policy_id.encode(), value=None, headers=_author(changed_by))
    if producer.flush(15):
        raise RuntimeError(f"the delete was not acknowledged by {settings.bootstrap} within 15 s")


def _author(changed_by: str | None) -> list[tuple[str, bytes]]:
    """Who changes a budget: an API token's name, else the local user of the CLI."""
    if changed_by is None:
        import getpass

        try:
            changed_by = f"cli:{getpass.getuser()}"
        except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
            changed_by = f"cli:uid {os.getuid()}"
    return [(CHANGED_BY, changed_by.encode())]


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
