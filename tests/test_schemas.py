"""The contracts: every rejection rule names its field; bad input only ever raises InvalidEvent."""
from __future__ import annotations

import json
import unicodedata
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from pydantic import AfterValidator

from meterline.schemas import (
    CONTRACTS, BudgetPolicy, InvalidEvent, ThrottleDecision, UsageEvent, build, decode, new_id, utcnow,
)
from meterline.schemas import events as ev, export


def usage(**over) -> dict:
    base = dict(event_id=new_id(), ts=utcnow().isoformat(), tenant_id="acme", team="search", project="p1",
                agent_id="a1", session_id="s1", kind="llm_call", provider="openai", model="gpt-4o",
                input_tokens=100, output_tokens=20, cache_read_tokens=50)
    base.update(over)
    return base


def rejected_fields(raw: dict) -> list[str]:
    with pytest.raises(InvalidEvent) as info:
        decode(UsageEvent, json.dumps(raw))
    return [field for field, _ in info.value.errors]


def test_valid_event_round_trips_exactly():
    event = decode(UsageEvent, json.dumps(usage(cost_usd="0.000000123457")))
    assert event.cost_usd == Decimal("0.000000123457")
    assert decode(UsageEvent, event.to_json()) == event
    assert b'"cost_usd":"0.000000123457"' in event.to_json()  # money stays a string, never a float


@pytest.mark.parametrize(
    "override, field",
    [
        ({"input_tokens": -1}, "input_tokens"),
        ({"output_tokens": 1.5}, "output_tokens"),
        ({"output_tokens": "7"}, "output_tokens"),
        ({"kind": "gpu_call"}, "kind"),
        ({"priority": "urgent"}, "priority"),
        ({"ts": (utcnow() + timedelta(hours=2)).isoformat()}, "ts"),
        ({"ts": "2026-01-01T00:00:00"}, "ts"),  # no zone: ambiguous
        ({"model": "m" * 300}, "model"),
        ({"session_id": "x" * 129}, "session_id"),
        ({"attributes": {f"k{i}": "v" for i in range(65)}}, "attributes"),
        ({"attributes": {"k": "v" * 2000}}, "attributes.k"),
        ({"cost_usd": "-0.01"}, "cost_usd"),
        ({"cost_usd": "NaN"}, "cost_usd"),
        ({"surprise": 1}, "surprise"),
        ({"tenant_id": "a\nb"}, "tenant_id"),
    ],
)
def test_rejection_names_the_field(override, field):
    assert field in rejected_fields(usage(**override))


def test_missing_tenant_is_rejected():
    raw = usage()
    del raw["tenant_id"]
    assert rejected_fields(raw) == ["tenant_id"]


def test_cache_tokens_must_fit_inside_input_tokens():
    with pytest.raises(InvalidEvent, match="cache_read_tokens"):
        decode(UsageEvent, json.dumps(usage(input_tokens=10, cache_read_tokens=8, cache_write_tokens=5)))


def test_build_raises_invalid_event_at_the_call_site():
    with pytest.raises(InvalidEvent, match="input_tokens"):
        build(UsageEvent, event_id=new_id(), ts=utcnow(), tenant_id="t", kind="llm_call", model="m", input_tokens=-5)


def test_tool_calls_need_a_tool_name_and_llm_calls_a_model():
    with pytest.raises(InvalidEvent, match="tool is required"):
        decode(UsageEvent, json.dumps(usage(kind="tool_call", model="")))
    with pytest.raises(InvalidEvent, match="model is required"):
        decode(UsageEvent, json.dumps(usage(model="")))


def test_decision_and_policy_rules():
    now = utcnow()
    with pytest.raises(InvalidEvent, match="expires_at"):
        build(ThrottleDecision, decision_id=new_id(), tenant_id="t", scope="tenant", scope_id="t", action="deny",
              reason="r", issued_at=now, expires_at=now)
    with pytest.raises(InvalidEvent, match="max_model"):
        build(ThrottleDecision, decision_id=new_id(), tenant_id="t", scope="tenant", scope_id="t", action="downgrade",
              reason="r", issued_at=now, expires_at=now + timedelta(seconds=30))
    with pytest.raises(InvalidEvent, match="timezone"):
        build(BudgetPolicy, policy_id="p", tenant_id="t", scope="tenant", scope_id="t", amount=Decimal(10), timezone="Mars/Olympus")
    with pytest.raises(InvalidEvent, match="period_seconds"):
        build(BudgetPolicy, policy_id="p", tenant_id="t", scope="tenant", scope_id="t", amount=Decimal(10), period="custom")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=6),
    max_leaves=20,
)
field_names = st.sampled_from(sorted(UsageEvent.model_fields) + ["junk"])


@hsettings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=12), st.sampled_from(sorted(CONTRACTS)))
def test_generated_records_only_ever_raise_invalid_event(fields, contract_name):
    try:
        decode(CONTRACTS[contract_name], json.dumps(fields, allow_nan=True))
    except InvalidEvent:
        pass


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_invalid_event(raw):
    with pytest.raises(InvalidEvent):
        decode(UsageEvent, raw)


@hsettings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: json_values for k in usage()}))
def test_mutated_valid_events_only_ever_raise_invalid_event(over):
    try:
        decode(UsageEvent, json.dumps(usage(**over), allow_nan=True))
    except InvalidEvent:
        pass


def test_json_schema_files_match_the_models():
    rendered = export.render()
    on_disk = {p.name: p.read_text() for p in export.OUT.glob("*.json")}
    assert on_disk == rendered, "schemas/json drifted from the models: run `make schemas`"


# ---- a tighter contract: hidden characters, exact money, times as RFC 3339 strings ----------------------

HIDDEN = {"\u202e": "U+202E (format character)", "\ufeff": "U+FEFF (format character)",
          "\u200b": "U+200B (format character)", "\u2028": "U+2028 (line separator)",
          "\u2029": "U+2029 (paragraph separator)", "\x7f": "U+007F (control character)",
          "\x85": "U+0085 (control character)", "\x00": "U+0000 (control character)"}


@pytest.mark.parametrize("field", ["tenant_id", "team", "session_id", "provider", "model"])
@pytest.mark.parametrize("char", sorted(HIDDEN))
def test_ids_and_names_reject_control_format_and_separator_characters(field, char):
    with pytest.raises(InvalidEvent) as info:
        decode(UsageEvent, json.dumps(usage(**{field: f"a{char}b"})))
    assert info.value.errors == [(field, f"Value error, must not contain {HIDDEN[char]}")]


def test_scope_ids_and_policy_ids_reject_hidden_characters_too():
    with pytest.raises(InvalidEvent, match=r"scope_id: .*U\+202E"):
        build(BudgetPolicy, policy_id="p", tenant_id="t", scope="team", scope_id="t/\u202eevil", amount=Decimal(1))
    with pytest.raises(InvalidEvent, match=r"policy_id: .*U\+2028"):
        build(BudgetPolicy, policy_id="p\u2028", tenant_id="t", scope="tenant", scope_id="t", amount=Decimal(1))


def test_visible_unicode_and_spaces_stay_valid():
    for name in ("naïve", "ü" * 128, "a b", "a\u00a0b", "日本", "😀"):
        assert decode(UsageEvent, json.dumps(usage(agent_id=name))).agent_id == name


def test_the_hidden_set_is_every_cc_cf_zl_zp_code_point_of_all_planes():
    assert ev.hidden_ranges(range(17)) == ev.HIDDEN_RANGES  # the planes the import scans hold them all
    chars = [chr(cp) for lo, hi in ev.HIDDEN_RANGES for cp in range(lo, hi + 1)]
    assert {unicodedata.category(c) for c in chars} == {"Cc", "Cf", "Zl", "Zp"}
    assert all(ev.HIDDEN_RE.fullmatch(c) for c in chars) and not ev.HIDDEN_RE.search("az AZ09 \u00a0ü€")


def cost(raw: str):
    """decode a usage event whose cost_usd is the JSON text `raw`: the cost, or the InvalidEvent."""
    text = json.dumps(usage())[:-1] + f', "cost_usd": {raw}}}'
    try:
        return decode(UsageEvent, text).cost_usd
    except InvalidEvent as err:
        return err


@pytest.mark.parametrize("raw", ['"1e-400"', '"1E-13"', '"0.0000000000001"', '"1.0000000000000000000000000000001"',
                                 '"-1e-400"', '"123.4560000000001"'])
def test_money_beyond_12_places_is_rejected_the_same_way_whatever_its_magnitude(raw):
    err = cost(raw)
    assert isinstance(err, InvalidEvent)
    assert err.errors == [("cost_usd", "Decimal input should have no more than 12 decimal places")], raw


@pytest.mark.parametrize("raw", ["1e-400", "1e-13", "1.5", "0.1", "1e2", "1.0000000000000001", "123456789012345.123456789012"])
def test_money_as_a_json_float_is_rejected_its_exact_value_is_lost(raw):
    err = cost(raw)  # 1e-400 reads as 0.0, 1.0000000000000001 as 1.0, the last as ...345.13: never the amount sent
    assert isinstance(err, InvalidEvent) and err.errors[0][0] == "cost_usd" and "string" in err.errors[0][1], raw


@pytest.mark.parametrize("raw, value", [('"1.500000000000000"', "1.5"), ('"1e2"', "100"), ('"1.5E+2"', "150"), ("7", "7"),
                                        ('"0.000000000001"', "1e-12"), ('"0e-999999999"', "0"), ('"-0"', "0")])
def test_exact_money_is_accepted_in_any_notation(raw, value):
    got = cost(raw)
    assert got == Decimal(value), raw
    assert got.as_tuple().exponent >= -12  # zeros past the 12th place are dropped: the JSON stays short
    without = len(build(UsageEvent, **usage()).to_json())
    assert len(build(UsageEvent, **{**usage(), "cost_usd": got}).to_json()) < without + 40  # a 16+12 digit amount at most


def test_every_exact_decimal_field_has_the_same_rule():
    now = utcnow()
    with pytest.raises(InvalidEvent, match="budget_remaining_usd: Decimal input should have no more than 12 decimal places"):
        build(ThrottleDecision, decision_id=new_id(), tenant_id="t", scope="tenant", scope_id="t", action="deny", reason="r",
              issued_at=now, expires_at=now + timedelta(seconds=30), budget_remaining_usd="-1e-400")
    with pytest.raises(InvalidEvent, match="amount: Decimal input should have no more than 12 decimal places"):
        build(BudgetPolicy, policy_id="p", tenant_id="t", scope="tenant", scope_id="t", amount="1e-13")
    with pytest.raises(InvalidEvent, match="amount: must be a string"):
        build(BudgetPolicy, policy_id="p", tenant_id="t", scope="tenant", scope_id="t", amount=0.1)


def examples() -> dict[str, dict]:
    """One valid record (as JSON values) per contract."""
    now, ids = utcnow(), dict(tenant_id="acme", scope="tenant", scope_id="acme")
    window = dict(window_start=now - timedelta(minutes=1), window_end=now)
    built = {
        "usage_event": build(UsageEvent, **usage()),
        "priced_event": build(ev.PricedEvent, **usage(), cost_source="catalog", catalog_version="v1", priced_at=now),
        "gpu_sample": build(ev.GpuSample, sample_id=new_id(), ts=now, node="n1", level="gpu", gpu_index=0, gpu_uuid="GPU-1",
                            interval_ms=1000),
        "compute_sample": build(ev.ComputeSample, sample_id=new_id(), ts=now, node="n1", level="process", pid=7,
                                interval_ms=1000, cpu_user_seconds=Decimal("0.25"), memory_byte_seconds=Decimal("1.5")),
        "spend_update": build(ev.SpendUpdate, update_id=new_id(), ts=now, **ids, **window, window_cost_usd=Decimal(1),
                              period_start=now - timedelta(days=1), period_cost_usd=Decimal(2)),
        "anomaly": build(ev.Anomaly, anomaly_id=new_id(), ts=now, kind="spend_spike", severity="info", **ids, **window),
        "throttle_decision": build(ThrottleDecision, decision_id=new_id(), **ids, action="deny", reason="r", issued_at=now,
                                   expires_at=now + timedelta(seconds=30), reset_at=now + timedelta(days=1),
                                   forecast_exhaustion_ts=now + timedelta(hours=1)),
        "budget_policy": build(BudgetPolicy, policy_id="p", **ids, amount=Decimal(10), period_anchor=now - timedelta(days=1)),
        "gpu_allocation": build(ev.GpuAllocation, allocation_id="a1", node="n1", gpu_uuid="GPU-1", tenant_id="acme",
                                valid_from=now - timedelta(days=1), valid_until=now),
        "scale_recommendation": build(ev.ScaleRecommendation, recommendation_id=new_id(), ts=now, endpoint="selfhosted/m",
                                      provider="selfhosted", model="m", window_start=now - timedelta(minutes=15), window_end=now,
                                      requests=9, rate_rps=Decimal("0.01"), service_ms=500, p95_latency_ms=900, slo_ms=2000,
                                      target_utilization_pct=70, max_replicas=10, recommended_replicas=2),
        "dead_letter": build(ev.DeadLetter, dlq_id=new_id(), ts=now, stage="sink", source_topic="priced", partition=0, offset=1,
                             reason="bad", error_type="InvalidEvent", payload_b64=""),
    }
    assert set(built) == set(CONTRACTS)
    return {name: json.loads(record.to_json()) for name, record in built.items()}


TIME_FIELDS = [(name, field) for name, record in examples().items() for field, info in CONTRACTS[name].model_fields.items()
               if "datetime" in str(info.annotation).lower()]


def test_every_time_field_of_every_contract_is_covered():
    assert len(TIME_FIELDS) == 25 and {name for name, _ in TIME_FIELDS} == set(CONTRACTS)
    assert ("budget_policy", "period_anchor") in TIME_FIELDS and ("budget_policy", "created_at") in TIME_FIELDS
    assert ("throttle_decision", "issued_at") in TIME_FIELDS and ("spend_update", "window_start") in TIME_FIELDS


@pytest.mark.parametrize("name, field", TIME_FIELDS)
@pytest.mark.parametrize("value, message", [
    (1733000000, "RFC 3339"), (1733000000.5, "RFC 3339"), ("1733000000", "RFC 3339"), (-5, "RFC 3339"),
    ("0001-01-01T00:30:00+01:00", "out of range"), ("9999-12-31T23:30:00-01:00", "out of range"),
    ("1899-12-31T23:59:59.999Z", "out of range"), ("2300-01-01T00:00:00Z", "out of range"),  # beyond the ledger's DateTime64
])
def test_times_are_rfc3339_strings_that_exist_in_utc(name, field, value, message):
    record = {**examples()[name], field: value}
    with pytest.raises(InvalidEvent) as info:  # never an OverflowError: the stream worker and the sink would crash
        decode(CONTRACTS[name], json.dumps(record))
    assert [m for f, m in info.value.errors if f == field and message in m], info.value.errors


def test_python_callers_may_still_pass_datetimes_but_not_numbers():
    assert build(UsageEvent, **{**usage(), "ts": utcnow()}).ts.tzinfo is timezone.utc
    with pytest.raises(InvalidEvent, match="ts: must be an RFC 3339 string"):
        build(UsageEvent, **{**usage(), "ts": 1733000000})
    edge = decode(UsageEvent, json.dumps(usage(ts="1900-01-01T01:00:00+01:00")))  # the ledger's first instant is fine
    assert edge.ts == datetime(1900, 1, 1, tzinfo=timezone.utc)


def test_decode_never_leaks_an_arithmetic_error():
    def overflow(value):
        raise OverflowError("date value out of range")

    class Fragile(ev.Contract):
        x: Annotated[int, AfterValidator(overflow)]

    with pytest.raises(InvalidEvent, match="out of range"):
        decode(Fragile, b'{"x": 1}')


def test_the_package_re_exports_every_public_name_that_events_defines():
    """schemas/__init__.py names them one by one (no `import *`, which linters cannot follow): one added to
    events.py and not there would be missing from `from meterline.schemas import ...`."""
    import ast
    from pathlib import Path

    import meterline.schemas as package

    tree = ast.parse(Path(ev.__file__).read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    defined |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    public = {name for name in defined if not name.startswith("_")}
    assert public - set(package.__all__) == set() and set(package.__all__) <= public
    assert all(getattr(package, name) is getattr(ev, name) for name in public)
