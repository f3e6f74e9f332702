"""GenAI spans → usage events: one mapping table for every instrumentation dialect.

Used by the in-process `MeterSpanProcessor` (collectors/otel.py) and by the OTLP endpoint
(app/otlp.py) alike: both turn a span into a `SpanView`, call `to_event`, and let one `Nesting`
decide whether the event is the call's own record or another layer's record of the same call.

The table is `DIALECTS`: the first row a span selects wins, the last row takes any span, and adding
a dialect is adding a row. For each count a row lists attributes in order; the first present gives it.

| dialect       | selected by | input / output | cache read / cache write | reasoning | total | input holds cache | output holds reasoning |
|---------------|-------------|----------------|--------------------------|-----------|-------|-------------------|------------------------|
| openinference | `openinference.span.kind`, `llm.token_count.prompt` / `.completion` | `llm.token_count.prompt` / `llm.token_count.completion` | `llm.token_count.prompt_details.cache_read` / `.cache_write` | `llm.token_count.completion_details.reasoning` | `llm.token_count.total` | yes | yes |
| strands       | `gen_ai.system` or `gen_ai.provider.name` = `strands-agents` | semconv names, current and old | `gen_ai.usage.cache_read.input_tokens`, `gen_ai.usage.cache_read_input_tokens` / `gen_ai.usage.cache_write.input_tokens`, `…cache_creation.input_tokens`, `…cache_creation_input_tokens`, `…cache_write_input_tokens` | semconv, OpenLLMetry | `gen_ai.usage.total_tokens`, `llm.usage.total_tokens` | **no** | yes |
| openllmetry   | `llm.request.type`, `llm.usage.total_tokens`, `gen_ai.usage.cache_read_input_tokens`, `gen_ai.usage.cache_creation_input_tokens` (OpenLLMetry before semconv-ai 0.5) | semconv names, current and old | `gen_ai.usage.cache_read_input_tokens`, then semconv / `gen_ai.usage.cache_creation_input_tokens`, then semconv | `llm.usage.reasoning_tokens`, `gen_ai.usage.reasoning_tokens`, semconv | `llm.usage.total_tokens`, `gen_ai.usage.total_tokens` | yes | yes |
| semconv       | any other GenAI span: openai-v2, the Anthropic SDK's own spans, OpenLLMetry >= semconv-ai 0.5 | `gen_ai.usage.input_tokens` (old: `gen_ai.usage.prompt_tokens`) / `gen_ai.usage.output_tokens` (old: `gen_ai.usage.completion_tokens`) | `gen_ai.usage.cache_read.input_tokens` / `gen_ai.usage.cache_write.input_tokens` (old: `gen_ai.usage.cache_creation.input_tokens`) | `gen_ai.usage.reasoning.output_tokens`; OpenLLMetry's `gen_ai.usage.reasoning_tokens` | `gen_ai.usage.total_tokens` | yes | yes |

meterline's meaning is the semconv one: the cache counts are a subset of `input_tokens` and
`reasoning_tokens` a subset of `output_tokens` (providers bill reasoning as output). "Input holds
cache: no" is Anthropic's API style, input reported beside the cache, so the event's input = input
+ cache read + cache write; "output holds reasoning: no" adds reasoning to output. The convention is
the row's, never guessed from the numbers: a span that breaks its own (cache above input, reasoning
above output, a total below a part) raises `InvalidEvent`. With one side missing, the total gives it;
a total alone is `usage="missing"` (kept as `attributes.total_tokens`).

Common to every dialect:

| usage event          | span                                                                                      |
|----------------------|-------------------------------------------------------------------------------------------|
| provider             | `gen_ai.provider.name`, `gen_ai.system`, `llm.provider`, `llm.system` (lower-cased)       |
| model                | `gen_ai.response.model`, `llm.response.model_name`, `llm.response.model`, `llm.model_name`, `gen_ai.request.model`, `llm.request.model_name`, `llm.request.model`, `embedding.model_name`, then `model` in OpenInference's `llm.invocation_parameters` |
| session_id, agent_id | `gen_ai.conversation.id` / OpenInference's `session.id`, `gen_ai.agent.id`, else `meterline.*` |
| attribution          | `meterline.tenant_id`, `.team`, `.project`, `.agent_id`, `.session_id`, `.priority`: the span, then `context` (its ancestors', then baggage), then the resource, then `defaults` |
| status               | error status → `rate_limited` (HTTP 429, `RateLimitError`, `rate_limit_error`), `timeout` (`APITimeoutError`, `client_timeout_error`, 408/504), `cancelled`, else `error`: from `error.type`, the HTTP status, the status message and exception events; a failed call without usage has zero tokens |
| usage                | a completed model call with no token count at all (a stream without include_usage): `usage="missing"`, zero tokens |
| attributes           | trace_id, span_id, dialect, operation (`gen_ai.operation.name` / `llm.request.type`), scope (the instrumentation library) |

`is_genai`: a span with any key of a dialect (`gen_ai.operation.name`, `gen_ai.provider.name`,
`gen_ai.system`, `llm.request.type`, `openinference.span.kind`, a token count, `llm.model_name` ...).
A GenAI span with usage is an event whatever its operation (an agent span that sums its calls is then
dropped as nested when its calls are metered); one without usage is an event only when it is a model
call (`is_model_call`: operation chat, text_completion, generate_content, embeddings, ...; OpenInference
kind LLM or EMBEDDING; OpenLLMetry request type) naming a model, so agent, tool, task and workflow spans
and the Anthropic SDK's `count_tokens` are not calls that "reported no usage".

What the libraries put on their spans (tests/test_instrumentations.py checks each against a fake provider):

| library                                      | limitation (nothing to map: meterline does not guess)                    |
|----------------------------------------------|--------------------------------------------------------------------------|
| opentelemetry-instrumentation-openai-v2 2.4b0 | chat spans carry no cached and no reasoning tokens (input/output include them: cached input is priced at the full input rate); the Responses API makes no span, so it is not metered |
| opentelemetry-instrumentation-openai 0.62 (OpenLLMetry) | a streamed chat completion has no reasoning tokens                  |
| opentelemetry-instrumentation-langchain 0.62 (OpenLLMetry) | a stream names the requested alias as the response model and suppresses the OpenAI span |
| OpenLLMetry anthropic + the Anthropic SDK >= 2 | two sibling spans per call (the instrumentor's span is not made current): `Nesting` keeps the SDK's |
"""
from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from meterline.schemas import InvalidEvent, build, new_id
from meterline.schemas.events import MAX_ATTRIBUTE_VALUE_LEN, UsageEvent

SPAN_IDS = uuid.UUID("5b1f0c8e-3d2a-4f7e-9a61-0c4d2e8b7f13")  # namespace of event ids made from span ids


def span_event_id(span: SpanView) -> uuid.UUID | str:
    """One id per span (trace id + span id): an exporter that re-sends a batch after a timeout, or a
    span seen both in-process and over OTLP, repeats the id, and the stream's first-write rule charges
    it once. A span without ids (never valid OTel) gets a fresh id."""
    if not span.trace_id or not span.span_id:
        return new_id()
    return uuid.uuid5(SPAN_IDS, f"{span.trace_id:032x}{span.span_id:016x}")

PREFIX = "meterline."
ATTRIBUTION = ("tenant_id", "team", "project", "agent_id", "session_id", "priority")
BAGGAGE_KEYS = tuple(PREFIX + name for name in ATTRIBUTION)
_EMPTY: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True)
class SpanView:
    """What metering needs of a span, from an SDK `ReadableSpan` or an OTLP protobuf alike."""

    name: str
    trace_id: int
    span_id: int
    parent_span_id: int | None
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any]
    resource: Mapping[str, Any]
    error: bool
    status_message: str = ""
    events: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    scope: str = ""  # the instrumentation scope (library) that made the span; tells two layers of one call apart


Keys = tuple[str, ...]
Match = tuple[str | tuple[str, str], ...]  # an attribute's presence, or (attribute, value)


@dataclass(frozen=True, slots=True)
class Dialect:
    """One row of the mapping table: where an instrumentation family puts each count, and how it counts.

    Each field lists attributes in order; the first one present gives the count."""

    name: str
    selected_by: Match  # any of these selects the row; () selects any span (the last row)
    input: Keys
    output: Keys
    cache_read: Keys = ()
    cache_write: Keys = ()
    reasoning: Keys = ()
    total: Keys = ()
    input_holds_cache: bool = True  # False: input is reported beside cache read and write (Anthropic's API style)
    output_holds_reasoning: bool = True  # False: output is reported without the reasoning tokens


SEMCONV_INPUT = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
SEMCONV_OUTPUT = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
CACHE_READ_ALIASES = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens")
CACHE_WRITE_ALIASES = ("gen_ai.usage.cache_write.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
                       "gen_ai.usage.cache_creation_input_tokens", "gen_ai.usage.cache_write_input_tokens")
# The tier that served the call (semconv's OpenAI registry; the gen_ai.openai.* names are the deprecated ones),
# else the one requested. Values genai-prices prices pass; "standard" is Anthropic's word for the default;
# others ("auto", "scale") are kept in attributes and priced as default.
SERVICE_TIER_KEYS = ("openai.response.service_tier", "gen_ai.openai.response.service_tier",
                     "openai.request.service_tier", "gen_ai.openai.request.service_tier")
SERVICE_TIER_NAMES = {"default": "default", "standard": "default", "flex": "flex", "priority": "priority"}
REASONING_ALIASES = ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens", "llm.usage.reasoning_tokens")
TOTAL_ALIASES = ("gen_ai.usage.total_tokens", "llm.usage.total_tokens")

DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        "openinference",
        selected_by=("openinference.span.kind", "llm.token_count.prompt", "llm.token_count.completion"),
        input=("llm.token_count.prompt",),
        output=("llm.token_count.completion",),
        cache_read=("llm.token_count.prompt_details.cache_read",),
        cache_write=("llm.token_count.prompt_details.cache_write",),
        reasoning=("llm.token_count.completion_details.reasoning",),
        total=("llm.token_count.total",),
    ),
    Dialect(
        "strands",  # Strands Agents passes Bedrock's / Anthropic's counts through: input beside the cache
        selected_by=(("gen_ai.system", "strands-agents"), ("gen_ai.provider.name", "strands-agents")),
        input=SEMCONV_INPUT,
        output=SEMCONV_OUTPUT,
        cache_read=CACHE_READ_ALIASES,
        cache_write=CACHE_WRITE_ALIASES,
        reasoning=REASONING_ALIASES,
        total=TOTAL_ALIASES,
        input_holds_cache=False,
    ),
    Dialect(
        "openllmetry",  # OpenLLMetry before semconv-ai 0.5 (llm.request.type, prompt/completion tokens, *_input_tokens)
        selected_by=("llm.request.type", "llm.usage.total_tokens", "gen_ai.usage.cache_read_input_tokens",
                     "gen_ai.usage.cache_creation_input_tokens"),
        input=SEMCONV_INPUT,
        output=SEMCONV_OUTPUT,
        cache_read=("gen_ai.usage.cache_read_input_tokens", "gen_ai.usage.cache_read.input_tokens"),
        cache_write=("gen_ai.usage.cache_creation_input_tokens", "gen_ai.usage.cache_creation.input_tokens",
                     "gen_ai.usage.cache_write.input_tokens"),
        reasoning=("llm.usage.reasoning_tokens", "gen_ai.usage.reasoning_tokens", "gen_ai.usage.reasoning.output_tokens"),
        total=("llm.usage.total_tokens", "gen_ai.usage.total_tokens"),
    ),
    Dialect(
        "semconv",  # OpenTelemetry GenAI semconv, current and older names (openai-v2, the Anthropic SDK, OpenLLMetry >= 0.5)
        selected_by=(),
        input=SEMCONV_INPUT,
        output=SEMCONV_OUTPUT,
        cache_read=("gen_ai.usage.cache_read.input_tokens",),
        cache_write=("gen_ai.usage.cache_write.input_tokens", "gen_ai.usage.cache_creation.input_tokens"),
        reasoning=("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens"),
        total=("gen_ai.usage.total_tokens",),
    ),
)

PROVIDER_KEYS = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
# OpenInference puts the answered model in llm.model_name (llm.response.model_name in newer versions)
MODEL_KEYS = ("gen_ai.response.model", "llm.response.model_name", "llm.response.model", "llm.model_name",
              "gen_ai.request.model", "llm.request.model_name", "llm.request.model", "embedding.model_name")
INVOCATION_PARAMETERS = "llm.invocation_parameters"  # OpenInference: the request as JSON (a failed call has only this)
OPERATION_KEYS = ("gen_ai.operation.name", "llm.request.type")
# A span without usage is a call that reported none only when it is a model call: an agent, tool, task or
# workflow span (or the Anthropic SDK's count_tokens, which names a provider and a model) is not one.
MODEL_CALL_OPERATIONS = frozenset(("chat", "text_completion", "generate_content", "embeddings", "completion",
                                   "responses", "response", "llm_request"))
MODEL_CALL_REQUEST_TYPES = frozenset(("chat", "completion", "embedding", "rerank"))  # OpenLLMetry's llm.request.type
MODEL_CALL_KINDS = frozenset(("LLM", "EMBEDDING"))  # openinference.span.kind
SPAN_SEMCONV = {"session_id": ("gen_ai.conversation.id", "session.id"), "agent_id": ("gen_ai.agent.id",)}
GENAI_MARKERS = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system", "llm.request.type",
                 "openinference.span.kind", "llm.token_count.prompt", "llm.token_count.completion",
                 "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.usage.prompt_tokens",
                 "gen_ai.usage.completion_tokens", "llm.model_name", "llm.provider", "llm.system")


def is_genai(attributes: Mapping[str, Any]) -> bool:
    """Is this a GenAI span (of any dialect)? A few key lookups, all under gen_ai., llm. or openinference."""
    return any(key in attributes for key in GENAI_MARKERS)


def is_model_call(attributes: Mapping[str, Any]) -> bool:
    """A GenAI span that stands for one call of a model (not an agent, tool or workflow span)."""
    get = attributes.get
    op = get("gen_ai.operation.name")
    if op is not None:
        return op in MODEL_CALL_OPERATIONS
    kind = get("openinference.span.kind")
    if kind is not None:
        return kind in MODEL_CALL_KINDS
    request_type = get("llm.request.type")
    return request_type is not None and request_type in MODEL_CALL_REQUEST_TYPES


def _selects(row: Dialect, attributes: Mapping[str, Any]) -> bool:
    if not row.selected_by:
        return True
    for match in row.selected_by:
        if isinstance(match, tuple):
            if attributes.get(match[0]) == match[1]:
                return True
        elif match in attributes:
            return True
    return False


def dialect_of(attributes: Mapping[str, Any]) -> Dialect:
    """The first row of DIALECTS that the span's attributes select."""
    for row in DIALECTS:
        if _selects(row, attributes):
            return row
    return DIALECTS[-1]


def _count(attributes: Mapping[str, Any], keys: Keys, field: str, errors: list) -> int | None:
    """The first of `keys` present, as a token count (None when none is)."""
    for key in keys:
        value = attributes.get(key)
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and len(value) <= 20 and value.isascii() and value.isdigit():
            return int(value)
        errors.append((field, f"{key} is {repr(value)[:40]}, not a token count"))
        return 0
    return None


def _rest(total: int | None, part: int, field: str, errors: list) -> int:
    if total is None:
        return 0
    if total < part:
        errors.append((field, f"the total {total} is below the other side's {part} tokens"))
        return 0
    return total - part


def _requested_model(attributes: Mapping[str, Any]) -> str:
    raw = attributes.get(INVOCATION_PARAMETERS)
    if not isinstance(raw, str) or len(raw) > 65_536:
        return ""
    try:
        params = json.loads(raw)
    except ValueError:
        return ""
    if not isinstance(params, dict):
        return ""
    model = params.get("model") or params.get("model_name")
    return model if isinstance(model, str) else ""


def _first(attributes: Mapping[str, Any], keys: Keys) -> str:
    for key in keys:
        value = attributes.get(key)
        if value is not None and value != "":
            return str(value)
    return ""


def _service_tier(attrs: Mapping[str, Any], extra: dict[str, str]) -> dict[str, Any]:
    """service_tier for the event; an unpriced tier goes to attributes (the call is priced as default)."""
    tier = next((str(attrs[k]).lower() for k in SERVICE_TIER_KEYS if attrs.get(k) not in (None, "", "auto")), "")
    if not tier:
        return {}
    if tier not in SERVICE_TIER_NAMES:
        extra["service_tier"] = tier[:MAX_ATTRIBUTE_VALUE_LEN]
        return {}
    return {"service_tier": SERVICE_TIER_NAMES[tier]}


def to_event(span: SpanView, context: Mapping[str, str] = _EMPTY, defaults: Mapping[str, str] = _EMPTY) -> UsageEvent | None:
    """The usage event of a GenAI span; None for any other span (or a GenAI span with neither usage
    nor a model, which names no call). `context`: attribution (bare names, `tenant_id` ...) resolved
    from the span's ancestors and baggage. Raises InvalidEvent for a GenAI span that breaks the contract."""
    attrs = span.attributes
    if not is_genai(attrs):
        return None
    provider = _first(attrs, PROVIDER_KEYS).lower()
    model = _first(attrs, MODEL_KEYS) or _requested_model(attrs)
    dialect = dialect_of(attrs)
    errors: list[tuple[str, str]] = []
    inp = _count(attrs, dialect.input, "input_tokens", errors)
    out = _count(attrs, dialect.output, "output_tokens", errors)
    total = _count(attrs, dialect.total, "input_tokens", errors)
    cache_read = _count(attrs, dialect.cache_read, "cache_read_tokens", errors) or 0
    cache_write = _count(attrs, dialect.cache_write, "cache_write_tokens", errors) or 0
    reasoning = _count(attrs, dialect.reasoning, "reasoning_tokens", errors) or 0
    extra: dict[str, str] = {"trace_id": f"{span.trace_id:032x}", "span_id": f"{span.span_id:016x}", "dialect": dialect.name}
    op = _first(attrs, OPERATION_KEYS)
    if op:
        extra["operation"] = op
    if span.scope:
        extra["scope"] = span.scope[:MAX_ATTRIBUTE_VALUE_LEN]
    missing = inp is None and out is None
    if missing:
        if not model or not is_model_call(attrs):
            return None  # a GenAI span that is no model call (an agent, a tool, a chain), or names no model
        if total is not None:
            extra["total_tokens"] = str(total)  # a total alone cannot be split into input and output
        inp = out = cache_read = cache_write = reasoning = 0
    else:
        if inp is not None and not dialect.input_holds_cache:
            inp += cache_read + cache_write  # the event's input counts every input token
        if out is not None and not dialect.output_holds_reasoning:
            out += reasoning  # reasoning is billed as output
        # one side missing: the total (every input and output token) gives it
        if inp is None:
            inp = _rest(total, out, "input_tokens", errors)
        elif out is None:
            out = _rest(total, inp, "output_tokens", errors)
    if errors:
        raise InvalidEvent("UsageEvent", errors)
    status = status_of(span) if span.error else "ok"
    fields: dict[str, Any] = _service_tier(attrs, extra)
    if missing and status == "ok":
        fields["usage"] = "missing"
    end = span.end_ns or span.start_ns
    return build(
        UsageEvent,
        event_id=span_event_id(span),
        ts=datetime.fromtimestamp(end / 1e9, timezone.utc),
        kind="llm_call",
        provider=provider,
        model=model,
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
        latency_ms=max(0, (end - (span.start_ns or end)) // 1_000_000),
        status=status,
        attributes=extra,
        **fields,
        **attribution(span, context, defaults),
    )


def attribution(span: SpanView, context: Mapping[str, str] = _EMPTY, defaults: Mapping[str, str] = _EMPTY) -> dict[str, str]:
    """meterline.* attribution: span (semconv names first), then context, then resource, then defaults."""
    attrs, resource = span.attributes, span.resource
    found = {}
    for name in ATTRIBUTION:
        value = None
        for key in SPAN_SEMCONV.get(name, ()):
            value = attrs.get(key)
            if value:
                break
        value = (value or attrs.get(PREFIX + name) or context.get(name) or resource.get(PREFIX + name)
                 or defaults.get(name))
        if value:
            found[name] = str(value)
    return found


def ancestors_attribution(chain: list[Mapping[str, Any]]) -> dict[str, str]:
    """Attribution from a list of attribute maps, nearest first (parent, grandparent, ... then baggage)."""
    found: dict[str, str] = {}
    for attrs in chain:
        for name in ATTRIBUTION:
            if name not in found:
                value = attrs.get(PREFIX + name)
                if value:
                    found[name] = str(value)
        if len(found) == len(ATTRIBUTION):
            break
    return found


def _status_words(span: SpanView) -> list[str]:
    words = [str(span.attributes.get("error.type", "")), span.status_message]
    for name, event_attrs in span.events:
        if name == "exception":
            words.append(str(event_attrs.get("exception.type", "")))
            words.append(str(event_attrs.get("exception.message", ""))[:200])
    return words


HTTP_STATUS_KEYS = ("http.response.status_code", "http.status_code")


def status_of(span: SpanView) -> str:
    """The status of a failed call: rate_limited, timeout, cancelled or error."""
    for key in HTTP_STATUS_KEYS:
        code = span.attributes.get(key)
        if code is not None and str(code) == "429":
            return "rate_limited"
        if code is not None and str(code) in ("408", "504"):
            return "timeout"
    text = " ".join(_status_words(span)).lower().replace("_", "")
    if "ratelimit" in text or "429" in text or "toomanyrequests" in text:
        return "rate_limited"
    if "timeout" in text or "timedout" in text:
        return "timeout"
    if "cancelled" in text or "canceled" in text:
        return "cancelled"
    return "error"


NONE, WEAK, STRONG = 0, 1, 2  # how a span is covered by another layer's record of the same call
SIBLINGS_KEPT = 16  # recent GenAI spans remembered per parent
ROOT = (-1, -1)  # the "parent" of spans without one: layers that each start a trace of their own


@dataclass(frozen=True, slots=True)
class _Layer:
    """A settled GenAI span, as a sibling that ends later may have to recognise it."""

    scope: str
    provider: str
    model: str
    start_us: int
    end_us: int
    level: int

    @classmethod
    def of(cls, event: UsageEvent, level: int) -> _Layer:
        end_us = round(event.ts.timestamp() * 1_000_000)
        return cls(event.attributes.get("scope", ""), event.provider, event.model, end_us - event.latency_ms * 1000,
                   end_us, level)

    def inside(self, outer: _Layer) -> bool:
        """Is this the same call as `outer`, traced by another library inside it? Another instrumentation
        scope (both known: spans of unknown scope are never taken for layers), the same provider, the same
        model (or alias and dated snapshot, one a prefix of the other) and within its time (the end is exact to
        the microsecond; the start, from a latency in whole milliseconds, has 1 ms of slack)."""
        return bool(self.scope and outer.scope and self.scope != outer.scope
                and (not self.provider or not outer.provider or self.provider == outer.provider)
                and (self.model.startswith(outer.model) or outer.model.startswith(self.model))
                and self.start_us >= outer.start_us - 1000 and self.end_us <= outer.end_us + 2)


class Nesting:
    """One event per model call when several layers trace it (an instrumentor around the SDK's own
    spans, langchain around openai): the innermost GenAI span with usage wins. Spans are settled in
    end-time order, so the inner layer, which ends first, is settled first.

    - Parent and child: coverage flows up as spans end. A span whose event was sent covers its parent
      (STRONG when the event had usage, WEAK when it had none: an error or a missing-usage record); a
      covered span passes its cover on to its parent when it ends, GenAI or not.
    - Siblings: layers that do not make their span current (OpenLLMetry's anthropic instrumentor and
      the Anthropic SDK's own span; OpenInference's langchain and openai spans) trace one call as two
      children of the caller's span, or as two root spans when there is no caller span. A GenAI span
      covers a later-ending sibling of another instrumentation scope, same provider and model, whose
      time contains its own (`_Layer.inside`). Two concurrent calls each traced by two layers still make
      two events: an outer span is only ever dropped for an inner one, never an inner for an inner.

    A GenAI span that ends STRONG-covered is not sent (nested); one that ends WEAK-covered is not sent
    unless it has usage of its own (tokens are never dropped to keep a call's count). Works in process
    (the span processor) and for OTLP batches (spans in end-time order; cover waits in a bounded LRU
    for a parent that comes in a later batch).
    """

    def __init__(self, max_spans: int = 65_536):
        self.max_spans = max_spans
        self._covered: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._siblings: OrderedDict[tuple[int, int], list[_Layer]] = OrderedDict()

    def covered(self, trace_id: int, span_id: int) -> int:
        """NONE, WEAK or STRONG: how the span is covered by its descendants so far."""
        return self._covered.get((trace_id, span_id), NONE)

    def _cover(self, trace_id: int, parent_span_id: int | None, level: int) -> None:
        if not parent_span_id or level == NONE:
            return
        key = (trace_id, parent_span_id)
        if self._covered.get(key, NONE) < level:
            self._covered[key] = level
        self._covered.move_to_end(key)
        while len(self._covered) > self.max_spans:
            self._covered.popitem(last=False)

    def _sibling_cover(self, key: tuple[int, int], layer: _Layer) -> int:
        layers = self._siblings.get(key)
        level = NONE
        if layers:
            for other in layers:
                if other.level > level and other.inside(layer):
                    level = other.level
        return level

    def _remember(self, key: tuple[int, int], layer: _Layer) -> None:
        layers = self._siblings.get(key)
        if layers is None:
            layers = self._siblings[key] = []
        else:
            self._siblings.move_to_end(key)
        layers.append(layer)
        if len(layers) > SIBLINGS_KEPT:
            del layers[0]
        while len(self._siblings) > self.max_spans:
            self._siblings.popitem(last=False)

    def settle(self, trace_id: int, span_id: int, parent_span_id: int | None, event: UsageEvent | None) -> bool:
        """A span ended: should its event (None for a span without one) be sent? Updates the cover of its
        parent. False for an event means another layer's record of a call already metered."""
        level = self._covered.pop((trace_id, span_id), NONE)
        self._siblings.pop((trace_id, span_id), None)  # its children can have no later sibling
        if event is None:
            self._cover(trace_id, parent_span_id, level)
            return False
        has_usage = event.usage != "missing" and not _zero_error(event)
        layer = _Layer.of(event, STRONG if has_usage else WEAK)
        if layer.scope:
            sibling_key = (trace_id, parent_span_id) if parent_span_id else ROOT
            level = max(level, self._sibling_cover(sibling_key, layer))
            self._remember(sibling_key, layer)
        send = level == NONE or (level == WEAK and has_usage)
        own = layer.level if send else NONE
        self._cover(trace_id, parent_span_id, max(level, own))
        return send

    def __len__(self) -> int:
        """Covers waiting for their parent span (siblings remembered are not counted: they only ever
        drop a later span, so a caller may skip settling non-GenAI spans while this is 0)."""
        return len(self._covered)


def _zero_error(event: UsageEvent) -> bool:
    return event.status != "ok" and event.input_tokens == 0 and event.output_tokens == 0
