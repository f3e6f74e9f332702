"""The msgspec fast path never accepts what the pydantic contract rejects, and agrees on values."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from meterline.schemas.events import InvalidEvent, UsageEvent, decode, new_id
from meterline.streams.codec import FastUsage, decode_usage, encode, usage_fields, usd

NOW = datetime.now(timezone.utc)


def valid_record(**overrides):
    record = {"event_id": new_id(), "ts": (NOW - timedelta(minutes=3)).isoformat(), "tenant_id": "acme", "team": "core",
              "project": "p", "agent_id": "a", "session_id": "s", "kind": "llm_call", "provider": "openai", "model": "gpt-4o",
              "input_tokens": 100, "output_tokens": 10, "cache_read_tokens": 20, "cache_write_tokens": 0}
    record.update(overrides)
    return record


odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2, max_value=2), st.sampled_from([10**12, 10**12 + 1, 2**70]),
    st.floats(allow_nan=True), st.text(max_size=3), st.sampled_from(["", "x" * 129, "x" * 257, "a\nb", "\x00", "NaN", "1e3",
    "0.1234567890123", "-1", "1.5", "2026-01-01T00:00:00", "2999-01-01T00:00:00Z", "tool_call", "api_call", "llm_call",
    "a\u202eb", "\u2028", "\u2029", "\ufeff", "a\u200b", "\x7f", "\x85", "1e-400", "1E-13", "12345678901234567",
    "1234567890123456.5", "0e-400", 1733000000, "1733000000", "0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
fields = st.sampled_from(list(FastUsage.__struct_fields__) + ["unknown_field"])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(fields, odd_values, max_size=4), st.lists(fields, max_size=2))
@example(changes={"latency_ms": 2**70}, removed=[])  # beyond what the ledger's integers hold
def test_fast_path_accepts_only_what_pydantic_accepts(changes, removed):
    record = valid_record(**changes)
    for name in removed:
        record.pop(name, None)
    raw = json.dumps(record).encode()
    try:
        reference = decode(UsageEvent, raw)
    except InvalidEvent:
        reference = None
    try:
        got = decode_usage(raw)
    except InvalidEvent:
        got = None
    if reference is None:
        assert got is None, f"fast path accepted what the contract rejects: {record}"
    else:
        assert got is not None
        assert usage_fields(got) == dict(reference)


def test_offsets_are_normalised_to_utc_and_money_is_fixed_point():
    ts = datetime(2025, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    event = decode_usage(json.dumps(valid_record(ts=ts.isoformat(), cost_usd="0.25")).encode())
    assert event.ts == ts and event.ts.tzinfo is timezone.utc
    assert usd(2_145_000_000) == "0.002145000000" and usd(5) == "0.000000000005" and usd(3 * 10**12) == "3.000000000000"
    assert json.loads(encode({"ts": event.ts}))["ts"] == "2025-01-01T10:00:00Z"


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'"x"', b"null", json.dumps(valid_record(input_tokens=-1)).encode()],
                         ids=["empty", "truncated", "array", "string", "null", "negative-tokens"])  # the same in every xdist process
def test_garbage_raises_invalid_event_with_a_reason(raw):
    with pytest.raises(InvalidEvent) as err:
        decode_usage(raw)
    assert err.value.reason


@pytest.mark.parametrize("override, field", [
    ({"tenant_id": "a\u202eb"}, "tenant_id"), ({"team": "a\u2028b"}, "team"), ({"project": "\u2029"}, "project"),
    ({"session_id": "\ufeffs"}, "session_id"), ({"agent_id": "a\u200bb"}, "agent_id"), ({"provider": "open\x7fai"}, "provider"),
    ({"model": "gpt\x85"}, "model"), ({"tool": "t\u202e"}, "tool"),
    ({"cost_usd": "1e-400"}, "cost_usd"), ({"cost_usd": "1E-13"}, "cost_usd"), ({"cost_usd": "0.0000000000001"}, "cost_usd"),
    ({"cost_usd": "12345678901234567"}, "cost_usd"), ({"cost_usd": "9999999999999999999999999999"}, "cost_usd"),
    ({"cost_usd": 1.5}, "cost_usd"),
    ({"ts": 1733000000}, "ts"), ({"ts": "1733000000"}, "ts"),
    ({"ts": "0001-01-01T00:30:00+01:00"}, "ts"), ({"ts": "9999-12-31T23:30:00-01:00"}, "ts"),
])
def test_fast_path_rejects_what_the_contract_rejects_naming_the_field(override, field):
    with pytest.raises(InvalidEvent) as err:  # an OverflowError here would crash the stream worker
        decode_usage(json.dumps(valid_record(**override)).encode())
    assert field in [name for name, _ in err.value.errors]


@pytest.mark.parametrize("cost", ["1234567890123456.5", "0.000000000001", "10", "0"])
def test_exact_money_within_bounds_stays_on_the_fast_path(cost):
    event = decode_usage(json.dumps(valid_record(cost_usd=cost)).encode())
    assert isinstance(event, FastUsage) and event.cost_usd == Decimal(cost)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=12) | st.text(max_size=12))
@example("a\x00b")
@example("a\x7f")
@example("tab\there")
@example(" ")
def test_visible_agrees_with_the_contracts_hidden_character_set(text):
    """The ASCII shortcut (isprintable) accepts exactly what HIDDEN_RE accepts, ASCII or not."""
    from meterline.schemas.events import HIDDEN_RE
    from meterline.streams.codec import _visible

    assert _visible(text) == (HIDDEN_RE.search(text) is None)


def test_every_ascii_character_is_judged_like_the_contract():
    from meterline.schemas.events import HIDDEN_RE
    from meterline.streams.codec import _visible

    assert [c for c in map(chr, range(128)) if _visible(c) != (HIDDEN_RE.search(c) is None)] == []
