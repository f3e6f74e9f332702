"""Decoding Kafka records into ledger rows, for the sink.

Priced events are the hot path (one per LLM/tool call): a typed msgspec decode (~10x
faster than pydantic) checks the contract's types, enums, bounds and sizes, and the
original JSON bytes go to ClickHouse (JSONEachRow) with the Kafka coordinates appended.
A record msgspec rejects is decided by the pydantic contract, the authority: if pydantic
accepts it (msgspec is stricter in a corner), its canonical JSON is used; otherwise it
is a dead letter with pydantic's reason. The other topics are low-volume and go through
pydantic and sql/rows.py.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from meterline.schemas import events as ev

Id = Annotated[str, Meta(min_length=1, max_length=ev.MAX_ID_LEN)]
OptionalId = Annotated[str, Meta(max_length=ev.MAX_ID_LEN)]
Name = Annotated[str, Meta(max_length=ev.MAX_NAME_LEN)]
Tokens = Annotated[int, Meta(ge=0, le=ev.MAX_TOKENS)]
Count = Annotated[int, Meta(ge=0)]
Ts = Annotated[datetime, Meta(tz=True)]
# Money as the contract allows it (>= 0, Decimal(28, 12)), checked by msgspec's C regex instead of
# building six Decimals per event; ClickHouse parses the text exactly. A JSON number falls back to pydantic.
Usd = Annotated[str, Meta(pattern=r"^[0-9]{1,16}(\.[0-9]{1,12})?$")]
Uuid = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]


class PricedRecord(msgspec.Struct, forbid_unknown_fields=True):
    """PricedEvent (schemas/events.py) as msgspec sees it; a test keeps the two in step."""

    event_id: Uuid
    ts: Ts
    tenant_id: Id
    kind: Literal["llm_call", "tool_call", "api_call"]
    cost_source: Literal["provider", "catalog", "unpriced"]
    catalog_version: Name
    priced_at: Ts
    team: OptionalId = ""
    project: OptionalId = ""
    agent_id: OptionalId = ""
    session_id: OptionalId = ""
    provider: Name = ""
    model: Name = ""
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    tool: Name = ""
    units: Tokens = 1
    latency_ms: Count = 0
    status: Literal["ok", "error", "timeout", "rate_limited", "cancelled"] = "ok"
    response_bytes: Count = 0
    priority: Literal["critical", "high", "normal", "low", "batch"] = "normal"
    cost_usd: Usd | None = None
    attributes: Annotated[dict[Annotated[str, Meta(min_length=1, max_length=ev.MAX_ID_LEN)],
                               Annotated[str, Meta(max_length=ev.MAX_ATTRIBUTE_VALUE_LEN)]],
                          Meta(max_length=ev.MAX_ATTRIBUTES)] = {}
    list_cost_usd: Usd = "0"
    input_cost_usd: Usd = "0"
    output_cost_usd: Usd = "0"
    cache_read_cost_usd: Usd = "0"
    cache_write_cost_usd: Usd = "0"


_priced_decoder = msgspec.json.Decoder(PricedRecord)


def _fast_ok(r: PricedRecord, latest_ts: datetime) -> bool:
    """The contract rules msgspec cannot express; False sends the record to pydantic."""
    if r.cache_read_tokens + r.cache_write_tokens > r.input_tokens:
        return False
    if (r.kind == "llm_call" and not r.model) or (r.kind != "llm_call" and not r.tool):
        return False
    return r.ts <= latest_ts


def decode_priced(raw: bytes, latest_ts: datetime | None = None) -> tuple[bytes, str, datetime]:
    """(JSON object bytes, event_id, ts) of a valid PricedEvent; raises InvalidEvent.

    `latest_ts` (now + the contract's allowed clock skew) lets a caller compute it once per batch.
    """
    try:
        record = _priced_decoder.decode(raw)
        if _fast_ok(record, latest_ts or ev.utcnow() + ev.MAX_FUTURE_SKEW):
            return raw.rstrip(), record.event_id.lower(), record.ts
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError, TypeError):
        pass
    event = ev.decode(ev.PricedEvent, raw)  # the authority: raises InvalidEvent with the field's name
    return event.to_json(), str(event.event_id), event.ts
