"""priced.v2, the binary wire format of `priced` (schemas/events.py), end to end.

- The worker's v2 writer says exactly what its v1 JSON says: decoded by the consumers' decoder both give the same
  PricedEvent, and the bytes equal the reference encoder's (hypothesis over events, prices, sheet components).
- A damaged v2 record (truncated, bytes flipped, garbage) is refused with a reason by decode_priced, never a crash.
- Through the real broker, `meterline sink` and chDB: v1 and v2 mixed in one batch (old and new workers during
  a rolling upgrade) land once each with the exact money; damaged or invalid v2 records are dead-lettered with
  a reason while their neighbours land; a record that smuggles a forged row in is caught by the framing check.
- The worker writes v2 by default and v1 with METERLINE_PRICED_FORMAT=v1.
"""
from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace

import msgspec
import pytest
from confluent_kafka import Consumer
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from conftest import delete_topics_with_prefix
from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.sql.sink import BINARY_TAIL
from meterline.sql.synth import priced_events
from meterline.streams import codec
from meterline.streams.codec import decode_priced, decode_usage, encode_priced_v2
from meterline.streams.worker import StreamWorker
from meterline.topics import create_topics
from sink_fuzz import check_intake
from test_sql_sink import ledger_sql, produce, sink_until_idle, start_sink

PICO_MAX = 10**28 - 1  # 16 whole digits and 12 places: the largest amount the contract takes
NOW = ev.utcnow()


def fake_worker() -> SimpleNamespace:
    """What StreamWorker._priced_json and _priced_v2 read of the worker (no broker needed)."""
    return SimpleNamespace(catalog=SimpleNamespace(version="genai-prices 0.0.1 test"), _suffix_now=None, _suffix="")


def usage_json(draw_fields: dict) -> bytes:
    base = {"event_id": ev.new_id(), "ts": (NOW - timedelta(seconds=30)).isoformat(), "tenant_id": "acme", "team": "search",
            "project": "p1", "agent_id": "a1", "session_id": "s1", "kind": "llm_call", "provider": "openai", "model": "gpt-4o",
            "input_tokens": 1000, "output_tokens": 200, "cache_read_tokens": 100}
    return msgspec.json.encode({**base, **draw_fields})


visible = st.characters(blacklist_categories=("Cc", "Cf", "Zl", "Zp", "Cs"))
text = st.text(visible, max_size=12) | st.text(visible, min_size=40, max_size=128)  # long: 128+ bytes, a 2-byte length
fields = st.fixed_dictionaries({}, optional={
    "tenant_id": text.filter(bool), "team": text, "session_id": text, "model": text.filter(bool), "service_tier": st.sampled_from(["", "flex"]),
    "input_tokens": st.integers(1000, 10**12), "web_searches": st.integers(0, 10**12), "batch": st.booleans(),
    "latency_ms": st.integers(0, 2**63 - 1), "status": st.sampled_from(["ok", "error"]),
    "cost_usd": st.integers(0, PICO_MAX).map(lambda p: str(Decimal(p).scaleb(-12))),
    "attributes": st.dictionaries(text.filter(bool), text, max_size=3)})
prices = st.tuples(st.integers(0, PICO_MAX), st.lists(st.integers(0, PICO_MAX), min_size=5, max_size=5),
                   st.lists(st.integers(0, PICO_MAX), min_size=0, max_size=6), st.sampled_from(["catalog", "provider", "unpriced"]))


@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields, prices, st.booleans())
@example({}, (2**64, [1, 2, 2**64 + 5, 0, 3], [0, 7], "catalog"), False)  # high words, a sheet component
def test_the_worker_v2_record_says_exactly_what_its_v1_record_says(drawn, price, slow_path):
    raw = usage_json(drawn)
    try:
        event = decode_usage(raw) if not slow_path else ev.decode(ev.UsageEvent, raw)  # FastUsage or the pydantic model
    except ev.InvalidEvent:
        return
    cost, head, sheet, source = price
    parts = (*head, *sheet)
    worker = fake_worker()
    v2 = StreamWorker._priced_v2(worker, event, cost, parts, source, NOW)
    v1 = StreamWorker._priced_json(worker, event, cost, parts, source, NOW)  # last: it sets event.cost_usd
    from_v1, from_v2 = decode_priced(v1), decode_priced(v2)
    assert from_v2 == from_v1  # every field, the money exactly (Decimal), times to the microsecond
    assert from_v2.cost_usd == Decimal(cost).scaleb(-12) and from_v2.list_cost_usd == Decimal(head[4]).scaleb(-12)
    assert v2 == encode_priced_v2(from_v1)  # the fast writer and the reference encoder agree byte for byte
    assert v2[0] == ev.PRICED_V2_MAGIC and v1[:1] == b"{" and codec.priced_version(v2) == 2 and codec.priced_version(v1) == 1


def valid_v2(seed: int = 5, n: int = 4) -> list[bytes]:
    records, _ = priced_events(n, seed=seed)
    return [encode_priced_v2(ev.decode(ev.PricedEvent, r)) for r in records]


damage = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 500)),
    st.tuples(st.just("flip"), st.integers(1, 500), st.integers(1, 255)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("garbage"), st.binary(max_size=400)))


@given(st.text(max_size=300))
def test_a_v2_string_is_its_leb128_length_then_its_utf8(text):
    data = text.encode()
    assert codec.leb128(127) == b"\x7f" and codec.leb128(128) == b"\x80\x01" and codec.leb128(300) == b"\xac\x02"
    assert codec._v2_str(text) == codec.leb128(len(data)) + data


@hsettings(max_examples=400, deadline=None)
@given(damage)
@example(("flip", 337 + 2, 0x7F))  # a string length pointing past the end
def test_a_damaged_v2_record_is_refused_with_a_reason_never_a_crash(how):
    good = valid_v2(n=1)[0]
    if how[0] == "cut":
        bad = good[:min(how[1], len(good) - 1)]
    elif how[0] == "flip":
        i = min(how[1], len(good) - 1)
        bad = good[:i] + bytes([good[i] ^ how[2]]) + good[i + 1:]
    elif how[0] == "append":
        bad = good + how[1]
    else:
        bad = bytes([ev.PRICED_V2_MAGIC]) + how[1]
    try:
        record = decode_priced(bad)
    except ev.InvalidEvent as err:
        assert err.reason  # names the problem: "priced.v2: truncated ...", or the contract's field
        return
    assert how[0] == "flip" and decode_priced(encode_priced_v2(record)) == record  # a flip to another valid value


def _dead_letters(settings: Settings, n: int) -> list[ev.DeadLetter]:
    consumer = Consumer(settings.kafka_config(**{"group.id": f"dlq-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest"}))
    consumer.subscribe([settings.topic("dlq")])
    letters = []
    while len(letters) < n:
        msg = consumer.poll(10)
        assert msg is not None, f"only {len(letters)} of {n} dead letters arrived"
        letters.append(ev.decode(ev.DeadLetter, msg.value()))
    consumer.close()
    return letters


def _invalid_v2(record: bytes, **change) -> bytes:
    """A well-framed v2 record whose values break the contract (the reference encoder does not validate)."""
    return encode_priced_v2({**dict(decode_priced(record)), **change})


def test_v1_and_v2_mixed_in_one_batch_land_once_each_with_the_exact_money(settings):
    records, truth = priced_events(240, seed=17)
    mixed = [r if i % 2 else encode_priced_v2(ev.decode(ev.PricedEvent, r)) for i, r in enumerate(records)]
    good = mixed[0]  # a v2 record (even indices)
    assert good[0] == ev.PRICED_V2_MAGIC
    smuggled = encode_priced_v2({**dict(decode_priced(good)), "event_id": uuid.uuid4()})  # valid, with an id of its own
    forged_row = smuggled[1:] + BINARY_TAIL(0, 10**9, 0, 0) + good[1:]  # carries a whole row, Kafka columns and all
    bad = [good[:60],                                             # truncated
           good + b"\x00\x01",                                    # trailing garbage
           bytes([ev.PRICED_V2_MAGIC]) + forged_row,              # smuggles a forged row (framing check: the nonce)
           _invalid_v2(good, event_id=uuid.uuid4(), cache_read_tokens=10**9),  # breaks a cross-field rule
           _invalid_v2(good, event_id=uuid.uuid4(), tenant_id="a\u200bcme"),     # a hidden character
           _invalid_v2(good, event_id=uuid.uuid4(), batch=2)]                 # a bool that is not 0/1
    # a rolling upgrade: the same events again from an old (v1) and a new (v2) worker are duplicates, dropped
    again = [records[0], encode_priced_v2(ev.decode(ev.PricedEvent, records[3]))]
    produce(settings, "priced", mixed[:120] + bad + mixed[120:] + again)
    sink_until_idle(settings)

    got = ledger_sql(settings, "SELECT count() AS n, uniqExact(event_id) AS ids, toString(sum(cost_usd)) AS usd, "
                               "max(_offset) AS top FROM priced_events")[0]
    assert got["n"] == got["ids"] == len(records)
    assert Decimal(got["usd"]) == truth.usd(sum(truth.by_tenant.values()))  # exact, integer ground truth
    assert got["top"] < 10**6  # the forged row's offset never reached the ledger
    stored = {r["id"]: r for r in ledger_sql(settings, "SELECT toString(event_id) AS id, toString(cost_usd) AS usd, tenant_id, "
                                                       "input_tokens FROM priced_events")}
    for raw in records:  # every field the two formats carry arrives the same; money to the pico-dollar
        event = ev.decode(ev.PricedEvent, raw)
        row = stored[str(event.event_id)]
        assert (Decimal(row["usd"]), row["tenant_id"], row["input_tokens"]) == (event.cost_usd, event.tenant_id, event.input_tokens)
    letters = _dead_letters(settings, len(bad))
    assert sorted(base64.b64decode(d.payload_b64) for d in letters) == sorted(bad)
    reasons = " | ".join(d.reason for d in letters)
    assert "priced.v2" in reasons and "cache_read_tokens" in reasons and "tenant_id" in reasons
    assert not [d for d in letters if d.error_type == "LedgerCheck"], reasons  # the SQL checks and the contract agree


def _mutated(records: list[bytes]):
    mutation = st.one_of(st.none(), st.tuples(st.integers(0, 600), st.integers(0, 255)), st.integers(1, 600),
                         st.binary(max_size=120))
    return st.lists(mutation, min_size=len(records), max_size=len(records))


def test_fuzz_v2_records_are_stored_once_or_dead_lettered_and_the_sink_never_stops(kafka_bootstrap, tmp_path_factory):
    """Hypothesis damages priced.v2 records (a byte changed, cut short, garbage after the magic byte) in batches with
    v1 records, through the real sink and chDB. Oracle: decode_priced (the contract). Valid -> stored once; invalid
    -> dead-lettered at its offset; never a LedgerCheck; the sink exits cleanly."""
    records, _ = priced_events(60, seed=43)

    @hsettings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_mutated(records))
    def run(mutations):
        batch = []
        for i, (raw, mutation) in enumerate(zip(records, mutations)):
            event = ev.decode(ev.PricedEvent, raw).model_copy(update={"event_id": uuid.uuid4()})
            v2 = encode_priced_v2(event)
            if i % 3 == 0 or mutation is None:
                batch.append(event.to_json() if i % 2 else v2)
            elif isinstance(mutation, tuple):
                at = mutation[0] % len(v2)
                batch.append(v2[:at] + bytes([mutation[1]]) + v2[at + 1:])
            elif isinstance(mutation, int):
                batch.append(v2[:mutation % len(v2)])
            else:
                batch.append(bytes([ev.PRICED_V2_MAGIC]) + mutation)
        check_intake(kafka_bootstrap, tmp_path_factory, "fv", batch, decode_priced)

    run()


@pytest.mark.parametrize("fmt", ["v2", "v1"])
def test_the_worker_writes_v2_by_default_and_v1_when_asked(kafka_bootstrap, tmp_path, monkeypatch, fmt):
    from test_streams_pipeline import produce as produce_usage, read_topic, run_worker

    if fmt == "v1":
        monkeypatch.setenv("METERLINE_PRICED_FORMAT", "v1")
    settings = Settings(data_dir=tmp_path, kafka_bootstrap=kafka_bootstrap, topic_prefix=f"pf{uuid.uuid4().hex[:10]}")
    assert settings.priced_format == fmt
    create_topics(settings)
    sent = [usage_json({"session_id": f"s{i}"}) for i in range(20)]
    produce_usage(settings, "usage", [(b"acme", raw) for raw in sent])
    run_worker(settings)
    priced = read_topic(settings, "priced")
    assert len(priced) == len(sent) and {codec.priced_version(raw) for raw in priced} == {int(fmt[1])}
    assert {str(decode_priced(raw).event_id) for raw in priced} == {json.loads(raw)["event_id"] for raw in sent}
    delete_topics_with_prefix(settings)


def test_a_wrong_priced_format_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("METERLINE_PRICED_FORMAT", "v3")
    with pytest.raises(Exception, match="priced_format"):
        Settings()


@pytest.mark.parametrize("attack", ["extra row", "row for row"])
def test_a_record_that_smuggles_a_forged_row_is_caught_by_the_framing_check(settings, attack):
    """A v2 record that carries a whole RowBinary row of its own with forged Kafka columns (an offset far ahead
    would make the sink skip records on its next start). "extra row": one row too many (the count catches it).
    "row for row": the record also swallows its successor, so the count adds up and only the batch's nonce, which
    the forger cannot know, tells. Either way the forged row never lands, the record is dead-lettered and its
    successor is stored."""
    from confluent_kafka import Producer

    records, _ = priced_events(30, seed=29)
    v2 = [encode_priced_v2(ev.decode(ev.PricedEvent, r)) for r in records]
    successor = v2[11]
    assert successor[-1] == 0  # no attributes: its last byte is the map's count, 0
    smuggled = encode_priced_v2({**dict(decode_priced(v2[10])), "event_id": uuid.uuid4()})
    forged = smuggled[1:] + BINARY_TAIL(0, 10**9, 0, 0)
    if attack == "extra row":
        attacker = bytes([ev.PRICED_V2_MAGIC]) + forged + v2[10][1:]
    else:  # then a row whose map key runs over its own tail and the successor's body, up to that 0 (the value's length)
        key = 28 + (len(successor) - 1) - 1
        attacker = bytes([ev.PRICED_V2_MAGIC]) + forged + v2[10][1:-1] + b"\x01" + codec.leb128(key)
    batch = v2[:10] + [attacker] + v2[11:]
    producer = Producer(settings.kafka_config(**{"linger.ms": 50}))
    for value in batch:  # one partition: the sink stages them in this order, the successor right after
        producer.produce(settings.topic("priced"), value, partition=0)
    assert producer.flush(30) == 0
    proc = start_sink(settings, "--until-idle", "3")
    try:  # bounded: without the nonce check this sink never went idle (the forged row's partition)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out

    got = ledger_sql(settings, "SELECT count() AS n, max(_offset) AS top, "
                               f"countIf(event_id = '{decode_priced(successor).event_id}') AS successor FROM priced_events")[0]
    assert got == {"n": len(batch) - 1, "top": len(batch) - 1, "successor": 1}
    letters = _dead_letters(settings, 1)
    assert base64.b64decode(letters[0].payload_b64) == attacker and "priced.v2" in letters[0].reason
