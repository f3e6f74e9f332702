"""Broker outage: a broker of the test's own is stopped and started again; every event arrives exactly once."""
from __future__ import annotations

from confluent_kafka import Producer

from brokers import free_port
from collectors_kafka import read_topic, wait_for
from meterline.collectors import Meter
from meterline.schemas import decode
from meterline.schemas.events import UsageEvent


def test_events_recorded_during_an_outage_arrive_exactly_once(own_broker):
    broker, _, settings = own_broker
    meter = Meter(settings, tenant_id="acme", agent_id="outage", delivery_timeout_ms=3000)
    expected = []
    for i in range(20):
        meter.record_llm("openai", "gpt-4o", 10, i)
        expected.append(("llm_call", 10, i, 0))
    assert meter.flush(60), "the broker is up: everything should be delivered"

    broker.stop()
    for i in range(30):
        meter.record_llm("openai", "gpt-4o", 20, i)
        expected.append(("llm_call", 20, i, 0))
    wait_for(lambda: meter.stats.spooled >= 30 and not len(meter.sender._producer), "the 30 events to be spooled")
    assert meter.sender.outage and meter.stats.dropped == 0

    broker.start(timeout=180)
    for i in range(10):
        meter.record_tool("search", latency_ms=i)
        expected.append(("tool_call", 0, 0, i))
    assert meter.flush(120), "after the restart the spool should drain"
    meter.close()

    events = [decode(UsageEvent, m.value()) for m in read_topic(settings, settings.topic("usage"), len(expected))]
    assert len({e.event_id for e in events}) == len(events) == len(expected), "every event exactly once"
    assert sorted((e.kind, e.input_tokens, e.output_tokens, e.latency_ms) for e in events) == sorted(expected)
    assert meter.stats.replayed >= 30 and meter.stats.outages >= 1 and meter.stats.dropped == 0
    assert not any(meter.sender.spool_dir.glob("*.seg")), "nothing left behind on disk"


def test_a_producer_left_with_no_usable_broker_is_replaced_and_the_spool_drains(settings):
    """The chaos run's stuck meter: an outage whose producer no longer reaches any broker while the broker answers
    (librdkafka waiting in rd_kafka_broker_any_usable for minutes). Modelled with a producer pointed at a closed port."""
    closed = free_port()  # nothing listens there
    meter = Meter(settings, tenant_id="acme", agent_id="stale", register_pid=False)
    sender = meter.sender
    live, sender._producer = sender._producer, Producer({"bootstrap.servers": f"127.0.0.1:{closed}", "log_level": 0})
    live.flush(10)
    sender._outage = True
    for i in range(5):
        meter.record_llm("openai", "gpt-4o", 30, i)
    wait_for(lambda: meter.stats.spooled == 5, "the 5 events to be spooled")
    assert meter.flush(120), "the broker answers: a new producer should deliver the spool"
    meter.close()
    events = [decode(UsageEvent, m.value()) for m in read_topic(settings, settings.topic("usage"), 5)]
    assert sorted(e.output_tokens for e in events) == list(range(5)) and meter.stats.dropped == 0
