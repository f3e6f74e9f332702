"""Hot-path JSON for the pricer: msgspec decode + the contract's checks, msgspec encode.

pydantic (schemas.events) is the contract; decoding a usage event with it costs ~4-10 µs,
msgspec ~0.5 µs. `decode_usage` accepts a record on the fast path only when every rule of
`UsageEvent` provably holds (tests/test_streams_codec.py checks "fast accepts => pydantic
accepts" with hypothesis); anything unusual (odd formats, numbers for money, edge cases)
falls back to pydantic, which either accepts it or names the field for the dead-letter
record. Money leaves as fixed 12-decimal strings computed from integer pico-USD.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, get_args, get_origin

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


def _fast_struct(contract: type) -> type[msgspec.Struct]:
    """A msgspec mirror of a pydantic contract, generated from it, so the two never drift: the same fields,
    types, bounds and defaults; what msgspec cannot say (hidden characters, cross-field rules, money, time
    range) is _fast_ok's."""
    fields = []
    for name, info in contract.model_fields.items():
        kind = _fast_type(info.annotation, tuple(info.metadata))
        fields.append((name, kind) if info.is_required() else (name, kind, info.get_default(call_default_factory=True)))
    return msgspec.defstruct(f"Fast{contract.__name__}", fields, kw_only=True, forbid_unknown_fields=True,
                             module=__name__)


FastUsage = _fast_struct(ev.UsageEvent)


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
