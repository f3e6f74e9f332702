"""The OpenTelemetry bridge with a real TracerProvider: every dialect's GenAI spans become usage events
(collectors/genai.py's table), nested layers of one call become one event, failed and unmetered
calls are visible, and attribution flows from the caller's span, baggage (across a W3C-propagated
boundary), the resource and the processor's defaults. Other spans are ignored."""
from __future__ import annotations

import dataclasses
import threading

import pytest
from opentelemetry import baggage, context
from opentelemetry import trace as trace_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from collectors_kafka import read_topic
from meterline.collectors import Meter
from meterline.collectors import genai
from meterline.collectors.genai import Nesting, SpanView, to_event
from meterline.collectors.otel import MeterSpanProcessor
from meterline.schemas import InvalidEvent, decode
from meterline.schemas.events import UsageEvent
from meterline.settings import Settings


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


def _counters(p: MeterSpanProcessor) -> dict[str, int]:
    return {"metered": p.metered, "unmetered": p.unmetered, "nested": p.nested, "ignored": p.ignored, "invalid": p.invalid}


def _one(attrs: dict, *, error: str | None = None, events: tuple = (), resource: dict | None = None) -> tuple[list, MeterSpanProcessor]:
    sink = Collected()
    tracer, processor = _tracer(sink, resource or {"meterline.tenant_id": "acme"})
    with tracer.start_as_current_span("call", record_exception=False, set_status_on_exception=False) as span:
        span.set_attributes(attrs)
        for name, event_attrs in events:
            span.add_event(name, event_attrs)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
    return sink.events, processor


def _tokens(e: UsageEvent) -> tuple[int, int, int, int, int]:
    return e.input_tokens, e.output_tokens, e.cache_read_tokens, e.cache_write_tokens, e.reasoning_tokens


# ---- the basics ----------------------------------------------------------------------------------


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
    assert _counters(processor) == {"metered": 1, "unmetered": 0, "nested": 0, "ignored": 2, "invalid": 0}
    [event] = sink.events
    assert (event.tenant_id, event.team, event.project, event.agent_id, event.session_id, event.priority) == (
        "acme", "search", "rag", "planner", "conv-7", "high")
    assert (event.kind, event.provider, event.model) == ("llm_call", "openai", "gpt-4o-2024-08-06")
    assert _tokens(event) == (1200, 80, 1000, 0, 0)
    assert event.status == "ok" and event.usage == "reported"
    assert event.attributes["operation"] == "chat" and event.attributes["dialect"] == "semconv"
    assert len(event.attributes["trace_id"]) == 32 and len(event.attributes["span_id"]) == 16


def test_legacy_system_attribute_span_attribution_and_timeout_status():
    sink = Collected()
    tracer, _ = _tracer(sink, {"meterline.tenant_id": "resource-tenant"}, team="default-team")
    with tracer.start_as_current_span("messages claude") as span:
        span.set_attributes({"gen_ai.system": "Anthropic", "gen_ai.request.model": "claude-sonnet-4",
                             "gen_ai.usage.input_tokens": 370, "gen_ai.usage.output_tokens": 0,
                             "gen_ai.usage.cache_read.input_tokens": 300, "gen_ai.usage.cache_creation.input_tokens": 20,
                             "meterline.tenant_id": "span-tenant", "error.type": "timeout"})
        span.set_status(Status(StatusCode.ERROR))
    [event] = sink.events
    assert (event.provider, event.model, event.tenant_id, event.team) == ("anthropic", "claude-sonnet-4", "span-tenant", "default-team")
    assert _tokens(event) == (370, 0, 300, 20, 0)  # semconv: input_tokens counts the cached part too
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
    with tracer.start_as_current_span("chat") as span:
        span.set_attributes({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": "many", "meterline.tenant_id": "a"})
    with tracer.start_as_current_span("chat") as span:  # usage but no model
        span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 5, "meterline.tenant_id": "a"})
    assert processor.invalid == 4 and sink.events == []


def test_spans_reach_kafka_through_a_meter(settings):
    meter = Meter(settings, tenant_id="sdk-tenant", register_pid=False)
    tracer, processor = _tracer(meter, {"meterline.tenant_id": "otel-tenant"})
    for i in range(3):
        with tracer.start_as_current_span("chat") as span:
            span.set_attributes({"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                                 "gen_ai.usage.input_tokens": 10 + i, "gen_ai.usage.output_tokens": 4,
                                 "gen_ai.usage.reasoning.output_tokens": 3, "gen_ai.conversation.id": f"c-{i}"})
    with tracer.start_as_current_span("chat") as span:  # a stream without include_usage
        span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                             "gen_ai.request.model": "gpt-4o", "gen_ai.conversation.id": "c-missing"})
    assert processor.force_flush()
    meter.close()
    messages = read_topic(settings, settings.topic("usage"), 4)
    events = sorted((decode(UsageEvent, m.value()) for m in messages), key=lambda e: e.session_id)
    assert [(e.tenant_id, e.session_id, e.input_tokens, e.reasoning_tokens, e.usage) for e in events] == [
        ("otel-tenant", "c-0", 10, 3, "reported"), ("otel-tenant", "c-1", 11, 3, "reported"),
        ("otel-tenant", "c-2", 12, 3, "reported"), ("otel-tenant", "c-missing", 0, 0, "missing")]
    assert {m.key() for m in messages} == {b"otel-tenant"}


# ---- one table, every dialect --------------------------------------------------------------------

# (dialect, span attributes, (input, output, cache read, cache write, reasoning), provider, model)
DIALECT_CASES = {
    "semconv, current names (cache_write, reasoning.output_tokens)": (
        "semconv",
        {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5",
         "gen_ai.response.model": "claude-sonnet-4-5-20250929", "gen_ai.usage.input_tokens": 1820,
         "gen_ai.usage.output_tokens": 700, "gen_ai.usage.cache_read.input_tokens": 1200,
         "gen_ai.usage.cache_write.input_tokens": 500, "gen_ai.usage.reasoning.output_tokens": 450},
        (1820, 700, 1200, 500, 450), "anthropic", "claude-sonnet-4-5-20250929"),
    "semconv, older names (prompt/completion tokens, cache_creation, gen_ai.system)": (
        "semconv",
        {"gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
         "gen_ai.usage.prompt_tokens": 1517, "gen_ai.usage.completion_tokens": 389,
         "gen_ai.usage.cache_read.input_tokens": 1024, "gen_ai.usage.cache_creation.input_tokens": 64},
        (1517, 389, 1024, 64, 0), "openai", "gpt-4o"),
    "OpenLLMetry >= 0.5 (semconv names plus gen_ai.usage.reasoning_tokens, total_tokens)": (
        "semconv",
        {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "o4-mini",
         "gen_ai.response.model": "o4-mini-2025-04-16", "gen_ai.usage.input_tokens": 900,
         "gen_ai.usage.output_tokens": 300, "gen_ai.usage.total_tokens": 1200,
         "gen_ai.usage.cache_read.input_tokens": 512, "gen_ai.usage.reasoning_tokens": 192},
        (900, 300, 512, 0, 192), "openai", "o4-mini-2025-04-16"),
    "OpenLLMetry, legacy names (llm.request.type, *_input_tokens, llm.usage.*)": (
        "openllmetry",
        {"llm.request.type": "chat", "gen_ai.system": "Anthropic", "gen_ai.request.model": "claude-haiku-4-5",
         "gen_ai.response.model": "claude-haiku-4-5-20251001", "gen_ai.usage.prompt_tokens": 2330,
         "gen_ai.usage.completion_tokens": 210, "llm.usage.total_tokens": 2540,
         "gen_ai.usage.cache_read_input_tokens": 2048, "gen_ai.usage.cache_creation_input_tokens": 256,
         "llm.usage.reasoning_tokens": 100},
        (2330, 210, 2048, 256, 100), "anthropic", "claude-haiku-4-5-20251001"),
    "OpenInference (llm.token_count.*, llm.model_name, llm.provider)": (
        "openinference",
        {"openinference.span.kind": "LLM", "llm.provider": "openai", "llm.system": "openai", "llm.model_name": "gpt-4.1-mini",
         "llm.token_count.prompt": 640, "llm.token_count.completion": 96, "llm.token_count.total": 736,
         "llm.token_count.prompt_details.cache_read": 512, "llm.token_count.prompt_details.cache_write": 0,
         "llm.token_count.completion_details.reasoning": 32, "session.id": "oi-session"},
        (640, 96, 512, 0, 32), "openai", "gpt-4.1-mini"),
    "Anthropic-style: input beside the cache (Strands)": (
        "strands",
        {"gen_ai.operation.name": "chat", "gen_ai.system": "strands-agents", "gen_ai.request.model": "claude-sonnet-4",
         "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20, "gen_ai.usage.total_tokens": 440,
         "gen_ai.usage.cache_read_input_tokens": 300, "gen_ai.usage.cache_write_input_tokens": 20},
        (420, 20, 300, 20, 0), "strands-agents", "claude-sonnet-4"),
}


@pytest.mark.parametrize("case", list(DIALECT_CASES))
def test_every_dialect_maps_through_the_one_table(case):
    dialect, attrs, tokens, provider, model = DIALECT_CASES[case]
    [event], processor = _one(attrs)
    assert event.attributes["dialect"] == dialect
    assert _tokens(event) == tokens
    assert (event.provider, event.model, event.status, event.usage) == (provider, model, "ok", "reported")
    assert processor.metered == 1


def test_openinference_session_id_is_the_event_session():
    [event], _ = _one(DIALECT_CASES["OpenInference (llm.token_count.*, llm.model_name, llm.provider)"][1])
    assert event.session_id == "oi-session"


def test_input_convention_is_the_dialects_never_a_guess():
    """The same Anthropic usage (input 100 beside cache read 300 and write 20) as each kind of dialect reports it."""
    beside = {"gen_ai.operation.name": "chat", "gen_ai.system": "strands-agents", "gen_ai.request.model": "claude-sonnet-4",
              "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 20,
              "gen_ai.usage.cache_read.input_tokens": 300, "gen_ai.usage.cache_write.input_tokens": 20}
    including = {**beside, "gen_ai.system": "anthropic", "gen_ai.usage.input_tokens": 420}
    [a], _ = _one(beside)
    [b], _ = _one(including)
    assert _tokens(a) == _tokens(b) == (420, 20, 300, 20, 0)
    # An input-including dialect that reports input below its cache broke its own convention: not metered,
    # rather than guessing which count is wrong (the old "if cache > input then add").
    events, processor = _one({**including, "gen_ai.usage.input_tokens": 100})
    assert events == [] and processor.invalid == 1
    # and an input-beside dialect adds the cache even when input alone is larger than it
    [c], _ = _one({**beside, "gen_ai.usage.input_tokens": 5000})
    assert c.input_tokens == 5320


def test_a_dialect_is_one_row_and_output_without_reasoning_gets_it_added(monkeypatch):
    row = genai.Dialect("acme-tracer", selected_by=(("gen_ai.system", "acme-llm"),), input=("acme.tokens.in",),
                        output=("acme.tokens.out",), cache_read=("acme.tokens.cached",), reasoning=("acme.tokens.thinking",),
                        input_holds_cache=False, output_holds_reasoning=False)
    monkeypatch.setattr(genai, "DIALECTS", (row, *genai.DIALECTS))
    [event], _ = _one({"gen_ai.operation.name": "chat", "gen_ai.system": "acme-llm", "gen_ai.request.model": "acme-1",
                       "acme.tokens.in": 40, "acme.tokens.out": 10, "acme.tokens.cached": 60, "acme.tokens.thinking": 25})
    assert event.attributes["dialect"] == "acme-tracer"
    assert _tokens(event) == (100, 35, 60, 0, 25)  # reasoning is billed as output: output includes it


def test_reasoning_above_output_in_a_dialect_whose_output_holds_it_is_invalid():
    events, processor = _one({"gen_ai.operation.name": "chat", "gen_ai.request.model": "o3", "gen_ai.usage.input_tokens": 10,
                              "gen_ai.usage.output_tokens": 5, "gen_ai.usage.reasoning.output_tokens": 50})
    assert events == [] and processor.invalid == 1


def test_only_a_total_is_usage_missing_with_the_total_kept():
    [event], processor = _one({"llm.request.type": "chat", "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o",
                               "llm.usage.total_tokens": 321})
    assert event.usage == "missing" and _tokens(event) == (0, 0, 0, 0, 0) and event.attributes["total_tokens"] == "321"
    assert processor.unmetered == 1


def test_a_total_completes_the_missing_side():
    [event], _ = _one({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 300,
                       "gen_ai.usage.total_tokens": 340})
    assert (event.input_tokens, event.output_tokens) == (300, 40)


def test_a_total_gives_the_missing_side_in_an_input_beside_cache_dialect_and_a_short_total_is_invalid():
    strands = {"gen_ai.operation.name": "chat", "gen_ai.system": "strands-agents", "gen_ai.request.model": "claude-sonnet-4",
               "gen_ai.usage.input_tokens": 100, "gen_ai.usage.total_tokens": 440,
               "gen_ai.usage.cache_read_input_tokens": 300, "gen_ai.usage.cache_write_input_tokens": 20}
    [event], _ = _one(strands)
    assert _tokens(event) == (420, 20, 300, 20, 0)
    events, processor = _one({**strands, "gen_ai.usage.total_tokens": 50})
    assert events == [] and processor.invalid == 1


# ---- failed and unmetered calls are visible ------------------------------------------------------

CHAT = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}


@pytest.mark.parametrize("attrs, message, events, status", [
    ({"error.type": "RateLimitError"}, "", (), "rate_limited"),               # openai-v2: the exception's type
    ({"error.type": "rate_limit_error"}, "", (), "rate_limited"),             # the Anthropic SDK: the API's error type
    ({"http.response.status_code": 429}, "", (), "rate_limited"),
    ({}, "Error code: 429 - {'error': {'type': 'rate_limit_error'}}", (), "rate_limited"),
    ({}, "", (("exception", {"exception.type": "openai.RateLimitError", "exception.message": "slow down"}),), "rate_limited"),
    ({"error.type": "client_timeout_error"}, "", (), "timeout"),
    ({}, "", (("exception", {"exception.type": "openai.APITimeoutError", "exception.message": "Request timed out."}),), "timeout"),
    ({"error.type": "InternalServerError"}, "boom", (), "error"),
])
def test_a_failed_call_without_usage_is_an_event_with_its_status_and_zero_tokens(attrs, message, events, status):
    [event], processor = _one({**CHAT, **attrs}, error=message, events=events)
    assert event.status == status and _tokens(event) == (0, 0, 0, 0, 0) and event.usage == "reported"
    assert event.model == "gpt-4o" and processor.metered == 1 and processor.unmetered == 0


def test_a_failed_openinference_call_is_seen_from_its_exception_event():
    [event], _ = _one({"openinference.span.kind": "LLM", "llm.model_name": "claude-haiku-4-5", "llm.provider": "anthropic"},
                      error="Error code: 429", events=(("exception", {"exception.type": "RateLimitError"}),))
    assert (event.status, event.provider, event.model, event.input_tokens) == ("rate_limited", "anthropic", "claude-haiku-4-5", 0)


def test_a_completed_call_without_usage_is_marked_missing_and_counted_unmetered():
    [event], processor = _one({**CHAT, "gen_ai.request.stream": True})
    assert event.usage == "missing" and event.status == "ok" and _tokens(event) == (0, 0, 0, 0, 0)
    assert _counters(processor) == {"metered": 0, "unmetered": 1, "nested": 0, "ignored": 0, "invalid": 0}


@pytest.mark.parametrize("attrs", [
    {"gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "langgraph", "gen_ai.request.model": "gpt-4o"},
    {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search"},
    {"gen_ai.operation.name": "execute_task", "gen_ai.provider.name": "langchain"},
    {"gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5"},  # the SDK's count_tokens span
    {"openinference.span.kind": "CHAIN", "llm.model_name": "gpt-4o"},
    {"traceloop.span.kind": "workflow"},
])
def test_a_genai_span_that_is_no_model_call_and_has_no_usage_is_ignored(attrs):
    events, processor = _one(attrs)
    assert events == [] and processor.ignored == 1


# ---- nesting: one event per call -----------------------------------------------------------------

OPENLLMETRY_ANTHROPIC = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5",
                         "gen_ai.usage.input_tokens": 1820, "gen_ai.usage.output_tokens": 700, "gen_ai.usage.total_tokens": 2520,
                         "gen_ai.usage.cache_read.input_tokens": 1200, "gen_ai.usage.cache_creation.input_tokens": 500}
ANTHROPIC_SDK = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-sonnet-4-5",
                 "gen_ai.response.model": "claude-sonnet-4-5-20250929", "gen_ai.usage.input_tokens": 1820,
                 "gen_ai.usage.output_tokens": 700, "gen_ai.usage.cache_read.input_tokens": 1200,
                 "gen_ai.usage.cache_write.input_tokens": 500, "http.response.status_code": 200}


def test_the_anthropic_sdks_own_span_inside_an_instrumentor_is_one_event():
    sink = Collected()
    tracer, processor = _tracer(sink, {"meterline.tenant_id": "acme"})
    with tracer.start_as_current_span("agent"):
        with tracer.start_as_current_span("anthropic.chat") as outer:
            outer.set_attributes(OPENLLMETRY_ANTHROPIC)
            with tracer.start_as_current_span("anthropic.messages.create") as inner:
                inner.set_attributes(ANTHROPIC_SDK)
    [event] = sink.events
    assert _tokens(event) == (1820, 700, 1200, 500, 0) and event.model == "claude-sonnet-4-5-20250929"  # the innermost
    assert _counters(processor) == {"metered": 1, "unmetered": 0, "nested": 1, "ignored": 1, "invalid": 0}


def test_a_langchain_span_around_an_openai_span_is_one_event_through_a_non_genai_span():
    sink = Collected()
    tracer, processor = _tracer(sink, {"meterline.tenant_id": "acme"})
    with tracer.start_as_current_span("ChatOpenAI.chat") as lc:
        lc.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "traceloop.span.kind": "llm",
                           "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o",  # a stream: the alias
                           "gen_ai.usage.input_tokens": 1517, "gen_ai.usage.output_tokens": 389})
        with tracer.start_as_current_span("retry wrapper"):  # any span between the layers
            with tracer.start_as_current_span("chat gpt-4o") as oa:
                oa.set_attributes({**CHAT, "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.input_tokens": 1517,
                                   "gen_ai.usage.output_tokens": 389, "gen_ai.usage.cache_read.input_tokens": 1024})
    [event] = sink.events
    assert event.model == "gpt-4o-2024-08-06" and event.cache_read_tokens == 1024
    assert (processor.metered, processor.nested) == (1, 1)


def test_sibling_calls_under_one_agent_span_are_each_metered_and_an_aggregate_parent_is_nested():
    sink = Collected()
    tracer, processor = _tracer(sink, {"meterline.tenant_id": "acme"})
    with tracer.start_as_current_span("invoke_agent") as agent:
        agent.set_attributes({"gen_ai.operation.name": "invoke_agent", "gen_ai.request.model": "gpt-4o",
                              "gen_ai.usage.input_tokens": 30, "gen_ai.usage.output_tokens": 3})  # the sum of its calls
        for i in (10, 20):
            with tracer.start_as_current_span("chat") as span:
                span.set_attributes({**CHAT, "gen_ai.usage.input_tokens": i, "gen_ai.usage.output_tokens": 1})
    assert sorted(e.input_tokens for e in sink.events) == [10, 20]
    assert (processor.metered, processor.nested) == (2, 1)


def test_a_rate_limited_call_traced_by_two_layers_is_one_event():
    sink = Collected()
    tracer, processor = _tracer(sink, {"meterline.tenant_id": "acme"})
    with tracer.start_as_current_span("ChatOpenAI.chat", set_status_on_exception=False) as lc:
        lc.set_attributes(CHAT)
        with tracer.start_as_current_span("chat gpt-4o") as oa:
            oa.set_attributes({**CHAT, "error.type": "RateLimitError"})
            oa.set_status(Status(StatusCode.ERROR))
        lc.set_status(Status(StatusCode.ERROR, "Error code: 429"))
    [event] = sink.events
    assert event.status == "rate_limited" and (processor.metered, processor.nested) == (1, 1)


def test_an_outer_layer_with_usage_is_kept_when_the_inner_one_had_none():
    """Tokens are never dropped: an inner span without usage (an error or a missing-usage record) covers its
    parent only weakly, so a parent that did see usage is still metered."""
    sink = Collected()
    tracer, processor = _tracer(sink, {"meterline.tenant_id": "acme"})
    with tracer.start_as_current_span("outer") as outer:
        outer.set_attributes({**CHAT, "gen_ai.usage.input_tokens": 50, "gen_ai.usage.output_tokens": 5})
        with tracer.start_as_current_span("inner") as inner:
            inner.set_attributes(CHAT)
    assert sorted((e.usage, e.input_tokens) for e in sink.events) == [("missing", 0), ("reported", 50)]
    assert (processor.metered, processor.unmetered, processor.nested) == (1, 1, 0)


def _layers(sink, resource=None):
    """Two libraries on one provider: an instrumentor (its own scope) and the SDK that traces itself."""
    provider = TracerProvider(resource=Resource.create(resource or {"meterline.tenant_id": "acme"}))
    processor = MeterSpanProcessor(sink)
    provider.add_span_processor(processor)
    return provider.get_tracer("opentelemetry.instrumentation.anthropic"), provider.get_tracer("com.anthropic.sdk.python"), processor


def test_two_layers_that_do_not_nest_their_spans_are_one_event():
    """OpenLLMetry's anthropic instrumentor starts its span without making it current, so the Anthropic SDK's
    own span is its sibling under the caller's span (and, without a caller span, a root of another trace)."""
    sink = Collected()
    instrumentor, sdk, processor = _layers(sink)
    caller = instrumentor  # any tracer will do for the caller's span
    for with_caller in (True, False):
        token = context.attach(trace_api.set_span_in_context(caller.start_span("agent step"))) if with_caller else None
        outer = instrumentor.start_span("anthropic.chat", attributes=OPENLLMETRY_ANTHROPIC)  # not made current
        with sdk.start_as_current_span("anthropic.messages.create") as inner:
            inner.set_attributes({**ANTHROPIC_SDK, "gen_ai.usage.reasoning.output_tokens": 300})
        outer.end()
        if token is not None:
            trace_api.get_current_span().end()
            context.detach(token)
    assert [(e.reasoning_tokens, e.attributes["scope"]) for e in sink.events] == [(300, "com.anthropic.sdk.python")] * 2
    assert (processor.metered, processor.nested) == (2, 2)


def test_a_rate_limited_call_of_two_sibling_layers_is_one_event_with_the_inner_status():
    sink = Collected()
    instrumentor, sdk, processor = _layers(sink)
    with instrumentor.start_as_current_span("agent step"):
        outer = instrumentor.start_span("anthropic.chat", attributes={**CHAT, "gen_ai.provider.name": "anthropic",
                                                                       "error.type": "RateLimitError"})
        with sdk.start_as_current_span("anthropic.messages.create", set_status_on_exception=False) as inner:
            inner.set_attributes({**CHAT, "gen_ai.provider.name": "anthropic", "error.type": "rate_limit_error",
                                  "http.response.status_code": 429})
            inner.set_status(Status(StatusCode.ERROR))
        outer.set_status(Status(StatusCode.ERROR))
        outer.end()
    [event] = sink.events
    assert event.status == "rate_limited" and event.attributes["scope"] == "com.anthropic.sdk.python"
    assert (processor.metered, processor.nested) == (1, 1)


def test_concurrent_calls_traced_by_two_layers_are_two_events():
    """Two calls in flight at once under one caller span, each traced by both layers: each outer span contains
    both inner ones in time, yet an outer is only dropped for an inner, so two calls stay two events."""
    sink = Collected()
    instrumentor, sdk, processor = _layers(sink)
    with instrumentor.start_as_current_span("agent step"):
        outers = [instrumentor.start_span("anthropic.chat", attributes={**OPENLLMETRY_ANTHROPIC, "gen_ai.usage.input_tokens": n})
                  for n in (1820, 1830)]
        inners = [sdk.start_span("anthropic.messages.create", attributes={**ANTHROPIC_SDK, "gen_ai.usage.input_tokens": n})
                  for n in (1820, 1830)]
        for span in inners + outers:
            span.end()
    assert sorted(e.input_tokens for e in sink.events) == [1820, 1830]
    assert (processor.metered, processor.nested) == (2, 2)


def test_sibling_calls_of_one_library_are_never_merged():
    sink = Collected()
    tracer, processor = _tracer(sink, {"meterline.tenant_id": "acme"})
    with tracer.start_as_current_span("agent step"):
        first = tracer.start_span("chat", attributes={**CHAT, "gen_ai.usage.input_tokens": 5})
        second = tracer.start_span("chat", attributes={**CHAT, "gen_ai.usage.input_tokens": 6})  # inside first's time
        second.end()
        first.end()
    assert sorted(e.input_tokens for e in sink.events) == [5, 6] and processor.nested == 0


def test_an_openinference_failed_call_names_the_model_from_its_invocation_parameters():
    [event], _ = _one({"openinference.span.kind": "LLM", "llm.system": "openai",
                       "llm.invocation_parameters": '{"model": "gpt-4o", "stream": false}'},
                      error="Error code: 429 - rate limit", events=(("exception", {"exception.type": "RateLimitError"}),))
    assert (event.model, event.provider, event.status) == ("gpt-4o", "openai", "rate_limited")


def test_nesting_over_otlp_batches_in_end_time_order():
    """What an OTLP endpoint does: no start hook, parents known from each span, a parent in a later batch."""
    nesting = Nesting(max_spans=100)
    trace = 0xABC

    def view(span_id, parent, attrs, end):
        return SpanView("s", trace, span_id, parent, end - 10, end, {**attrs, "meterline.tenant_id": "acme"}, {}, False)

    inner = view(3, 2, ANTHROPIC_SDK, 100)
    middle = view(2, 1, {}, 110)  # a non-GenAI span between the layers
    outer = view(1, None, OPENLLMETRY_ANTHROPIC, 120)
    assert nesting.settle(trace, 3, 2, to_event(inner)) is True  # batch 1
    assert nesting.settle(trace, 2, 1, to_event(middle)) is False and to_event(middle) is None
    assert nesting.covered(trace, 1) == genai.STRONG
    assert nesting.settle(trace, 1, None, to_event(outer)) is False  # batch 2: nested
    assert nesting.covered(trace, 1) == genai.NONE and nesting.covered(trace, 2) == genai.NONE  # settled: forgotten


def test_nesting_memory_is_bounded():
    nesting = Nesting(max_spans=50)
    event = to_event(SpanView("c", 1, 1, None, 0, 1, {**CHAT, "gen_ai.usage.input_tokens": 1, "meterline.tenant_id": "a"}, {}, False))
    for i in range(1000):  # parents that never arrive
        nesting.settle(i, 1, 2, event)
    assert len(nesting) == 50 and len(nesting._siblings) == 0  # covers waiting for parents; no scope, no siblings
    scoped = event.model_copy(update={"attributes": {**event.attributes, "scope": "lib"}})
    for i in range(1000):
        nesting.settle(i, 1, 2, scoped)
    assert len(nesting) == 50 and len(nesting._siblings) == 50
    sink = Collected()
    provider = TracerProvider()
    processor = MeterSpanProcessor(sink, max_spans=20, tenant_id="acme")
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    spans = [tracer.start_span(f"never ended {i}") for i in range(100)]
    assert len(processor._open) == 20
    for span in spans:
        span.end()
    assert len(processor._open) == 0


def test_threads_tracing_at_once_are_each_counted_and_attributed():
    sink = Collected()
    tracer, processor = _tracer(sink)

    def work(n: int) -> None:
        for i in range(200):
            with tracer.start_as_current_span("caller") as caller:
                caller.set_attribute("meterline.tenant_id", f"t{n}")
                with tracer.start_as_current_span("chat") as span:
                    span.set_attributes({**CHAT, "gen_ai.usage.input_tokens": n, "gen_ai.usage.output_tokens": i})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (processor.metered, processor.ignored, processor.nested, processor.invalid) == (1600, 1600, 0, 0)
    assert all(e.tenant_id == f"t{e.input_tokens}" for e in sink.events) and len(processor._open) == 0


# ---- attribution: span, ancestors, baggage, resource, defaults -----------------------------------


def test_attribution_set_on_the_callers_span_after_start_reaches_the_library_span():
    sink = Collected()
    tracer, _ = _tracer(sink)
    with tracer.start_as_current_span("request") as root:
        with tracer.start_as_current_span("handler") as caller:
            library = tracer.start_span("chat gpt-4o", attributes=CHAT)  # the instrumentation's span starts ...
            caller.set_attribute("meterline.tenant_id", "late-tenant")  # ... before the caller names its tenant
            root.set_attributes({"meterline.team": "root-team", "meterline.tenant_id": "root-tenant"})
            library.set_attributes({"gen_ai.usage.input_tokens": 7, "gen_ai.usage.output_tokens": 1})
            library.end()
        with tracer.start_as_current_span("chat") as span:  # set right after start_as_current_span
            span.set_attributes({**CHAT, "gen_ai.usage.input_tokens": 8, "gen_ai.usage.output_tokens": 1})
    first, second = sink.events
    assert (first.tenant_id, first.team) == ("late-tenant", "root-team")  # nearest ancestor first
    assert (second.tenant_id, second.team) == ("root-tenant", "root-team")


def test_attribution_order_span_ancestors_baggage_resource_defaults():
    sink = Collected()
    tracer, _ = _tracer(sink, {"meterline.tenant_id": "res-tenant", "meterline.team": "res-team", "meterline.project": "res-project",
                               "meterline.agent_id": "res-agent"}, agent_id="default-agent", session_id="default-session")
    ctx = baggage.set_baggage("meterline.team", "bag-team")
    ctx = baggage.set_baggage("meterline.project", "bag-project", ctx)
    ctx = baggage.set_baggage("meterline.tenant_id", "bag-tenant", ctx)
    ctx = baggage.set_baggage("unrelated", "x", ctx)
    token = context.attach(ctx)
    try:
        with tracer.start_as_current_span("caller") as caller:
            caller.set_attribute("meterline.tenant_id", "caller-tenant")
            with tracer.start_as_current_span("chat") as span:
                span.set_attributes({**CHAT, "gen_ai.usage.input_tokens": 1, "meterline.priority": "batch"})
    finally:
        context.detach(token)
    [event] = sink.events
    assert (event.priority, event.tenant_id, event.team, event.project, event.agent_id, event.session_id) == (
        "batch", "caller-tenant", "bag-team", "bag-project", "res-agent", "default-session")


def test_attribution_from_resource_and_defaults():
    sink = Collected()
    tracer, _ = _tracer(sink, {"meterline.tenant_id": "res-tenant"}, team="default-team", priority="low")
    with tracer.start_as_current_span("chat") as span:
        span.set_attributes({**CHAT, "gen_ai.usage.input_tokens": 1})
    [event] = sink.events
    assert (event.tenant_id, event.team, event.priority) == ("res-tenant", "default-team", "low")


class _Sender:
    def __init__(self):
        self.records = []

    def send(self, key, value):
        self.records.append((key, value))

    def submit(self, item):
        self.records.append(item)

    def close(self, timeout=0):
        pass


def test_a_meter_session_reaches_a_downstream_service_through_w3c_baggage(tmp_path):
    """Service A: `with meter.session(...)` and an outgoing request, its headers injected by the standard W3C
    propagators. Service B (another TracerProvider, nothing shared but the headers): its span processor
    attributes the model call to A's tenant and session."""
    propagator = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    meter = Meter(Settings(data_dir=tmp_path), tenant_id="acme", team="search", agent_id="planner",
                  sender=_Sender(), register_pid=False)
    tracer_a, _ = _tracer(Collected(), {"service.name": "a"})
    headers: dict[str, str] = {}
    with meter.session("ticket-42", project="rag"):
        assert baggage.get_baggage("meterline.session_id") == "ticket-42"
        with tracer_a.start_as_current_span("POST /summarise"):
            propagator.inject(headers)
    assert baggage.get_baggage("meterline.session_id") is None  # the block's baggage is gone after it
    assert "baggage" in headers and "traceparent" in headers

    sink = Collected()
    tracer_b, processor = _tracer(sink, {"service.name": "b"})
    incoming = propagator.extract(headers, context=context.Context())  # a fresh context, as a server has
    token = context.attach(incoming)  # what server instrumentations do with the request's context
    try:
        with tracer_b.start_as_current_span("handle /summarise"):
            with tracer_b.start_as_current_span("chat") as span:
                span.set_attributes({**CHAT, "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3})
    finally:
        context.detach(token)
    # a server span started in the extracted context without attaching it: its children still find the baggage
    with tracer_b.start_as_current_span("handle /summarise", context=incoming):
        with tracer_b.start_as_current_span("chat") as span:
            span.set_attributes({**CHAT, "gen_ai.usage.input_tokens": 13, "gen_ai.usage.output_tokens": 3})
    assert [e.input_tokens for e in sink.events] == [12, 13]
    for event in sink.events:
        assert (event.tenant_id, event.team, event.project, event.agent_id, event.session_id, event.priority) == (
            "acme", "search", "rag", "planner", "ticket-42", "normal")
        assert event.attributes["trace_id"] == headers["traceparent"].split("-")[1]  # the same trace as service A
    assert processor.invalid == 0
    meter.close()


def test_a_nested_session_replaces_the_baggage_and_restores_it(tmp_path):
    meter = Meter(Settings(data_dir=tmp_path), tenant_id="acme", sender=_Sender(), register_pid=False)
    upstream = baggage.set_baggage("meterline.team", "upstream-team")
    token = context.attach(upstream)
    try:
        with meter.session("outer", agent_id="a1"):
            with meter.session("inner"):
                assert (baggage.get_baggage("meterline.session_id"), baggage.get_baggage("meterline.agent_id")) == ("inner", "a1")
                assert baggage.get_baggage("meterline.team") is None  # the session's team is '': the upstream value goes
            assert baggage.get_baggage("meterline.session_id") == "outer"
        assert baggage.get_baggage("meterline.team") == "upstream-team"
    finally:
        context.detach(token)
    meter.close()


def test_to_event_takes_context_and_defaults_and_is_none_for_other_spans():
    view = SpanView("chat", 1, 2, None, 1_000_000, 3_000_000, {**CHAT, "gen_ai.usage.input_tokens": 5}, {"meterline.team": "r"}, False)
    event = to_event(view, {"tenant_id": "ctx", "project": "p"}, {"tenant_id": "default", "priority": "high"})
    assert (event.tenant_id, event.team, event.project, event.priority, event.latency_ms) == ("ctx", "r", "p", "high", 2)
    assert to_event(dataclasses.replace(view, attributes={"http.method": "GET"})) is None
    with pytest.raises(InvalidEvent):
        to_event(view)  # no tenant anywhere


def test_a_span_has_one_event_id_however_often_it_is_seen():
    """An exporter's retry (or the same span in-process and over OTLP) repeats the event id, so the
    stream's first-write rule charges the call once."""
    span = SpanView(name="chat gpt-4o", trace_id=0xABC, span_id=0x1, parent_span_id=None, start_ns=1_700_000_000_000_000_000,
                    end_ns=1_700_000_000_500_000_000, attributes={"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                                                                    "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 2},
                    resource={"meterline.tenant_id": "acme"}, error=False)
    first, again = to_event(span), to_event(span)
    other = to_event(dataclasses.replace(span, span_id=0x2))
    assert first.event_id == again.event_id and first == again
    assert other.event_id != first.event_id


def test_service_tier_comes_from_the_openai_semconv_attributes():
    base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-5",
            "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 5}
    served = _one({**base, "openai.request.service_tier": "auto", "openai.response.service_tier": "flex"})[0]
    old_names = _one({**base, "gen_ai.openai.response.service_tier": "priority"})[0]
    unpriced = _one({**base, "openai.response.service_tier": "scale"})[0]
    assert [e.service_tier for e in served + old_names + unpriced] == ["flex", "priority", ""]
    assert unpriced[0].attributes["service_tier"] == "scale"  # kept, priced as default
