"""Hot-path JSON for the pricer: msgspec decode + the contract's checks, msgspec encode.

pydantic (schemas.events) is the contract; decoding a usage event with it costs ~4-10 µs,
msgspec ~0.5 µs. `decode_usage` accepts a record on the fast path only when every rule of
`UsageEvent` provably holds (tests/test_streams_codec.py checks "fast accepts => pydantic
accepts" with hypothesis); anything unusual (odd formats, numbers for money, edge cases)
falls back to pydantic, which either accepts it or names the field for the dead-letter
record. Money leaves as fixed 12-decimal strings computed from integer pico-USD.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

from meterline.schemas import events as ev

PICO = 10**12
UTC = timezone.utc


Id = Annotated[str, msgspec.Meta(max_length=ev.MAX_ID_LEN)]
Name = Annotated[str, msgspec.Meta(max_length=ev.MAX_NAME_LEN)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=ev.MAX_TOKENS)]
Count = Annotated[int, msgspec.Meta(ge=0, le=ev.MAX_COUNT)]
AttrKey = Annotated[str, msgspec.Meta(min_length=1, max_length=ev.MAX_ID_LEN)]
AttrValue = Annotated[str, msgspec.Meta(max_length=ev.MAX_ATTRIBUTE_VALUE_LEN)]


class FastUsage(msgspec.Struct, forbid_unknown_fields=True):
    """Same fields and bounds as schemas.UsageEvent (checked in C by msgspec); the rest in _fast_ok."""

    event_id: uuid.UUID
    ts: datetime
    tenant_id: Annotated[str, msgspec.Meta(min_length=1, max_length=ev.MAX_ID_LEN)]
    kind: Literal["llm_call", "tool_call", "api_call"]
    team: Id = ""
    project: Id = ""
    agent_id: Id = ""
    session_id: Id = ""
    provider: Name = ""
    model: Name = ""
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    usage: Literal["reported", "missing"] = "reported"
    tool: Name = ""
    units: Tokens = 1
    latency_ms: Count = 0
    status: Literal["ok", "error", "timeout", "rate_limited", "cancelled"] = "ok"
    response_bytes: Count = 0
    priority: Literal["critical", "high", "normal", "low", "batch"] = "normal"
    cost_usd: Any = None  # a string on the wire (numbers go to pydantic); Decimal once checked; the charge once priced
    attributes: Annotated[dict[AttrKey, AttrValue], msgspec.Meta(max_length=ev.MAX_ATTRIBUTES)] = {}


_decoder = msgspec.json.Decoder(FastUsage)
_encoder = msgspec.json.Encoder()


def _money_ok(value: Decimal) -> bool:
    """Within Usd's bounds as written (no exponent beyond 12 places or above the units, at most 16 whole
    digits), so pydantic would accept it unchanged; anything else (trailing zeros, "1e2") goes to pydantic."""
    if not value.is_finite() or value < 0:
        return False
    _, digits, exponent = value.as_tuple()
    return -ev.MONEY_PLACES <= exponent <= 0 and len(digits) + exponent <= ev.MONEY_DIGITS - ev.MONEY_PLACES


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
    if ev.HIDDEN_RE.search(e.tenant_id + e.team + e.project + e.agent_id + e.session_id + e.provider + e.model + e.tool):
        return False
    if e.cache_read_tokens + e.cache_write_tokens > e.input_tokens or e.reasoning_tokens > e.output_tokens:
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
