"""Drives the real client libraries under one instrumentation family and prints what meterline metered.

    python tests/instrumented_driver.py FAMILY URL

Instrumentors patch the client libraries process-wide and some conflict, so each family runs in a
process of its own (tests/test_instrumentations.py starts one per family). The process sets up a
TracerProvider (resource `meterline.team=team-<family>`) with meterline's MeterSpanProcessor, whose
sink only collects UsageEvents, and a recorder of every span; instruments the libraries; then runs
each case of the family against the fake provider at URL (tests/fakeprovider.py), inside the caller's
own span, which carries `meterline.tenant_id=tenant-<case>`. Per case it prints one line,
`CASE {json}`: the events metered, the exception the client raised, meterline's log lines and the
raw spans the libraries emitted (name, scope, parent, status, attributes), for debugging a mapping.

Nothing heavy is imported at module level: the test imports FAMILIES from here.
"""
from __future__ import annotations

import gc
import json
import logging
import sys
import traceback

OPENAI_CASES = ["chat", "chat_stream", "chat_stream_no_usage", "chat_429", "responses", "responses_stream", "responses_429"]
ANTHROPIC_CASES = ["anthropic", "anthropic_stream", "anthropic_stream_helper", "anthropic_429"]
LANGCHAIN_CASES = ["lc_invoke", "lc_stream", "lc_429"]

# family -> cases it runs. The Anthropic SDK traces itself whenever OpenTelemetry has a tracer provider,
# so its spans are there in every family that calls Anthropic; "anthropic-sdk" is that tracing alone.
FAMILIES: dict[str, list[str]] = {
    "anthropic-sdk": ANTHROPIC_CASES,
    # opentelemetry-instrumentation-openai-v2 (on opentelemetry-util-genai, which always writes the latest
    # experimental GenAI semconv: OTEL_SEMCONV_STABILITY_OPT_IN changes nothing there, so one family is enough)
    "otel-v2": OPENAI_CASES + LANGCHAIN_CASES,
    "openllmetry": OPENAI_CASES + ANTHROPIC_CASES + LANGCHAIN_CASES,
    "openinference": OPENAI_CASES + ANTHROPIC_CASES + LANGCHAIN_CASES,
}

PROMPT = "Say in one line what meterline does."
SYSTEM = "You are a terse assistant for a metering service. " * 40  # long enough to be worth caching
MARK = "CASE "


def tenant_of(case: str) -> str:
    return f"tenant-{case}"


def team_of(family: str) -> str:
    return f"team-{family}"


def _instrument(family: str, provider) -> None:
    if family == "anthropic-sdk":
        return  # anthropic >= 2 needs nothing but a tracer provider (ANTHROPIC_OPEN_TELEMETRY=false turns it off)
    if family == "otel-v2":
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=provider)
    elif family == "openllmetry":
        from opentelemetry.instrumentation.anthropic import AnthropicInstrumentor
        from opentelemetry.instrumentation.langchain import LangchainInstrumentor
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=provider)
        AnthropicInstrumentor().instrument(tracer_provider=provider)
        LangchainInstrumentor().instrument(tracer_provider=provider)
    elif family == "openinference":
        from openinference.instrumentation.anthropic import AnthropicInstrumentor
        from openinference.instrumentation.langchain import LangChainInstrumentor
        from openinference.instrumentation.openai import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=provider)
        AnthropicInstrumentor().instrument(tracer_provider=provider)
        LangChainInstrumentor().instrument(tracer_provider=provider)
    else:
        raise SystemExit(f"unknown family {family!r}; one of {sorted(FAMILIES)}")


# --- the cases: what an application would write ------------------------------------------------------

def _openai(url: str, family: str, case: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/{family}/{case}/v1", api_key="sk-test-meterline", max_retries=0, timeout=20)


def _anthropic(url: str, family: str, case: str):
    from anthropic import Anthropic

    return Anthropic(base_url=f"{url}/{family}/{case}", api_key="sk-ant-test-meterline", max_retries=0, timeout=20)


def _chat_openai(url: str, family: str, case: str, model: str):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=f"{url}/{family}/{case}/v1", api_key="sk-test-meterline",
                      max_retries=0, timeout=20, stream_usage=True)


MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
ANTHROPIC_SYSTEM = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]


def run_case(url: str, family: str, case: str) -> None:
    if case in ("chat", "chat_429"):
        _openai(url, family, case).chat.completions.create(model="o4-mini" if case == "chat" else "gpt-4o", messages=MESSAGES)
    elif case == "chat_stream":
        stream = _openai(url, family, case).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    elif case == "chat_stream_no_usage":
        stream = _openai(url, family, case).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    elif case in ("responses", "responses_429"):
        _openai(url, family, case).responses.create(model="o3", instructions=SYSTEM, input=PROMPT)
    elif case == "responses_stream":
        stream = _openai(url, family, case).responses.create(model="gpt-4.1", instructions=SYSTEM, input=PROMPT, stream=True)
        "".join(getattr(e, "delta", "") for e in stream if e.type == "response.output_text.delta")
    elif case == "anthropic":
        _anthropic(url, family, case).messages.create(
            model="claude-sonnet-4-5", max_tokens=2048, system=ANTHROPIC_SYSTEM,
            thinking={"type": "enabled", "budget_tokens": 1024}, messages=[{"role": "user", "content": PROMPT}])
    elif case == "anthropic_stream":
        stream = _anthropic(url, family, case).messages.create(
            model="claude-haiku-4-5", max_tokens=512, system=ANTHROPIC_SYSTEM,
            messages=[{"role": "user", "content": PROMPT}], stream=True)
        for _ in stream:
            pass
    elif case == "anthropic_stream_helper":
        with _anthropic(url, family, case).messages.stream(
                model="claude-sonnet-4-5", max_tokens=512, system=ANTHROPIC_SYSTEM,
                messages=[{"role": "user", "content": PROMPT}]) as stream:
            "".join(stream.text_stream)
            stream.get_final_message()
    elif case == "anthropic_429":
        _anthropic(url, family, case).messages.create(
            model="claude-opus-4-1", max_tokens=512, messages=[{"role": "user", "content": PROMPT}])
    elif case in ("lc_invoke", "lc_429"):
        _chat_openai(url, family, case, "gpt-4o" if case == "lc_invoke" else "gpt-4.1-mini").invoke(
            [("system", SYSTEM), ("human", PROMPT)])
    elif case == "lc_stream":
        "".join(str(chunk.content) for chunk in _chat_openai(url, family, case, "gpt-4.1-mini").stream(
            [("system", SYSTEM), ("human", PROMPT)]))
    else:
        raise SystemExit(f"unknown case {case!r}")


# --- recording ---------------------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, str) and len(value) > 300:
        return value[:300] + f"...(+{len(value) - 300})"
    return value


def _span_record(span) -> dict:
    ctx, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else "",
        "kind": span.kind.name,
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "status": span.status.status_code.name,
        "attributes": {k: _jsonable(v) for k, v in (span.attributes or {}).items()},
        "events": [{"name": e.name, "attributes": {k: _jsonable(v) for k, v in (e.attributes or {}).items()
                                                   if k != "exception.stacktrace"}} for e in span.events],
    }


class _Collected:
    def __init__(self):
        self.events = []

    def send(self, event) -> None:
        self.events.append(event)


class _LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def main(family: str, url: str) -> int:
    if family not in FAMILIES:
        raise SystemExit(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from meterline.collectors.otel import MeterSpanProcessor

    sink, recorder, log_lines = _Collected(), InMemorySpanExporter(), _LogLines()
    logging.getLogger("meterline").addHandler(log_lines)
    logging.getLogger("meterline").setLevel(logging.DEBUG)
    provider = TracerProvider(resource=Resource.create({"service.name": "agent", "meterline.team": team_of(family)}))
    provider.add_span_processor(MeterSpanProcessor(sink))
    provider.add_span_processor(SimpleSpanProcessor(recorder))
    trace.set_tracer_provider(provider)  # the Anthropic SDK's own tracing uses the global provider
    _instrument(family, provider)
    tracer = provider.get_tracer("agent")

    for case in FAMILIES[family]:
        error = None
        try:
            with tracer.start_as_current_span(f"agent step {case}", attributes={"meterline.tenant_id": tenant_of(case)}):
                try:
                    run_case(url, family, case)
                except Exception as exc:  # noqa: BLE001 - a 429 is expected to raise; anything else is reported
                    error = {"type": type(exc).__name__, "message": str(exc)[:500],
                             "traceback": traceback.format_exc(limit=6)[-2000:]}
            gc.collect()  # a stream wrapper that ends its span when collected
            provider.force_flush()
        except Exception as exc:  # noqa: BLE001 - never lose the other cases' lines
            error = {"type": type(exc).__name__, "message": str(exc)[:500], "traceback": traceback.format_exc()[-2000:]}
        line = {
            "case": case,
            "error": error,
            "events": [e.model_dump(mode="json") for e in sink.events],
            "log": log_lines.lines,
            "spans": [_span_record(s) for s in recorder.get_finished_spans()],
        }
        sink.events, log_lines.lines = [], []
        recorder.clear()
        print(MARK + json.dumps(line, default=str), flush=True)
    provider.shutdown()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
