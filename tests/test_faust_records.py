"""Faust records and codecs for meterline's topics (streams/faust_records.py): generated from the contracts, exact."""
from __future__ import annotations

import uuid
from decimal import Decimal

import faust
import pytest
from faust.exceptions import ValueDecodeError
from faust.serializers import codecs
from pydantic import Field

from meterline.schemas import events as ev
from meterline.streams import faust_gen, faust_records as fr


def priced(**over) -> ev.PricedEvent:
    fields = dict(event_id=uuid.uuid4(), ts=ev.utcnow(), tenant_id="acme", kind="llm_call", model="gpt-4o",
                  input_tokens=9, cost_usd=Decimal("0.000000123457"), list_cost_usd=Decimal("0.000000123457"),
                  input_cost_usd=Decimal("0.000000123457"), cost_source="catalog", catalog_version="v",
                  priced_at=ev.utcnow(), attributes={"customer": "acme"})
    return ev.build(ev.PricedEvent, **(fields | over))


def test_the_generated_module_is_current():
    """Fails when a contract changes and `make schemas` was not run (or the file was edited by hand)."""
    assert faust_gen.OUT.read_text() == faust_gen.render()


@pytest.mark.parametrize("name", list(faust_gen.RECORDS))
def test_each_record_has_exactly_the_contracts_fields_and_defaults(name):
    contract, _ = faust_gen.RECORDS[name]
    record = fr.CLASSES[name]
    assert list(record._options.fields) and set(record._options.fields) == set(contract.model_fields)
    required = {f for f, info in contract.model_fields.items() if info.is_required()}
    assert set(record._options.fields) - set(record._options.defaults) == required
    for field, default in record._options.defaults.items():
        assert default == contract.model_fields[field].get_default(call_default_factory=True), field


def test_a_new_contract_field_appears_in_the_generated_record():
    class Wider(ev.SpendUpdate):
        region: ev.OptionalId = ""
        credit_usd: ev.Usd | None = Field(None)

    text = faust_gen.render_record("Wider", Wider, "spend")
    assert "    region: str = ''" in text and "    credit_usd: Optional[Decimal] = None" in text


def test_priced_round_trips_typed_and_exact_through_the_registered_codec():
    record = priced()
    raw = record.to_json()
    got = codecs.loads("meterline.priced", raw)
    assert isinstance(got, fr.Priced) and isinstance(got.cost_usd, Decimal) and got.cost_usd == Decimal("0.000000123457")
    assert got.event_id == record.event_id and got.ts == record.ts and got.attributes == {"customer": "acme"}
    assert codecs.dumps("meterline.priced", got) == raw  # the contract's own JSON, byte for byte


def test_a_priced_v2_record_decodes_to_the_same_typed_record_as_its_v1_json():
    """The worker writes the compact priced.v2 by default: a user's Faust job must read it like v1."""
    from meterline.streams.codec import encode_priced_v2

    record = priced()
    v2 = codecs.loads("meterline.priced", encode_priced_v2(record))
    assert v2 == codecs.loads("meterline.priced", record.to_json()) and v2.cost_usd == Decimal("0.000000123457")


def test_a_users_topic_declared_with_value_type_or_serializer_gets_typed_records():
    app = faust.App(f"t-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:1", store="memory://")
    raw = priced().to_json()
    typed = app.topic("p", value_type=fr.Priced)
    assert typed.schema.value_serializer == "meterline.priced"
    assert isinstance(app.serializers.loads_value(fr.Priced, raw, serializer=typed.schema.value_serializer), fr.Priced)
    assert isinstance(app.serializers.loads_value(None, raw, serializer="meterline.priced"), fr.Priced)
    assert app.serializers.dumps_value(fr.Priced, codecs.loads("meterline.priced", raw)) == raw


def test_spend_anomaly_and_usage_codecs_decode_their_contracts():
    now = ev.utcnow()
    spend = ev.build(ev.SpendUpdate, update_id=uuid.uuid4(), ts=now, tenant_id="acme", scope="tenant", scope_id="acme",
                     window_start=now, window_end=now, window_cost_usd="0.5", period_start=now, period_cost_usd="12.000000000001")
    got = codecs.loads("meterline.spend", spend.to_json())
    assert isinstance(got, fr.Spend) and got.period_cost_usd == Decimal("12.000000000001")
    usage = ev.build(ev.UsageEvent, event_id=uuid.uuid4(), ts=now, tenant_id="a", kind="tool_call", tool="search")
    assert codecs.loads("meterline.usage", usage.to_json()).tool == "search"
    anomaly = ev.build(ev.Anomaly, anomaly_id=uuid.uuid4(), ts=now, kind="spend_spike", severity="warning", tenant_id="a",
                       scope="tenant", scope_id="a", window_start=now, window_end=now, evidence={"x": "1"})
    assert codecs.loads("meterline.anomalies", anomaly.to_json()).evidence == {"x": "1"}


def test_a_float_or_a_wrong_field_is_refused_on_the_way_out_naming_it():
    got = codecs.loads("meterline.priced", priced().to_json())
    got.cost_usd = 0.1  # a float: its exact value is already lost
    with pytest.raises(ev.InvalidEvent, match="cost_usd"):
        codecs.dumps("meterline.priced", got)


def test_a_bad_record_is_a_decode_error_naming_the_field():
    raw = priced().to_json().replace(b'"tenant_id":"acme"', b'"tenant_id":""')
    with pytest.raises(ev.InvalidEvent, match="tenant_id"):
        codecs.loads("meterline.priced", raw)
    message = faust.types.Message("p", 0, 0, 0.0, 0, {}, None, raw, None)
    with pytest.raises(ValueDecodeError, match="tenant_id"):
        fr.ContractSchema("priced").loads_value(None, message)


def test_records_do_not_share_their_attribute_maps():
    a = fr.Usage(tenant_id="a", event_id=uuid.uuid4(), ts=ev.utcnow(), kind="tool_call", tool="x")
    b = fr.Usage(tenant_id="b", event_id=uuid.uuid4(), ts=ev.utcnow(), kind="tool_call", tool="x")
    a.attributes["customer"] = "acme"
    assert b.attributes == {}


