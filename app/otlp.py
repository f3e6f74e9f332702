"""OTLP/HTTP traces in `meterline up`: POST /v1/traces meters GenAI spans with no meterline code.

    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://127.0.0.1:8787/v1/traces  (any language's OTLP exporter)

What the endpoint accepts, per the OTLP/HTTP specification:

* `Content-Type: application/x-protobuf` (an `ExportTraceServiceRequest`, decoded with the
  `opentelemetry-proto` classes) or `application/json` (OTLP JSON: hex trace/span ids, int64 as a
  string or a number, enums as integers, lowerCamelCase or snake_case field names); anything else
  is 415.
* `Content-Encoding: gzip` (or deflate, or none; others 415). The body is bounded as sent and again
  after decompression (MAX_BODY_BYTES, MAX_DECODED_BYTES: 413 beyond), so a gzip bomb costs at most
  that: aiohttp inflates request bodies incrementally as they are read, and `read_body` stops reading
  at the limit (`decompress` does the same where the server has not inflated the body).
* 200 with an `ExportTraceServiceResponse` in the request's encoding; `partial_success` carries the
  number of GenAI spans that broke the contract and the first reasons. 400 for a body that does not
  decode, 403 for a reader token, 503 when the endpoint has no Kafka or the Meter's queue cannot
  take the batch (exporters retry 503). Errors carry a google.rpc.Status (code, message).

The mapping is collectors/genai.py's, the one the in-process span processor uses: `is_genai`
says which spans are model calls, `to_event` makes the event, `Nesting` keeps one event per call
when GenAI spans nest (every span of a batch is settled in end-time order, parents from the
payload, so a cover passes through non-GenAI spans too; an LRU keeps it across batches).
Non-GenAI spans are ignored cheaply: nothing is converted for them; a span whose bytes hold no
GenAI key prefix (`gen_ai.`, `llm.`, `openinference.`) costs a byte search (and, while a cover waits
for a parent, a look at whether it is that parent); a body without any such prefix is only counted.

Attribution (genai.attribution): the span's `meterline.*` attributes, then its ancestors' in the
same request (same trace, nearest first, parent ids from the payload), then its resource's. When the
API has tokens, posting needs a token that may write usage: `tenant:<id>` (that tenant is forced
onto every event, whatever the payload says: an agent cannot bill another tenant) or admin
(payload attribution). With no token (loopback only) payload attribution is used.

Events go to the usage topic through one long-lived `Meter` owned by the endpoint (made on the
first GenAI span, flushed and closed when the API stops), so delivery, outage spooling and drop
counting are the SDK's. A 200 means what `meter.record_llm` returning means: queued for delivery.
Decoding and mapping run on one thread of the endpoint's own (never the API's query pool), which
also keeps the nesting state single-threaded.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from meterline.streams.codec import leb128

log = logging.getLogger("meterline.app.otlp")

MAX_BODY_BYTES = 8 << 20  # a request body, as sent (compressed or not)
MAX_DECODED_BYTES = 8 << 20  # the same body after decompression
MAX_VALUE_DEPTH = 16  # arrayValue / kvlistValue nesting
MAX_ANCESTORS = 128  # parent hops followed for attribution
MAX_ERROR_REASONS = 3  # reasons quoted in partial_success.error_message
PROTOBUF, JSON = "application/x-protobuf", "application/json"
CONTENT_TYPES = {PROTOBUF: PROTOBUF, "application/protobuf": PROTOBUF, JSON: JSON}
GENAI, MARK = 1, 2  # a span has a key of a GenAI dialect / a meterline.* key
# genai.is_genai looks only at keys under these prefixes (gen_ai.*, OpenLLMetry's llm.*, openinference.*):
# a span without any is no model call, and a body without any of them has no GenAI span
GENAI_PREFIXES = ("gen_ai.", "llm.", "openinference.")
BODY_MARKERS = tuple(prefix.encode() for prefix in GENAI_PREFIXES)
MARK_PREFIX = "meterline."
MARK_MARKER = MARK_PREFIX.encode()
TENANT_KEY = MARK_PREFIX + "tenant_id"
_INT_RE = re.compile(r"-?[0-9]{1,20}")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")
# google.rpc.Code for the Status body of a failed request
_RPC_CODE = {400: 3, 403: 7, 413: 8, 415: 3, 503: 14}


class OtlpError(Exception):
    """A request answered with `status` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- the body: bounded reading and decompression ------------------------------------------------------------


async def read_body(request, limit: int = MAX_BODY_BYTES, decoded_limit: int = MAX_DECODED_BYTES) -> tuple[bytes, bool]:
    """(the body, whether the server already decompressed it), refused with 413 past the limits.

    aiohttp decompresses gzip and deflate request bodies itself, incrementally (a bounded amount per
    step), so reading at most `decoded_limit` bytes from the stream bounds a bomb's output, while
    Content-Length and the stream's compressed count bound what was sent. aiohttp's own
    client_max_size is not used (it only applies to request.read())."""
    from aiohttp import web
    from aiohttp.http_exceptions import HttpProcessingError

    if request.content_length is not None and request.content_length > limit:
        raise OtlpError(413, f"the body is {request.content_length} bytes; at most {limit} are accepted")
    stream = request.content
    chunks, size = [], 0
    while True:
        try:
            chunk = await stream.read(1 << 16)
        except (HttpProcessingError, web.RequestPayloadError) as err:  # e.g. a gzip body that does not decompress
            raise OtlpError(400, f"the body does not decode: {' '.join(str(err).split())}") from None
        decoded = getattr(stream, "total_compressed_bytes", None) is not None
        if not chunk:
            return b"".join(chunks), decoded
        size += len(chunk)
        if decoded and (size > decoded_limit or stream.total_compressed_bytes > limit):
            raise OtlpError(413, f"the body decompresses to over {decoded_limit} bytes; send smaller batches")
        if not decoded and size > limit:
            raise OtlpError(413, f"the body is over {limit} bytes; send smaller batches")
        chunks.append(chunk)


ENCODINGS = ("", "identity", "gzip", "x-gzip", "deflate")


def undecoded(body: bytes, encoding: str) -> bool:
    """Whether a body still looks compressed as its Content-Encoding says (an older aiohttp decompresses
    without saying so; protobuf and JSON bodies never start like gzip or zlib)."""
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return body[:2] == b"\x1f\x8b"
    if encoding == "deflate":
        return len(body) >= 2 and body[0] & 0x0F == 8 and ((body[0] << 8) | body[1]) % 31 == 0
    return False


def decompress(body: bytes, encoding: str, limit: int = MAX_DECODED_BYTES) -> bytes:
    """The body per its Content-Encoding, never more than `limit` bytes of output (413 beyond)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise OtlpError(415, f"Content-Encoding {encoding!r} is not supported; use gzip or none")
    wbits = 31 if encoding != "deflate" else 15  # gzip / zlib; a raw deflate stream is retried below
    out, data = [], body
    size = 0
    while data:
        inflater = zlib.decompressobj(wbits)
        try:
            piece = inflater.decompress(data, limit - size + 1)
        except zlib.error as err:
            if encoding == "deflate" and wbits == 15 and not out:
                wbits, data = -15, body  # some clients send raw deflate without the zlib header
                continue
            raise OtlpError(400, f"the {encoding} body does not decompress: {err}") from None
        size += len(piece)
        if size > limit or inflater.unconsumed_tail:
            raise OtlpError(413, f"the body decompresses to over {limit} bytes; send smaller batches")
        if not inflater.eof:
            raise OtlpError(400, f"the {encoding} body is truncated")
        out.append(piece)
        data = inflater.unused_data if encoding != "deflate" else b""  # gzip may hold several members
    return b"".join(out)


# ---- the two encodings ---------------------------------------------------------------------------------------
#
# Each format gives: parse(body) -> request; resource_spans(request) -> (resource index, raw resource
# attributes, scope name, spans) per ScopeSpans; flags(span) -> GENAI | MARK bits (keys only, values
# untouched); raw_attrs / raw_items / value / attrs(raw) -> dict; times(span) -> (start, end);
# ids(span) -> (key, parent key) in the format's own terms (bytes or hex), int_ids(span) -> ints;
# view(span, attrs, resource, scope) -> genai.SpanView.


def _pb_value(value: Any, depth: int = 0) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value" or kind == "kvlist_value":
        if depth >= MAX_VALUE_DEPTH:
            raise ValueError(f"an attribute value nests deeper than {MAX_VALUE_DEPTH}")
        if kind == "array_value":
            return tuple(_pb_value(v, depth + 1) for v in value.array_value.values)
        return {kv.key: _pb_value(kv.value, depth + 1) for kv in value.kvlist_value.values}
    return getattr(value, kind)


_PB_SCALARS = frozenset(("string_value", "int_value", "double_value", "bool_value", "bytes_value"))


class _Proto:
    name = "protobuf"

    @staticmethod
    def parse(body: bytes) -> Any:
        from google.protobuf.message import DecodeError
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except (DecodeError, RuntimeError, ValueError) as err:
            raise OtlpError(400, f"the body is not a protobuf ExportTraceServiceRequest: {err}") from None
        return request

    @staticmethod
    def resource_spans(request) -> Iterable[tuple[int, Any, str, Any]]:
        for index, rs in enumerate(request.resource_spans):
            for ss in rs.scope_spans:
                yield index, rs.resource.attributes, ss.scope.name, ss.spans

    @staticmethod
    def flags(span) -> int:
        """GENAI when an attribute key has a GenAI prefix (then MARK means "may have meterline.* keys":
        the caller looks in the converted attributes), else MARK when one is meterline.*. The span's
        own bytes are searched first (upb, ~2 µs), so most non-GenAI spans never reach the key loop,
        which costs about 0.6 µs per attribute; a value that merely contains a prefix only costs the loop."""
        data = span.SerializeToString()
        mark = MARK_MARKER in data
        if not mark and not any(marker in data for marker in BODY_MARKERS):
            return 0
        bits = 0
        for kv in span.attributes:
            key = kv.key
            if key.startswith(GENAI_PREFIXES):
                return GENAI | MARK if mark else GENAI
            if mark and key.startswith(MARK_PREFIX):
                bits = MARK
        return bits

    @staticmethod
    def raw_attrs(span) -> Any:
        return span.attributes

    @staticmethod
    def raw_items(span) -> Iterable[tuple[str, Any]]:
        return ((kv.key, kv.value) for kv in span.attributes)

    value = staticmethod(_pb_value)

    @staticmethod
    def attrs(raw) -> dict[str, Any]:
        out = {}
        for kv in raw:
            value = kv.value
            kind = value.WhichOneof("value")
            out[kv.key] = getattr(value, kind) if kind in _PB_SCALARS else _pb_value(value)
        return out

    @staticmethod
    def times(span) -> tuple[int, int]:
        return span.start_time_unix_nano, span.end_time_unix_nano

    @staticmethod
    def int_ids(span) -> tuple[int, int, int | None] | None:
        parent = int.from_bytes(span.parent_span_id, "big")
        return int.from_bytes(span.trace_id, "big"), int.from_bytes(span.span_id, "big"), parent or None

    @staticmethod
    def ids(span) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes] | None]:
        parent = span.parent_span_id
        return (span.trace_id, span.span_id), ((span.trace_id, parent) if parent and any(parent) else None)

    @staticmethod
    def view(span, attrs: dict, resource: Mapping, scope: str = ""):
        from meterline.collectors.genai import SpanView

        if len(span.trace_id) != 16 or len(span.span_id) != 8 or len(span.parent_span_id) not in (0, 8):
            raise ValueError("trace_id must be 16 bytes, span_id and parent_span_id 8")
        trace_id, span_id, parent = _Proto.int_ids(span)
        error = span.status.code == 2  # STATUS_CODE_ERROR
        return SpanView(
            name=span.name, trace_id=trace_id, span_id=span_id, parent_span_id=parent,
            start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano, attributes=attrs, resource=resource,
            error=error, status_message=span.status.message if error else "",
            # events only tell a failure's kind (exception.type); a successful call's may hold whole prompts
            events=tuple((event.name, _Proto.attrs(event.attributes)) for event in span.events) if error else (),
            scope=scope,
        )


def _get(obj: Mapping, camel: str, snake: str, default: Any = None) -> Any:
    value = obj.get(camel)
    return obj.get(snake, default) if value is None else value


def _list(obj: Mapping, camel: str, snake: str | None = None) -> list:
    value = obj.get(camel) if snake is None else _get(obj, camel, snake)
    if value is None:
        return []
    if type(value) is not list:
        raise TypeError(f"{camel} is not a list")
    return value


def _json_int(value: Any, what: str) -> int:
    """An OTLP JSON int64: a number or a decimal string."""
    if type(value) is int:
        return value
    if type(value) is str and _INT_RE.fullmatch(value):
        return int(value)
    raise ValueError(f"{what} is not an integer: {value!r}")


def _hex_id(value: Any, size: int, what: str) -> int | None:
    if value in (None, ""):
        return None
    if type(value) is not str or len(value) != 2 * size or not _HEX_RE.fullmatch(value):
        raise ValueError(f"{what} must be {2 * size} hex digits, not {value!r}")
    return int(value, 16)


def _json_value(value: Any, depth: int = 0) -> Any:
    if type(value) is not dict:
        raise TypeError("an AnyValue is not an object")
    for camel, snake in (("stringValue", "string_value"), ("boolValue", "bool_value"), ("intValue", "int_value"),
                         ("doubleValue", "double_value"), ("arrayValue", "array_value"), ("kvlistValue", "kvlist_value"),
                         ("bytesValue", "bytes_value")):
        v = _get(value, camel, snake)
        if v is None:
            continue
        if camel == "stringValue":
            if type(v) is not str:
                raise TypeError("stringValue is not a string")
            return v
        if camel == "boolValue":
            if type(v) is not bool:
                raise TypeError("boolValue is not a boolean")
            return v
        if camel == "intValue":
            return _json_int(v, "intValue")
        if camel == "doubleValue":
            if type(v) in (int, float):
                return float(v)
            if v in ("NaN", "Infinity", "-Infinity"):
                return float(v)
            raise TypeError("doubleValue is not a number")
        if camel == "bytesValue":
            import base64

            return base64.b64decode(v, validate=True)
        if depth >= MAX_VALUE_DEPTH:
            raise ValueError(f"an attribute value nests deeper than {MAX_VALUE_DEPTH}")
        items = _list(v, "values")
        if camel == "arrayValue":
            return tuple(_json_value(item, depth + 1) for item in items)
        return {_json_key(kv): _json_value(kv.get("value") or {}, depth + 1) for kv in items}
    return None


def _json_key(kv: Any) -> str:
    if type(kv) is not dict or type(kv.get("key")) is not str:
        raise TypeError("a KeyValue has no string key")
    return kv["key"]


class _Json:
    name = "JSON"

    @staticmethod
    def parse(body: bytes) -> Any:
        import msgspec

        try:
            request = msgspec.json.decode(body)
        except msgspec.DecodeError as err:
            raise OtlpError(400, f"the body is not JSON: {err}") from None
        if type(request) is not dict:
            raise OtlpError(400, "the body is not an OTLP JSON ExportTraceServiceRequest (an object)")
        return request

    @staticmethod
    def resource_spans(request) -> Iterable[tuple[int, Any, str, list]]:
        for index, rs in enumerate(_list(request, "resourceSpans", "resource_spans")):
            attributes = _list(rs.get("resource") or {}, "attributes")
            for ss in _list(rs, "scopeSpans", "scope_spans"):
                spans = _list(ss, "spans")
                for span in spans:
                    if type(span) is not dict:
                        raise TypeError("a span is not an object")
                yield index, attributes, str((ss.get("scope") or {}).get("name") or ""), spans

    @staticmethod
    def flags(span) -> int:
        bits = 0
        for kv in _list(span, "attributes"):
            key = _json_key(kv)
            if key.startswith(GENAI_PREFIXES):
                bits |= GENAI
            elif key.startswith(MARK_PREFIX):
                bits |= MARK
        return bits

    @staticmethod
    def raw_attrs(span) -> list:
        return _list(span, "attributes")

    @staticmethod
    def raw_items(span) -> Iterable[tuple[str, Any]]:
        return ((_json_key(kv), kv.get("value") or {}) for kv in _list(span, "attributes"))

    value = staticmethod(_json_value)

    @staticmethod
    def attrs(raw) -> dict[str, Any]:
        return {_json_key(kv): _json_value(kv.get("value") or {}) for kv in raw}

    @staticmethod
    def times(span) -> tuple[int, int]:
        """(start, end) for ordering; a broken value orders as 0 (view() refuses the span if it matters)."""
        out = []
        for camel, snake in (("startTimeUnixNano", "start_time_unix_nano"), ("endTimeUnixNano", "end_time_unix_nano")):
            try:
                out.append(_json_int(_get(span, camel, snake, 0), camel))
            except ValueError:
                out.append(0)
        return out[0], out[1]

    @staticmethod
    def int_ids(span) -> tuple[int, int, int | None] | None:
        try:
            trace_id = _hex_id(_get(span, "traceId", "trace_id"), 16, "traceId")
            span_id = _hex_id(_get(span, "spanId", "span_id"), 8, "spanId")
            parent = _hex_id(_get(span, "parentSpanId", "parent_span_id"), 8, "parentSpanId")
        except ValueError:
            return None
        return (trace_id, span_id, parent or None) if trace_id and span_id else None

    @staticmethod
    def ids(span) -> tuple[tuple[str, str], tuple[str, str] | None]:
        trace = str(_get(span, "traceId", "trace_id", "")).lower()
        parent = _get(span, "parentSpanId", "parent_span_id")
        key = (trace, str(_get(span, "spanId", "span_id", "")).lower())
        return key, ((trace, str(parent).lower()) if parent and str(parent).strip("0") else None)

    @staticmethod
    def view(span, attrs: dict, resource: Mapping, scope: str = ""):
        from meterline.collectors.genai import SpanView

        status = span.get("status") or {}
        error = status.get("code", 0) in (2, "STATUS_CODE_ERROR")
        events = tuple((str(event.get("name", "")), _Json.attrs(_list(event, "attributes")))
                       for event in _list(span, "events")) if error else ()
        trace_id = _hex_id(_get(span, "traceId", "trace_id"), 16, "traceId")
        span_id = _hex_id(_get(span, "spanId", "span_id"), 8, "spanId")
        if trace_id is None or span_id is None:
            raise ValueError("a span needs a traceId and a spanId")
        return SpanView(
            name=str(span.get("name", "")), trace_id=trace_id, span_id=span_id,
            parent_span_id=_hex_id(_get(span, "parentSpanId", "parent_span_id"), 8, "parentSpanId") or None,
            start_ns=_json_int(_get(span, "startTimeUnixNano", "start_time_unix_nano", 0), "startTimeUnixNano"),
            end_ns=_json_int(_get(span, "endTimeUnixNano", "end_time_unix_nano", 0), "endTimeUnixNano"),
            attributes=attrs, resource=resource, error=error,
            status_message=str(status.get("message", "")) if error else "", events=events, scope=scope,
        )


FORMATS = {PROTOBUF: _Proto, JSON: _Json}


# ---- one batch ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one request did with its spans."""

    metered: int = 0  # events with usage sent (failed calls included)
    unmetered: int = 0  # completed calls whose instrumentation reported no usage (sent with usage="missing")
    nested: int = 0  # another layer's record of a call already metered
    ignored: int = 0  # not a model call
    invalid: int = 0  # GenAI spans that broke the contract (rejected_spans)
    reasons: list[str] = field(default_factory=list)

    def reject(self, name: str, why: Any) -> None:
        self.invalid += 1
        if len(self.reasons) < MAX_ERROR_REASONS:
            self.reasons.append(f"span {name!r}: {why}"[:300])

    @property
    def error_message(self) -> str:
        if not self.invalid:
            return ""
        more = self.invalid - len(self.reasons)
        return "; ".join(self.reasons) + (f"; and {more} more" if more > 0 else "")


class _Candidate:
    __slots__ = ("attrs", "resource", "scope")

    def __init__(self, attrs: dict, resource: Mapping, scope: str):
        self.attrs, self.resource, self.scope = attrs, resource, scope


def process(fmt, request, body: bytes, nesting: Any, outcome: Outcome, send: Callable[[Any], None],
            tenant: str | None = None, reserve: Callable[[int], None] | None = None) -> None:
    """Meter one decoded request: its GenAI spans become events passed to `send` (the tenant forced
    when given); every span is settled with `nesting` in end-time order so a covered span passes its
    cover on to its parent, GenAI or not. `reserve(n)` is called with the number of GenAI spans before
    anything is sent (it may refuse the batch).

    A non-GenAI span costs a search of its bytes, its attribute keys when the bytes hold a GenAI prefix,
    and, while covers wait for parents (len(nesting)), a look at whether one waits for it; a body with
    no GenAI prefix at all (protobuf strings are raw UTF-8; a JSON body with escapes is always looked
    at) costs only that look, or only a count when no cover waits. A span nothing covers is not
    settled (settling it would change nothing)."""
    from meterline.collectors import genai
    from meterline.schemas import InvalidEvent

    groups = list(fmt.resource_spans(request))  # (resource index, its raw attributes, scope name, spans)
    quiet = not any(marker in body for marker in BODY_MARKERS) and (fmt is _Proto or b"\\u" not in body)
    if quiet and not len(nesting):  # no GenAI span, and no cover waits for a parent: nothing to settle
        outcome.ignored += sum(len(spans) for *_, spans in groups)
        return
    spans: list = []
    candidates: dict[int, _Candidate] = {}
    marked: dict[Any, dict] = {}  # span key -> its meterline.* attributes (for its descendants' attribution)
    resources: dict[int, dict] = {}  # converted once per ResourceSpans, and only when it has a GenAI span
    for resource_index, raw_resource, scope, group in groups:
        for span in group:
            index = len(spans)
            spans.append(span)
            bits = 0 if quiet else fmt.flags(span)
            if not bits & GENAI:
                if bits & MARK:
                    _mark(fmt, span, marked)
                outcome.ignored += 1
                continue
            try:
                attrs = fmt.attrs(fmt.raw_attrs(span))
            except (TypeError, ValueError) as err:
                outcome.reject(_name(span), err)
                continue
            if bits & MARK and (own := {k: v for k, v in attrs.items() if k.startswith(MARK_PREFIX)}):
                marked[fmt.ids(span)[0]] = own
            if tenant:  # the token's tenant: the payload's is not even looked at (nor validated)
                attrs.pop(TENANT_KEY, None)
            try:
                model_call = genai.is_genai(attrs)
            except TypeError as err:  # e.g. gen_ai.operation.name sent as a kvlist
                outcome.reject(_name(span), err)
                continue
            if not model_call:
                outcome.ignored += 1
                continue
            resource = resources.get(resource_index)
            if resource is None:
                resource = resources[resource_index] = fmt.attrs(raw_resource)
                if tenant:
                    resource.pop(TENANT_KEY, None)
            candidates[index] = _Candidate(attrs, resource, scope)
    if not candidates and not len(nesting):
        return
    ids = [fmt.int_ids(span) for span in spans]  # None for a span whose ids are broken
    if not candidates and not any(i is not None and nesting.covered(i[0], i[1]) for i in ids):
        return  # no GenAI span, and no cover waits for any of these spans
    if candidates and reserve is not None:
        reserve(len(candidates))
    parents: dict[Any, Any] = {}
    if candidates and marked:
        for span in spans:
            key, parent = fmt.ids(span)
            if parent is not None:
                parents[key] = parent
    defaults = {"tenant_id": tenant} if tenant else {}
    times = [fmt.times(span) for span in spans]
    # children end first; on a tie in end time the later start (the child) first
    for index in sorted(range(len(spans)), key=lambda i: (times[i][1], -times[i][0])):
        span, candidate = spans[index], candidates.get(index)
        if candidate is None:
            span_ids = ids[index]
            if span_ids is not None and nesting.covered(span_ids[0], span_ids[1]):
                nesting.settle(*span_ids, None)  # passes the cover on to its parent
            continue
        try:
            view = fmt.view(span, candidate.attrs, candidate.resource, candidate.scope)
        except (TypeError, ValueError, AttributeError) as err:
            outcome.reject(_name(span), err)
            continue
        context = genai.ancestors_attribution(_ancestors(fmt.ids(span)[0], parents, marked)) if parents else {}
        if tenant and "tenant_id" in context:
            context = {k: v for k, v in context.items() if k != "tenant_id"}
        try:
            event = genai.to_event(view, context, defaults)
        except InvalidEvent as err:
            event = None
            outcome.reject(view.name, err)
        except Exception as err:  # noqa: BLE001 - odd values must not fail a batch that is half sent
            log.warning("OTLP: span %r not metered", view.name, exc_info=True)
            event = None
            outcome.reject(view.name, f"{type(err).__name__}: {err}")
        else:
            if event is None:
                outcome.ignored += 1
        keep = nesting.settle(view.trace_id, view.span_id, view.parent_span_id, event)
        if event is None:
            continue
        if not keep:
            outcome.nested += 1
            continue
        if tenant and event.tenant_id != tenant:  # a tenant the mapping found elsewhere: the token's still wins
            event = event.model_copy(update={"tenant_id": tenant})
        send(event)
        if event.usage == "missing":
            outcome.unmetered += 1
        else:
            outcome.metered += 1


def _mark(fmt, span, marked: dict) -> None:
    """A non-GenAI span's meterline.* attributes, for its descendants; a broken value is left out."""
    found = {}
    for key, raw in fmt.raw_items(span):
        if key.startswith(MARK_PREFIX):
            try:
                found[key] = fmt.value(raw)
            except (TypeError, ValueError):
                continue
    marked[fmt.ids(span)[0]] = found


def _ancestors(key: Any, parents: Mapping, marked: Mapping[Any, dict]) -> list[dict]:
    """The meterline.* attributes of a span's ancestors in the batch, nearest first."""
    chain, seen = [], {key}
    for _ in range(MAX_ANCESTORS):
        key = parents.get(key)
        if key is None or key in seen:  # the batch's topmost span, or a cycle in a hostile payload
            break
        seen.add(key)
        if key in marked:
            chain.append(marked[key])
    return chain


def _name(span) -> str:
    return str(span.get("name", "") if type(span) is dict else span.name)[:100]


# ---- the endpoint -------------------------------------------------------------------------------------------


class OtlpEndpoint:
    """POST /v1/traces for the API; one per ApiServer. `settings` None: no Kafka (503)."""

    def __init__(self, settings: Any, meter_factory: Callable[[], Any] | None = None, max_spans: int = 65_536):
        self.settings = settings
        self.max_spans = max_spans
        self._meter_factory = meter_factory
        self._meter: Any = None
        self._nesting: Any = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-otlp")
        self._closed = False
        self.metered = self.unmetered = self.nested = self.ignored = self.invalid = 0
        self.requests: dict[int, int] = {}  # HTTP status -> requests answered

    # ---- HTTP -----------------------------------------------------------------------------------

    async def handle(self, request, principal) -> Any:
        from aiohttp import web

        content_type = CONTENT_TYPES.get(request.content_type)
        try:
            if content_type is None:
                raise OtlpError(415, f"Content-Type {request.content_type!r}: send {PROTOBUF} or {JSON}")
            if principal.tenant is None and not principal.is_admin:
                raise OtlpError(403, f"a {principal.role} token cannot write usage; use a tenant:<id> or admin token")
            if self.settings is None and self._meter_factory is None:
                raise OtlpError(503, "this API has no Kafka to send usage to")
            encoding = request.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in ENCODINGS:
                raise OtlpError(415, f"Content-Encoding {encoding!r} is not supported; use gzip or none")
            body, decoded = await read_body(request)
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.export, body, "" if decoded else encoding, content_type, principal.tenant)
        except OtlpError as err:
            self._count_request(err.status)
            return web.Response(status=err.status, body=status_body(content_type, err.status, err.message),
                                content_type=content_type or JSON)
        self._count_request(200)
        return web.Response(body=response_body(content_type, outcome.invalid, outcome.error_message),
                            content_type=content_type)

    def _count_request(self, status: int) -> None:
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    # ---- the work (on the endpoint's one thread) ----------------------------------------------------

    def export(self, body: bytes, encoding: str, content_type: str, tenant: str | None) -> Outcome:
        """Decode, map and send one request's spans; `tenant` (a tenant token's) overrides the payload's."""
        fmt = FORMATS[content_type]
        data = decompress(body, encoding) if undecoded(body, encoding) else body
        request = fmt.parse(data)
        outcome = Outcome()
        try:
            process(fmt, request, data, self.nesting(), outcome, lambda event: self.meter().send(event), tenant, self._reserve)
        except (TypeError, ValueError, AttributeError) as err:  # a JSON body of the wrong shape
            raise OtlpError(400, f"the body is not an OTLP {fmt.name} ExportTraceServiceRequest: {err}") from None
        if outcome.invalid:
            log.warning("OTLP: %d GenAI span(s) not metered: %s", outcome.invalid, outcome.error_message)
        with self._lock:
            for name in ("metered", "unmetered", "nested", "ignored", "invalid"):
                setattr(self, name, getattr(self, name) + getattr(outcome, name))
        return outcome

    def _reserve(self, n: int) -> None:
        """Refuse (503: the exporter retries) a batch the Meter's queue cannot take whole."""
        sender = getattr(self.meter(), "sender", None)
        queued, limit = len(getattr(sender, "_queue", ())), getattr(sender, "queue_max", None)
        if limit is not None and queued + n > limit:
            raise OtlpError(503, f"the usage queue is full ({queued} queued; Kafka slow or away); retry later")

    def meter(self) -> Any:
        if self._meter is None:
            if self._meter_factory is not None:
                self._meter = self._meter_factory()
            else:
                from meterline.collectors import Meter

                # the base session is never used: every event is built from its span and sent keyed by its tenant
                self._meter = Meter(self.settings, tenant_id="meterline-otlp", agent_id="otlp", register_pid=False)
        return self._meter

    def nesting(self) -> Any:
        if self._nesting is None:
            from meterline.collectors.genai import Nesting

            self._nesting = Nesting(self.max_spans)
        return self._nesting

    # ---- lifecycle and metrics ---------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Finish the request in progress, then deliver what is queued (the Meter spools the rest)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        if self._meter is not None:
            self._meter.flush(timeout)
            self._meter.close(timeout)

    def collector(self) -> Any:
        """A prometheus_client collector of the endpoint's counters."""
        return _Collector(self)



class _Collector:
    def __init__(self, endpoint: OtlpEndpoint):
        self.endpoint = endpoint

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        e = self.endpoint
        spans = CounterMetricFamily("meterline_otlp_spans", "Spans received on POST /v1/traces, by what became of them.",
                                    labels=["outcome"])
        for outcome in ("metered", "unmetered", "nested", "ignored", "invalid"):
            spans.add_metric([outcome], getattr(e, outcome))
        requests = CounterMetricFamily("meterline_otlp_requests", "POST /v1/traces requests, by HTTP status.", labels=["code"])
        for code, n in sorted(e.requests.items()):
            requests.add_metric([str(code)], n)
        yield spans
        yield requests


# ---- answers ------------------------------------------------------------------------------------------------


def response_body(content_type: str, rejected: int, message: str) -> bytes:
    """An ExportTraceServiceResponse; partial_success only when spans were rejected."""
    if content_type == PROTOBUF:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTracePartialSuccess, ExportTraceServiceResponse,
        )

        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=message))
        return response.SerializeToString()
    import json

    body = {"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}} if rejected else {}
    return json.dumps(body).encode()


def status_body(content_type: str | None, status: int, message: str) -> bytes:
    """A google.rpc.Status (code, message) in the request's encoding; JSON for an unknown one."""
    code = _RPC_CODE.get(status, 2)
    if content_type == PROTOBUF:  # Status{int32 code = 1; string message = 2;} written by hand (no googleapis dependency)
        text = message.encode()
        return b"\x08" + leb128(code) + b"\x12" + leb128(len(text)) + text
    import json

    return json.dumps({"code": code, "message": message}).encode()
