"""Hot-path JSON for the pricer: msgspec decode + the contract's checks, msgspec encode.

pydantic (schemas.events) is the contract; decoding a usage event with it costs ~4-10 µs,
msgspec ~0.5 µs. `decode_usage` accepts a record on the fast path only when every rule of
`UsageEvent` provably holds (tests/test_streams_codec.py checks "fast accepts => pydantic
accepts" with hypothesis); anything unusual (odd formats, numbers for money, edge cases)
falls back to pydantic, which either accepts it or names the field for the dead-letter
record. Money leaves as fixed 12-decimal strings computed from integer pico-USD.
"""
from __future__ import annotations

import struct
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, get_args, get_origin
from uuid import UUID

import msgspec
from annotated_types import Ge, Gt, Le, MaxLen, MinLen

from meterline.schemas import events as ev
from meterline.sql.checks import unwrap

PICO = 10**12
UTC = timezone.utc


BOUNDS = ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (MinLen, "min_length"), (MaxLen, "max_length"))


def _fast_type(annotation: Any, metadata: tuple[Any, ...] = ()) -> Any:
    """The msgspec type of a contract field, with its bounds (msgspec checks them in C)."""
    base, nullable, constraints = unwrap(annotation, metadata)
    if base is Decimal:
        return Any  # money: a string on the wire (numbers go to pydantic), checked in _fast_ok
    if get_origin(base) is dict:
        base = dict[tuple(_fast_type(arg) for arg in get_args(base))]  # type: ignore[misc]
    bounds = {name: getattr(c, name) for c in constraints for kind, name in BOUNDS if isinstance(c, kind)}
    typed = Annotated[base, msgspec.Meta(**bounds)] if bounds else base
    return typed | None if nullable else typed


def fast_struct(contract: type) -> type[msgspec.Struct]:
    """A msgspec mirror of a pydantic contract, generated from it, so the two never drift: the same fields,
    types, bounds and defaults; what msgspec cannot say (hidden characters, cross-field rules, money, time
    range) is _fast_ok's."""
    fields = []
    for name, info in contract.model_fields.items():
        kind = _fast_type(info.annotation, tuple(info.metadata))
        fields.append((name, kind) if info.is_required() else (name, kind, info.get_default(call_default_factory=True)))
    # gc=False: not tracked by the cyclic collector (its fields, str/int/datetime/UUID and a dict of strings, can
    # hold no cycle); one fewer tracked object per event means fewer collections on the worker's hot path
    return msgspec.defstruct(f"Fast{contract.__name__}", fields, kw_only=True, forbid_unknown_fields=True,
                             module=__name__, gc=False)


FastUsage = fast_struct(ev.UsageEvent)


_decoder = msgspec.json.Decoder(FastUsage)
_encoder = msgspec.json.Encoder()


def _money_ok(value: Decimal) -> bool:
    """Within Usd's bounds as written (no exponent beyond 12 places or above the units, at most 16 whole
    digits), so pydantic would accept it unchanged; anything else (trailing zeros, "1e2") goes to pydantic."""
    if not value.is_finite() or value < 0:
        return False
    _, digits, exponent = value.as_tuple()
    return -ev.MONEY_PLACES <= exponent <= 0 and len(digits) + exponent <= ev.MONEY_DIGITS - ev.MONEY_PLACES


def _visible(text: str) -> bool:
    """No HIDDEN_RE character in text. ASCII text (isascii is O(1) in CPython) is checked by isprintable, a C
    loop ~10x cheaper than the regex: within ASCII the hidden characters are exactly the non-printable ones
    (Cc: 0x00-0x1F, 0x7F; no ASCII character is Cf, Zl or Zp), tests/test_streams_codec.py checks it."""
    if text.isascii():
        return text.isprintable()
    return ev.HIDDEN_RE.search(text) is None


def _fast_ok(e: FastUsage, latest: datetime) -> bool:
    """Every rule of UsageEvent holds; ts is then in UTC."""
    ts = e.ts
    if ts.tzinfo is None:
        return False
    if ts.tzinfo is not UTC:
        try:  # 0001-01-01T00:30:00+01:00 is before year 1 in UTC: pydantic names it
            ts = e.ts = ts.astimezone(UTC) if ts.utcoffset() else ts.replace(tzinfo=UTC)
        except OverflowError:
            return False
    if ts > latest or ts.year < ev.LEDGER_YEARS[0]:  # latest = now + MAX_FUTURE_SKEW (so before LEDGER_YEARS[1])
        return False
    if not _visible("".join((e.tenant_id, e.team, e.project, e.agent_id, e.session_id, e.provider, e.model, e.tool))):
        return False
    if (e.cache_read_tokens + e.cache_write_tokens + e.input_audio_tokens + e.input_image_tokens > e.input_tokens
            or e.reasoning_tokens + e.output_audio_tokens + e.output_image_tokens > e.output_tokens
            or e.cache_write_1h_tokens > e.cache_write_tokens):
        return False
    if (e.kind == "llm_call" and not e.model) or (e.kind != "llm_call" and not e.tool):
        return False
    if e.cost_usd is not None:
        if not isinstance(e.cost_usd, str):
            return False
        try:
            e.cost_usd = Decimal(e.cost_usd)
        except ArithmeticError:
            return False
        return _money_ok(e.cost_usd)
    return True


def decode_usage(raw: bytes, now: datetime | None = None, latest: datetime | None = None) -> FastUsage | ev.UsageEvent:
    """A valid usage event (FastUsage on the fast path, else UsageEvent); raises ev.InvalidEvent.
    `latest` (= now + MAX_FUTURE_SKEW, the newest acceptable ts) may be passed once per batch."""
    if latest is None:
        latest = (now or datetime.now(UTC)) + ev.MAX_FUTURE_SKEW
    try:
        fast = _decoder.decode(raw)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        fast = None
    if fast is not None and _fast_ok(fast, latest):
        return fast
    return ev.decode(ev.UsageEvent, raw)


ZERO_USD = "0.000000000000"


def usd(pico: int) -> str:
    """Integer pico-USD as a fixed 12-decimal string ("0.002145000000")."""
    if not pico:
        return ZERO_USD
    if pico < 0:
        return "-" + usd(-pico)
    digits = str(pico).rjust(13, "0")
    return f"{digits[:-12]}.{digits[-12:]}"


def to_pico(amount: Decimal) -> int:
    return int(amount.scaleb(12).to_integral_value())


_USAGE_FIELDS = tuple(FastUsage.__struct_fields__)


def usage_fields(event: FastUsage | ev.UsageEvent) -> dict[str, Any]:
    if isinstance(event, FastUsage):
        return {name: getattr(event, name) for name in _USAGE_FIELDS}
    return dict(event)


def encode(record: dict[str, Any]) -> bytes:
    """JSON bytes; Decimal as strings, datetimes RFC 3339 (UTC as Z), UUIDs canonical."""
    return _encoder.encode(record)


def utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo is UTC else ts.astimezone(UTC)


def minute_start(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


def month_start(ts: datetime) -> datetime:
    return ts.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(start: datetime) -> datetime:
    return (start + timedelta(days=32)).replace(day=1)


# ---------------------------------------------------------------- priced.v2 (schemas/events.py: the format)

V2_MAGIC = bytes([ev.PRICED_V2_MAGIC])
V2_LAYOUT = ev.priced_v2_layout()
_V2_STRUCT_CODES = {"uuid": "QQ", "time": "q", "count": "Q", "bool": "B", "money": "Qq"}
V2_FIXED = struct.Struct("<" + "".join(_V2_STRUCT_CODES[k] for _, k in V2_LAYOUT if k in _V2_STRUCT_CODES))
V2_STRINGS = tuple(name for name, kind in V2_LAYOUT if kind == "str")
V2_MAP = tuple(name for name, kind in V2_LAYOUT if kind == "map")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)
_U64 = (1 << 64) - 1
_2_64 = 1 << 64


def leb128(n: int) -> bytes:
    """An unsigned LEB128 (RowBinary's string lengths; protobuf's varint is the same encoding)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_SHORT = tuple(bytes((n,)) for n in range(0x80))  # leb128(n) of a length below 128: one byte, ready


def _v2_str(text: str) -> bytes:
    data = text.encode()
    return (_SHORT[len(data)] if len(data) < 0x80 else leb128(len(data))) + data


def _v2_map(items: dict[str, str]) -> bytes:
    return leb128(len(items)) + b"".join(_v2_str(k) + _v2_str(v) for k, v in items.items())


def _fixed_values(record: dict[str, Any]) -> list[int]:
    values: list[int] = []
    for name, kind in V2_LAYOUT:
        value = record[name]
        if kind == "uuid":
            number = value.int if hasattr(value, "int") else UUID(str(value)).int
            values += (number >> 64, number & _U64)
        elif kind == "time":
            values.append((utc(value) - EPOCH) // ONE_US)
        elif kind in ("count", "bool"):
            values.append(int(value))
        elif kind == "money":
            if value is None:
                raise ValueError(f"priced.v2 has no null {name}; write this record as v1")
            pico = to_pico(Decimal(value)) if not isinstance(value, int) else value
            values += (pico & _U64, pico >> 64)
    return values


def encode_priced_v2(record: dict[str, Any] | ev.PricedEvent) -> bytes:
    """A priced record as priced.v2 (the reference encoder; the worker's StreamWorker._priced_v2 is the fast one,
    tests/test_priced_v2.py keeps them byte-equal). Money as Decimal (exact to 12 places) or integer pico-USD."""
    data = dict(record)
    return (V2_MAGIC + V2_FIXED.pack(*_fixed_values(data)) + b"".join(_v2_str(data[n]) for n in V2_STRINGS)
            + b"".join(_v2_map(data[n]) for n in V2_MAP))


class V2Error(ValueError):
    """A priced.v2 body that does not walk to its end (truncated, garbage)."""


def _read_leb128(body: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(body):
            raise V2Error(f"truncated at byte {pos} (a length)")
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise V2Error(f"a length at byte {pos} is longer than 9 bytes")


def _read_str(body: bytes, pos: int, name: str) -> tuple[str, int]:
    size, pos = _read_leb128(body, pos)
    end = pos + size
    if end > len(body):
        raise V2Error(f"truncated in {name}: {size} bytes declared, {len(body) - pos} left")
    try:
        return body[pos:end].decode(), end
    except UnicodeDecodeError as err:
        raise V2Error(f"{name} is not UTF-8 ({err.reason} at byte {pos + err.start})") from None


def decode_priced_v2_fields(value: bytes) -> dict[str, Any]:
    """The fields of a priced.v2 record as Python values (not yet checked by the contract); raises V2Error."""
    if not value or value[0] != ev.PRICED_V2_MAGIC:
        raise V2Error("does not start with the priced.v2 byte 0xB2")
    body = memoryview(value)[1:].tobytes()
    if len(body) < V2_FIXED.size:
        raise V2Error(f"truncated: {len(body)} bytes, the fixed-width fields alone take {V2_FIXED.size}")
    raw, out = iter(V2_FIXED.unpack_from(body)), {}
    for name, kind in V2_LAYOUT:
        if kind == "uuid":
            out[name] = UUID(int=(next(raw) << 64) | next(raw))
        elif kind == "time":
            micros = next(raw)
            try:
                out[name] = EPOCH + micros * ONE_US
            except OverflowError:
                raise V2Error(f"{name} is out of range ({micros} µs since 1970)") from None
        elif kind == "count":
            out[name] = next(raw)
        elif kind == "bool":
            flag = next(raw)
            if flag > 1:
                raise V2Error(f"{name} is {flag}, not 0 or 1")
            out[name] = bool(flag)
        elif kind == "money":
            out[name] = Decimal(next(raw) | (next(raw) << 64)).scaleb(-ev.MONEY_PLACES)
    pos = V2_FIXED.size
    for name in V2_STRINGS:
        out[name], pos = _read_str(body, pos, name)
    for name in V2_MAP:
        count, pos = _read_leb128(body, pos)
        if count > ev.MAX_ATTRIBUTES:
            raise V2Error(f"{name} has {count} entries (at most {ev.MAX_ATTRIBUTES})")
        items = {}
        for _ in range(count):
            key, pos = _read_str(body, pos, f"{name} key")
            items[key], pos = _read_str(body, pos, f"{name} value")
        out[name] = items
    if pos != len(body):
        raise V2Error(f"{len(body) - pos} bytes after the last field")
    return out


def priced_version(value: bytes | None, headers: Any = None) -> int:
    """1 (JSON) or 2 (priced.v2). The first byte decides (the sink reads no headers on its hot path, and a
    decoder must agree with it); `headers` is accepted so that a later version may use them."""
    return 2 if value and value[0] == ev.PRICED_V2_MAGIC else 1


def decode_priced(value: bytes | None, headers: Any = None) -> ev.PricedEvent:
    """THE decoder of a `priced` record for consumers: v1 (JSON) or v2 (binary), checked by the PricedEvent
    contract either way; raises ev.InvalidEvent naming the problem. `headers`: the Kafka message's headers
    (list of (key, bytes) as confluent-kafka gives them, or None)."""
    if value is None:
        raise ev.InvalidEvent("PricedEvent", [("(record)", "empty record (tombstone)")])
    if priced_version(value, headers) == 1:
        return ev.decode(ev.PricedEvent, value)
    try:
        fields = decode_priced_v2_fields(value)
    except V2Error as err:
        raise ev.InvalidEvent("PricedEvent", [("(record)", f"priced.v2: {err}")]) from None
    return ev.build(ev.PricedEvent, **fields)


class PricedV2Writer:
    """The worker's priced.v2 encoder: one struct.pack for the fixed-width fields, the strings in two runs from a
    bounded cache of their encoded form: the scope (a session's events share it) and the shape (many events share
    it). Byte-equal to encode_priced_v2 (tests)."""

    CACHE_MAX = 200_000

    def __init__(self) -> None:
        self.shapes: dict[tuple[str, ...], bytes] = {}
        self.pack = V2_FIXED.pack
        # the same bytes when the money fits 64 bits and the rest of the sheet is zero: high words and zeros as padding
        self.pack_common = struct.Struct("<QQqq14QB" + "Q8x" * 6 + "16x" * 6).pack
        self.now: datetime | None = None
        self.now_us = 0
        if [n for n, _ in V2_LAYOUT] != list(_WRITER_ORDER):
            raise AssertionError("PricedEvent changed: update PricedV2Writer (and the format's version)")

    def shape(self, key: tuple[str, ...]) -> bytes:
        """A run of string fields as RowBinary (cache miss): tenant_id .. session_id, or kind .. cost_source and the
        catalog version (the tuples' lengths differ, so one cache holds both)."""
        if len(self.shapes) >= self.CACHE_MAX:
            self.shapes.clear()
        cached = self.shapes[key] = b"".join(map(_v2_str, key))
        return cached

    def write(self, e: Any, cost: int, parts: tuple[int, ...], source: str, version: str, priced_at: datetime) -> bytes:
        """`e` a FastUsage or UsageEvent (valid, ts in UTC), `cost` the charge and `parts` price_pico's components
        (input, output, cache read, cache write, list total, then the rest of the sheet) in pico-USD."""
        if priced_at is not self.now:  # once per batch
            self.now, self.now_us = priced_at, (utc(priced_at) - EPOCH) // ONE_US
        get = self.shapes.get
        uid = e.event_id.int
        total, inp, out, read, write = parts[4], parts[0], parts[1], parts[2], parts[3]
        if len(parts) == 5 and (cost | total | inp | out | read | write) < _2_64:  # the common case: zero high words
            fixed = self.pack_common(uid >> 64, uid & _U64, (e.ts - EPOCH) // ONE_US, self.now_us,
                e.input_tokens, e.output_tokens, e.cache_read_tokens, e.cache_write_tokens, e.reasoning_tokens,
                e.cache_write_1h_tokens, e.input_audio_tokens, e.input_image_tokens, e.output_audio_tokens,
                e.output_image_tokens, e.web_searches, e.units, e.latency_ms, e.response_bytes, e.batch,
                cost, total, inp, out, read, write)
        else:
            money = (cost, total, inp, out, read, write, *parts[5:], *(0,) * (11 - len(parts)))
            fixed = self.pack(uid >> 64, uid & _U64, (e.ts - EPOCH) // ONE_US, self.now_us,
                e.input_tokens, e.output_tokens, e.cache_read_tokens, e.cache_write_tokens, e.reasoning_tokens,
                e.cache_write_1h_tokens, e.input_audio_tokens, e.input_image_tokens, e.output_audio_tokens,
                e.output_image_tokens, e.web_searches, e.units, e.latency_ms, e.response_bytes, e.batch,
                *(half for value in money for half in (value & _U64, value >> 64)))
        key = (e.kind, e.provider, e.model, e.service_tier, e.usage, e.tool, e.status, e.priority, source, version)
        scope = (e.tenant_id, e.team, e.project, e.agent_id, e.session_id)
        attributes = e.attributes
        return b"".join((V2_MAGIC, fixed, get(scope) or self.shape(scope), get(key) or self.shape(key),
                         _v2_map(attributes) if attributes else b"\x00"))


_WRITER_ORDER = (
    "event_id", "ts", "priced_at", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "cache_write_1h_tokens", "input_audio_tokens", "input_image_tokens", "output_audio_tokens",
    "output_image_tokens", "web_searches", "units", "latency_ms", "response_bytes", "batch", "cost_usd", "list_cost_usd",
    "input_cost_usd", "output_cost_usd", "cache_read_cost_usd", "cache_write_cost_usd", "cache_write_1h_cost_usd",
    "input_audio_cost_usd", "input_image_cost_usd", "output_audio_cost_usd", "output_image_cost_usd",
    "web_search_cost_usd", "tenant_id", "team", "project", "agent_id", "session_id", "kind", "provider", "model",
    "service_tier", "usage", "tool", "status", "priority", "cost_source", "catalog_version", "attributes")

PRICED_V2 = PricedV2Writer()  # the worker's (one per process: its cache of encoded strings is shared)
