"""Helpers for the collectors tests: read a whole topic from the real broker."""
from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, KafkaException, TopicPartition

from meterline.settings import Settings

WAIT_S = 120  # a safety net so a broken build fails instead of hanging; not a performance assertion


def topic_size(settings: Settings, topic: str) -> int | None:
    """Messages in the topic (sum of high watermarks), or None while the broker cannot say yet."""
    consumer = Consumer(settings.kafka_config(**{"group.id": "size", "enable.auto.commit": False}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    except KafkaException:  # e.g. NOT_LEADER right after the topic was created
        return None
    finally:
        consumer.close()


def wait_for(condition, what: str, timeout: float = WAIT_S, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"gave up waiting for {what}")


def read_topic(settings: Settings, topic: str, at_least: int) -> list:
    """Every message in `topic` once at least `at_least` exist (all of them, so duplicates show)."""
    total = wait_for(lambda: (n := topic_size(settings, topic)) is not None and n >= at_least and n,
                     f"{at_least} messages in {topic}")
    consumer = Consumer(settings.kafka_config(**{"group.id": f"read-{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                                                 "enable.auto.commit": False}))
    consumer.subscribe([topic])
    messages = []
    try:
        deadline = time.monotonic() + WAIT_S
        while len(messages) < total and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    messages.append(msg)
    finally:
        consumer.close()
    assert len(messages) == total, f"read {len(messages)} of {total} messages"
    return messages
