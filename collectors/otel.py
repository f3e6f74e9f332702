"""OpenTelemetry bridge: a SpanProcessor that meters spans carrying GenAI semantic conventions.

    provider = TracerProvider(resource=Resource.create({"meterline.tenant_id": "acme", "meterline.team": "search"}))
    provider.add_span_processor(MeterSpanProcessor(meter))

A span becomes one `llm_call` usage event when it has `gen_ai.usage.input_tokens` or
`gen_ai.usage.output_tokens`; every other span is ignored. Mapping:

| usage event          | span                                                                     |
|----------------------|--------------------------------------------------------------------------|
| provider             | `gen_ai.provider.name`, else the legacy `gen_ai.system`                 |
| model                | `gen_ai.response.model`, else `gen_ai.request.model`                    |
| input/output tokens  | `gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens`              |
| cache read / write   | `gen_ai.usage.cache_read.input_tokens` / `gen_ai.usage.cache_creation.input_tokens` |
| session_id, agent_id | `gen_ai.conversation.id`, `gen_ai.agent.id` (else `meterline.session_id` / `meterline.agent_id`) |
| tenant_id, team, project, priority | `meterline.tenant_id`, `meterline.team`, `meterline.project`, `meterline.priority`: span attribute first, then the resource, then the processor's defaults |
| latency_ms, ts       | span end − start, span end                                               |
| status               | span status ERROR → `error` (`timeout` / `rate_limited` when `error.type` says so), else `ok` |
| attributes           | trace_id, span_id, `gen_ai.operation.name`                              |

Input tokens: the semconv counts cached tokens inside `input_tokens` (as meterline does).
Some instrumentations report them separately; when cache read + write exceed the input
count, the input is taken to exclude them and they are added, rather than rejecting the span.

A span that still breaks the contract is counted in `invalid` and logged; `on_end`
never raises into the tracer.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Protocol

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode

from meterline.schemas import InvalidEvent, build, new_id
from meterline.schemas.events import UsageEvent

log = logging.getLogger("meterline.collectors.otel")

PREFIX = "meterline."
ATTRIBUTION = ("tenant_id", "team", "project", "agent_id", "session_id", "priority")


class EventSink(Protocol):
    def send(self, event: UsageEvent) -> None: ...


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class MeterSpanProcessor(SpanProcessor):
    def __init__(self, sink: EventSink, **defaults: str):
        """`sink`: a Meter (anything with `send(UsageEvent)`). `defaults`: attribution used when
        neither span nor resource carries it, e.g. tenant_id="acme"."""
        unknown = set(defaults) - set(ATTRIBUTION)
        if unknown:
            raise TypeError(f"unknown attribution defaults: {sorted(unknown)}; use {ATTRIBUTION}")
        self.sink = sink
        self.defaults = defaults
        self.metered = 0
        self.ignored = 0
        self.invalid = 0

    def on_end(self, span: ReadableSpan) -> None:
        try:
            event = self.to_event(span)
        except InvalidEvent as err:
            self.invalid += 1
            log.warning("meterline: span %s not metered: %s", span.name, err)
            return
        except Exception:  # noqa: BLE001 - a metering bug must never break the traced application
            self.invalid += 1
            log.exception("meterline: span %s not metered", span.name)
            return
        if event is None:
            self.ignored += 1
            return
        self.sink.send(event)
        self.metered += 1

    def to_event(self, span: ReadableSpan) -> UsageEvent | None:
        """The usage event of a GenAI span, or None for any other span."""
        attrs = span.attributes or {}
        if "gen_ai.usage.input_tokens" not in attrs and "gen_ai.usage.output_tokens" not in attrs:
            return None
        inp = _int(attrs.get("gen_ai.usage.input_tokens"))
        cache_read = _int(attrs.get("gen_ai.usage.cache_read.input_tokens"))
        cache_write = _int(attrs.get("gen_ai.usage.cache_creation.input_tokens"))
        if cache_read + cache_write > inp:
            inp += cache_read + cache_write  # this instrumentation reported input without the cached part
        ctx = span.get_span_context()
        extra = {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"} if ctx else {}
        if attrs.get("gen_ai.operation.name"):
            extra["operation"] = str(attrs["gen_ai.operation.name"])
        end = span.end_time or span.start_time or 0
        return build(
            UsageEvent,
            event_id=new_id(),
            ts=datetime.fromtimestamp(end / 1e9, timezone.utc),
            kind="llm_call",
            provider=str(attrs.get("gen_ai.provider.name") or attrs.get("gen_ai.system") or ""),
            model=str(attrs.get("gen_ai.response.model") or attrs.get("gen_ai.request.model") or ""),
            input_tokens=inp,
            output_tokens=_int(attrs.get("gen_ai.usage.output_tokens")),
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            latency_ms=max(0, (end - (span.start_time or end)) // 1_000_000),
            status=_status(span, attrs),
            attributes=extra,
            **self._attribution(span, attrs),
        )

    def _attribution(self, span: ReadableSpan, attrs) -> dict[str, str]:
        resource = span.resource.attributes if span.resource else {}
        semconv = {"session_id": attrs.get("gen_ai.conversation.id"), "agent_id": attrs.get("gen_ai.agent.id")}
        found = {}
        for name in ATTRIBUTION:
            value = semconv.get(name) or attrs.get(PREFIX + name) or resource.get(PREFIX + name) or self.defaults.get(name)
            if value:
                found[name] = str(value)
        return found

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flush = getattr(self.sink, "flush", None)
        return bool(flush(timeout_millis / 1000)) if flush else True

    def shutdown(self) -> None:
        pass  # the Meter belongs to the application, which closes it


def _status(span: ReadableSpan, attrs) -> str:
    if span.status.status_code is not StatusCode.ERROR:
        return "ok"
    error_type = str(attrs.get("error.type", "")).lower()
    if "timeout" in error_type:
        return "timeout"
    if "ratelimit" in error_type.replace("_", "") or error_type == "429":
        return "rate_limited"
    return "error"
