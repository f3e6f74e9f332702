"""The allocator service closes every Kafka client it opened when its start fails (the broker away at a restart).

A client left open is destroyed later by whichever thread's garbage collection finds it, its librdkafka threads
running until then; `up` restarts a died allocator on a thread beside the sink and the API.
"""
from __future__ import annotations

import confluent_kafka
import pytest
from confluent_kafka import KafkaException

from meterline.allocator import service

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("step", ["assign_from_beginning", "assign_from_time"])
def test_a_failed_start_closes_every_consumer_it_opened(settings, monkeypatch, step):
    opened = []

    class Recorded(confluent_kafka.Consumer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    def broker_away(*args, **kwargs):
        raise KafkaException("broker away")

    monkeypatch.setattr(confluent_kafka, "Consumer", Recorded)
    monkeypatch.setattr(service, step, broker_away)
    with pytest.raises(KafkaException):
        service.AllocatorService(settings).run(service.threading.Event())
    assert opened
    for consumer in opened:
        with pytest.raises(RuntimeError, match="closed"):
            consumer.assignment()
