"""OpenTelemetry bridge: a SpanProcessor that meters the GenAI spans of any instrumentation.

    provider = TracerProvider(resource=Resource.create({"meterline.tenant_id": "acme", "meterline.team": "search"}))
    provider.add_span_processor(MeterSpanProcessor(meter))

The mapping of every dialect (OpenTelemetry GenAI semconv and its older names, OpenLLMetry,
OpenInference) is one table in `collectors/genai.py`; this module only adapts the SDK's spans
to it:

- `on_start` remembers each span (bounded, forgotten at its end) with the meterline.* baggage of
  the context it starts in, so attribution is resolved when the span ends: the span's own
  `meterline.*` attributes, then its ancestors' in this process (read at the child's end, so a
  `meterline.tenant_id` set on the caller's span right after `start_as_current_span` still
  counts), then W3C baggage (`meterline.tenant_id` ..., set by `meter.session(...)` and carried
  across services by the standard propagators), then the resource, then the processor's defaults.
- `on_end` makes the event (`genai.to_event`) and lets `genai.Nesting` drop a second layer's
  record of a call already metered (an instrumentor around the SDK's own spans, langchain around
  openai).

Every ended span lands in one counter: `metered` (an event with usage, failed calls included),
`unmetered` (a completed call whose instrumentation reported no usage: sent with
usage="missing"), `nested` (another layer of a metered call), `ignored` (not a model call),
`invalid` (broke the contract: logged). `on_end` never raises into the tracer.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Mapping, Protocol

from opentelemetry import baggage
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import StatusCode

from meterline.schemas import InvalidEvent
from meterline.schemas.events import UsageEvent

from .genai import ATTRIBUTION, BAGGAGE_KEYS, PREFIX, Nesting, SpanView, to_event

log = logging.getLogger("meterline.collectors.otel")

MAX_DEPTH = 64  # ancestors looked at for attribution


class EventSink(Protocol):
    def send(self, event: UsageEvent) -> None: ...


def span_view(span: ReadableSpan) -> SpanView:
    """An SDK span as genai's SpanView."""
    ctx = span.get_span_context()
    parent = span.parent
    error = span.status.status_code is StatusCode.ERROR
    end = span.end_time or span.start_time or 0
    return SpanView(
        name=span.name,
        trace_id=ctx.trace_id if ctx else 0,
        span_id=ctx.span_id if ctx else 0,
        parent_span_id=parent.span_id if parent is not None else None,
        start_ns=span.start_time or end,
        end_ns=end,
        attributes=span.attributes or {},
        resource=span.resource.attributes if span.resource else {},
        error=error,
        status_message=(span.status.description or "") if error else "",
        events=tuple((e.name, e.attributes or {}) for e in span.events) if error else (),
        scope=span.instrumentation_scope.name if span.instrumentation_scope is not None else "",
    )


class _Started:
    """What on_start keeps of a span until it ends: its parent, the live span (whose attributes its
    children read at their end) and the meterline.* baggage it started under."""

    __slots__ = ("parent", "span", "baggage")

    def __init__(self, parent: tuple[int, int] | None, span: Span, bag: dict[str, Any] | None):
        self.parent, self.span, self.baggage = parent, span, bag


class MeterSpanProcessor(SpanProcessor):
    def __init__(self, sink: EventSink, *, max_spans: int = 65_536, **defaults: str):
        """`sink`: a Meter (anything with `send(UsageEvent)`). `defaults`: attribution used when neither
        the span, its ancestors, baggage nor the resource carries it, e.g. tenant_id="acme".
        `max_spans` bounds the spans remembered between start and end (and the nesting cover)."""
        unknown = set(defaults) - set(ATTRIBUTION)
        if unknown:
            raise TypeError(f"unknown attribution defaults: {sorted(unknown)}; use {ATTRIBUTION}")
        self.sink = sink
        self.defaults = defaults
        self.max_spans = max_spans
        self.nesting = Nesting(max_spans)
        self._open: OrderedDict[tuple[int, int], _Started] = OrderedDict()
        self._lock = threading.Lock()
        self.metered = 0
        self.unmetered = 0
        self.nested = 0
        self.ignored = 0
        self.invalid = 0

    # ---- span start: remember the parent, the live span and the baggage ------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:
            ctx = span.get_span_context()
            parent = span.parent
            bag = None
            entries = baggage.get_all(parent_context)
            if entries:
                bag = {k[len(PREFIX):]: v for k, v in entries.items() if k in BAGGAGE_KEYS and v}
            entry = _Started((ctx.trace_id, parent.span_id) if parent is not None else None, span, bag or None)
            with self._lock:
                self._open[(ctx.trace_id, ctx.span_id)] = entry
                if len(self._open) > self.max_spans:  # spans that never end must not grow memory
                    self._open.popitem(last=False)
        except Exception:  # noqa: BLE001 - never break the traced application
            log.exception("meterline: on_start failed for span %s", getattr(span, "name", "?"))

    def _context(self, key: tuple[int, int]) -> dict[str, str]:
        """Attribution from the ancestors (nearest first), then the baggage the span started under."""
        found: dict[str, str] = {}
        entry = self._open.get(key)
        bags = [entry.baggage] if entry is not None and entry.baggage else []
        parent = entry.parent if entry is not None else None
        for _ in range(MAX_DEPTH):
            if parent is None:
                break
            ancestor = self._open.get(parent)
            if ancestor is None:
                break
            attrs = ancestor.span.attributes or {}
            for name in ATTRIBUTION:
                if name not in found:
                    value = attrs.get(PREFIX + name)
                    if value:
                        found[name] = str(value)
            if ancestor.baggage:  # a server span started in the extracted context that was never attached
                bags.append(ancestor.baggage)
            parent = ancestor.parent
        for bag in bags:
            for name, value in bag.items():
                found.setdefault(name, str(value))
        return found

    # ---- span end: meter it ------------------------------------------------------------------

    def on_end(self, span: ReadableSpan) -> None:
        try:
            view = span_view(span)
        except Exception:  # noqa: BLE001 - a metering bug must never break the traced application
            self._tally("invalid")
            log.exception("meterline: span %s not metered", span.name)
            return
        key = (view.trace_id, view.span_id)
        outcome = "ignored"
        try:
            with self._lock:
                context = self._context(key)
            event = to_event(view, context, self.defaults)
        except InvalidEvent as err:
            event, outcome = None, "invalid"
            log.warning("meterline: span %s not metered: %s", span.name, err)
        except Exception:  # noqa: BLE001
            event, outcome = None, "invalid"
            log.exception("meterline: span %s not metered", span.name)
        with self._lock:
            self._open.pop(key, None)
            send = self.nesting.settle(view.trace_id, view.span_id, view.parent_span_id, event)
        if event is not None:
            outcome = "nested"
            if send:
                try:
                    self.sink.send(event)
                    outcome = "unmetered" if event.usage == "missing" else "metered"
                except Exception:  # noqa: BLE001
                    outcome = "invalid"
                    log.exception("meterline: the event of span %s was not sent", span.name)
        self._tally(outcome)

    def _tally(self, outcome: str) -> None:
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)

    def to_event(self, span: ReadableSpan, context: Mapping[str, str] | None = None) -> UsageEvent | None:
        """The usage event of one GenAI span (no nesting), or None for any other span."""
        return to_event(span_view(span), context or {}, self.defaults)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flush = getattr(self.sink, "flush", None)
        return bool(flush(timeout_millis / 1000)) if flush else True

    def shutdown(self) -> None:
        pass  # the Meter belongs to the application, which closes it
