"""The OpenTelemetry bridge, with a real TracerProvider: GenAI spans become usage events, others are ignored."""
from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode

from collectors_kafka import read_topic
from meterline.collectors import Meter
from meterline.collectors.otel import MeterSpanProcessor
from meterline.schemas import decode
from meterline.schemas.events import UsageEvent


class Collected:
    def __init__(self):
        self.events: list[UsageEvent] = []

    def send(self, event: UsageEvent) -> None:
        self.events.append(event)


def _tracer(sink, resource: dict | None = None, **defaults):
    provider = TracerProvider(resource=Resource.create(resource or {}))
    processor = MeterSpanProcessor(sink, **defaults)
    provider.add_span_processor(processor)
    return provider.get_tracer("test"), processor


def test_genai_spans_become_usage_events_and_other_spans_are_ignored():
    sink = Collected()
    tracer, processor = _tracer(sink, {"meterline.tenant_id": "acme", "meterline.team": "search", "service.name": "agent"})
    with tracer.start_as_current_span("agent run"):  # no gen_ai usage: ignored
        with tracer.start_as_current_span("chat gpt-4o") as span:
            span.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
                "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 80,
                "gen_ai.usage.cache_read.input_tokens": 1000, "gen_ai.conversation.id": "conv-7",
                "gen_ai.agent.id": "planner", "meterline.project": "rag", "meterline.priority": "high",
            })
        with tracer.start_as_current_span("http GET"):
            pass
    assert (processor.metered, processor.ignored, processor.invalid) == (1, 2, 0)
    [event] = sink.events
    assert (event.tenant_id, event.team, event.project, event.agent_id, event.session_id, event.priority) == (
        "acme", "search", "rag", "planner", "conv-7", "high")
    assert (event.kind, event.provider, event.model) == ("llm_call", "openai", "gpt-4o-2024-08-06")
    assert (event.input_tokens, event.output_tokens, event.cache_read_tokens, event.cache_write_tokens) == (1200, 80, 1000, 0)
    assert event.status == "ok" and event.attributes["operation"] == "chat" and len(event.attributes["trace_id"]) == 32


def test_legacy_system_attribute_span_attribution_and_error_status():
    sink = Collected()
    tracer, _ = _tracer(sink, {"meterline.tenant_id": "resource-tenant"}, team="default-team")
    with tracer.start_as_current_span("messages claude") as span:
        span.set_attributes({"gen_ai.system": "anthropic", "gen_ai.request.model": "claude-sonnet-4",
                             "gen_ai.usage.input_tokens": 370, "gen_ai.usage.output_tokens": 0,
                             "gen_ai.usage.cache_read.input_tokens": 300, "gen_ai.usage.cache_creation.input_tokens": 20,
                             "meterline.tenant_id": "span-tenant", "error.type": "timeout"})
        span.set_status(Status(StatusCode.ERROR))
    [event] = sink.events
    assert (event.provider, event.model, event.tenant_id, event.team) == ("anthropic", "claude-sonnet-4", "span-tenant", "default-team")
    # semconv: input_tokens counts the cached part too
    assert (event.input_tokens, event.cache_read_tokens, event.cache_write_tokens) == (370, 300, 20)
    assert event.status == "timeout"


def test_latency_comes_from_span_times():
    sink = Collected()
    tracer, _ = _tracer(sink, {"meterline.tenant_id": "acme"})
    span = tracer.start_span("chat", start_time=1_700_000_000_000_000_000,
                             attributes={"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1,
                                         "gen_ai.usage.output_tokens": 1})
    span.end(end_time=1_700_000_001_250_000_000)
    [event] = sink.events
    assert event.latency_ms == 1250 and event.ts.timestamp() == 1_700_000_001.25


def test_a_span_that_breaks_the_contract_is_counted_and_never_raises():
    sink = Collected()
    tracer, processor = _tracer(sink)  # no tenant anywhere
    with tracer.start_as_current_span("chat") as span:
        span.set_attributes({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5})
    with tracer.start_as_current_span("chat") as span:
        span.set_attributes({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": -5, "meterline.tenant_id": "a"})
    assert processor.invalid == 2 and sink.events == []


def test_spans_reach_kafka_through_a_meter(settings):
    meter = Meter(settings, tenant_id="sdk-tenant", register_pid=False)
    tracer, processor = _tracer(meter, {"meterline.tenant_id": "otel-tenant"})
    for i in range(3):
        with tracer.start_as_current_span("chat") as span:
            span.set_attributes({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                                 "gen_ai.usage.input_tokens": 10 + i, "gen_ai.usage.output_tokens": 1,
                                 "gen_ai.conversation.id": f"c-{i}"})
    assert processor.force_flush()
    meter.close()
    messages = read_topic(settings, settings.topic("usage"), 3)
    events = sorted((decode(UsageEvent, m.value()) for m in messages), key=lambda e: e.input_tokens)
    assert [(e.tenant_id, e.session_id, e.input_tokens) for e in events] == [
        ("otel-tenant", "c-0", 10), ("otel-tenant", "c-1", 11), ("otel-tenant", "c-2", 12)]
    assert {m.key() for m in messages} == {b"otel-tenant"}
