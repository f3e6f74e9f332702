"""The agent SDK: events through the real broker, timing helpers, validation at the call site."""
from __future__ import annotations

import asyncio
import json
import os
import time
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from collectors_kafka import read_topic
from meterline.collectors import Meter
from meterline.collectors.attribution import sessions_dir
from meterline.collectors.sdk import encode_queued
from meterline.schemas import InvalidEvent, build, decode, new_id
from meterline.schemas.events import UsageEvent
from meterline.settings import Settings


class CapturingSender:
    """Stands in for the Kafka sender where only the bytes the hot path makes matter."""

    def __init__(self):
        self.records: list[tuple[bytes, bytes]] = []

    def send(self, key: bytes, value: bytes) -> None:
        self.records.append((key, value))

    def submit(self, item: tuple) -> None:
        self.records.append(encode_queued(item))  # what the real sender's thread does

    def close(self, timeout: float = 0) -> None:
        pass


@pytest.fixture
def offline_meter(tmp_path):
    meter = Meter(Settings(data_dir=tmp_path), tenant_id="acme", team="search", project="rag", agent_id="planner",
                  session_id="s-1", sender=CapturingSender(), register_pid=False)
    yield meter
    meter.close()


def test_events_arrive_through_kafka_attributed_with_distinct_ids(settings):
    meter = Meter(settings, tenant_id="acme", team="search", project="rag", agent_id="planner", session_id="s-1", priority="high")
    for i in range(5):  # the first call learns the names; the rest take the one-expression fast path
        meter.record_llm("openai", "gpt-4o", 1000 + i, 50, cache_read_tokens=200, latency_ms=900)
    meter.record_llm("openai", "gpt-4o", 2000, 60, cost_usd="0.0125", route="chat")
    meter.record_tool("web_search", latency_ms=300, response_bytes=2048, units=2, kind="api_call", provider="serpapi")
    with meter.session("s-2", agent_id="critic") as session:
        assert session.session_id == "s-2"
        meter.record_llm("anthropic", "claude-sonnet-4", 3000, 5)
    meter.record_llm("openai", "gpt-4o-mini", 4000, 1)
    assert meter.flush(60)
    meter.close()

    messages = read_topic(settings, settings.topic("usage"), 9)
    events = [decode(UsageEvent, m.value()) for m in messages]
    assert len({e.event_id for e in events}) == 9 and all(e.event_id.version == 7 for e in events)
    assert {m.key() for m in messages} == {b"acme"}
    by_input = {e.input_tokens: e for e in events}
    first = by_input[1000]
    assert (first.tenant_id, first.team, first.project, first.agent_id, first.session_id, first.priority) == (
        "acme", "search", "rag", "planner", "s-1", "high")
    assert (first.kind, first.provider, first.model, first.output_tokens, first.cache_read_tokens, first.latency_ms) == (
        "llm_call", "openai", "gpt-4o", 50, 200, 900)
    assert sorted(by_input) == [0, 1000, 1001, 1002, 1003, 1004, 2000, 3000, 4000]
    assert (by_input[2000].cost_usd, by_input[2000].attributes) == (Decimal("0.0125"), {"route": "chat"})
    tool = by_input[0]
    assert (tool.kind, tool.tool, tool.units, tool.response_bytes, tool.provider) == ("api_call", "web_search", 2, 2048, "serpapi")
    assert (by_input[3000].session_id, by_input[3000].agent_id) == ("s-2", "critic")
    assert (by_input[4000].session_id, by_input[4000].agent_id) == ("s-1", "planner")


def test_decorated_and_timed_calls_record_latency_and_status(offline_meter):
    meter = offline_meter

    @meter.tool("search")
    def search(query: str) -> str:
        time.sleep(0.05)  # the work being timed, not a wait for a condition
        return "result " * 10

    search("kafka")
    with pytest.raises(RuntimeError):
        with meter.llm_call("openai", "gpt-4o", route="chat") as call:
            call.usage(120, 30, cache_read_tokens=100)
            raise RuntimeError("provider said no")
    with meter.llm_call("openai", "gpt-4o") as ok_call:
        ok_call.usage(10, 2)

    events = [decode(UsageEvent, value) for _, value in meter.sender.records]
    assert [e.kind for e in events] == ["tool_call", "llm_call", "llm_call"]
    assert events[0].latency_ms >= 50 and events[0].tool == "search" and events[0].response_bytes == len("result " * 10)
    assert (events[1].status, events[1].input_tokens, events[1].cache_read_tokens, events[1].attributes) == (
        "error", 120, 100, {"route": "chat"})
    assert events[2].status == "ok" and events[2].input_tokens == 10


def test_async_tool_decorator(offline_meter):
    @offline_meter.tool()
    async def fetch_page() -> bytes:
        return b"x" * 7

    assert asyncio.run(fetch_page()) == b"x" * 7
    event = decode(UsageEvent, offline_meter.sender.records[-1][1])
    assert (event.tool, event.response_bytes) == ("fetch_page", 7)


@pytest.mark.parametrize("call", [
    lambda m: m.record_llm("openai", "gpt-4o", -1, 0),
    lambda m: m.record_llm("openai", "gpt-4o", 10, 0, cache_read_tokens=11),
    lambda m: m.record_llm("openai", "", 1, 1),
    lambda m: m.record_llm("openai", "gpt-4o", 1, 1, status="exploded"),
    lambda m: m.record_llm("openai", "gpt-4o", 1, 1, cost_usd="-0.5"),
    lambda m: m.record_llm("openai", "gpt\x00-4o", 1, 1),
    lambda m: m.record_llm("openai", "gpt\u202e-4o", 1, 1),  # a bidi override would disguise the name
    lambda m: m.record_llm("open\u2028ai", "gpt-4o", 1, 1),
    lambda m: m.record_llm("openai", "gpt-4o", 1, 1, cost_usd=0.1),  # a float is never an exact amount
    lambda m: m.record_llm("openai", "gpt-4o", 1, 1, cost_usd="1e-400"),
    lambda m: m.record_tool("search\ufeff", latency_ms=1),
    lambda m: m.record_tool("", latency_ms=1),
    lambda m: m.record_tool("search", latency_ms=-3),
    lambda m: m.record_tool("search", note=5),
])
def test_invalid_arguments_raise_the_contract_error_and_send_nothing(offline_meter, call):
    with pytest.raises(InvalidEvent):
        call(offline_meter)
    assert offline_meter.sender.records == []


def test_missing_tenant_or_bad_priority_is_rejected_when_the_meter_is_made(tmp_path):
    with pytest.raises(InvalidEvent, match="tenant_id"):
        Meter(Settings(data_dir=tmp_path), tenant_id="", sender=CapturingSender())
    with pytest.raises(InvalidEvent, match="priority"):
        Meter(Settings(data_dir=tmp_path), tenant_id="acme", priority="urgent", sender=CapturingSender())
    with pytest.raises(InvalidEvent, match=r"tenant_id: .*U\+202E"):
        Meter(Settings(data_dir=tmp_path), tenant_id="acme\u202e", sender=CapturingSender())


def test_guard_is_consulted_before_a_timed_llm_call_and_may_downgrade_it(tmp_path):
    asked = []

    class Guard:  # the signature of allocator.guard.Guard.check
        def check(self, model=None, *, cost_usd=None, priority=None, wait=True):
            asked.append((model, priority))
            return "gpt-4o-mini"

    meter = Meter(Settings(data_dir=tmp_path), tenant_id="acme", priority="low", guard=Guard(), sender=CapturingSender(),
                  register_pid=False)
    with meter.llm_call("openai", "gpt-4o") as call:
        assert (call.decision, call.model) == ("gpt-4o-mini", "gpt-4o-mini")
        call.usage(10, 1)
    assert asked == [("gpt-4o", "low")]
    assert decode(UsageEvent, meter.sender.records[-1][1]).model == "gpt-4o-mini"  # what was actually called


def test_meter_registers_its_pid_session_and_removes_it_on_close(tmp_path):
    meter = Meter(Settings(data_dir=tmp_path), tenant_id="acme", agent_id="planner", session_id="s-1", sender=CapturingSender())
    path = sessions_dir(tmp_path) / f"{os.getpid()}.json"
    assert json.loads(path.read_text())["session_id"] == "s-1"
    with meter.session("s-2"):
        assert json.loads(path.read_text())["session_id"] == "s-2"
    assert json.loads(path.read_text())["session_id"] == "s-1"
    meter.close()
    assert not path.exists()


# ---- the fast path never disagrees with the contract ----------------------------------------------

counts = st.one_of(st.sampled_from([-1, 0, 1, 10**12, 10**12 + 1, 2**63 - 1, 2**63, 2**70, True, False, 1.0, "5", None]),
                   st.integers(min_value=-5, max_value=10**6), st.floats(allow_nan=True))
names = st.one_of(st.sampled_from(["openai", "gpt-4o", "", "x" * 256, "x" * 257, "a\x1fb", "naïve", "tab\there", "\x7f"]),
                  st.text(max_size=20), st.integers())
statuses = st.one_of(st.sampled_from(["ok", "error", "timeout", "rate_limited", "cancelled"]), st.text(max_size=8))
costs = st.one_of(st.none(), st.sampled_from(["0.5", "-1", "abc", "1e-20", "NaN"]), st.decimals(allow_nan=True, places=14))
attr_maps = st.dictionaries(st.sampled_from(["a", "route", "k" * 129]), st.one_of(st.text(max_size=5), st.integers()), max_size=3)


VALID_LLM = dict(provider="openai", model="gpt-4o", input_tokens=100, output_tokens=20, cache_read_tokens=40,
                 cache_write_tokens=10, latency_ms=900, status="ok", cost_usd=None, attributes={})
WILD_LLM = dict(provider=names, model=names, input_tokens=counts, output_tokens=counts, cache_read_tokens=counts,
                cache_write_tokens=counts, latency_ms=counts, status=statuses, cost_usd=costs, attributes=attr_maps)


def _mostly_valid(data, valid: dict, wild: dict) -> dict:
    """A valid call with one to three fields replaced by wild values: every check gets exercised alone."""
    fields = dict(valid)
    for name in data.draw(st.lists(st.sampled_from(sorted(wild)), min_size=1, max_size=3, unique=True)):
        fields[name] = data.draw(wild[name], label=name)
    return fields


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_llm_fast_path_accepts_exactly_what_the_contract_accepts(offline_meter, data):
    _agree_with_contract(offline_meter, _mostly_valid(data, VALID_LLM, WILD_LLM))


def _agree_with_contract(meter, fields: dict) -> None:
    """One record_llm call and the contract must agree on accept/reject and on every field."""
    try:
        expected = build(UsageEvent, event_id=new_id(), ts="2026-01-01T00:00:00Z", kind="llm_call", tenant_id="acme", **fields)
    except InvalidEvent:
        expected = None
    before = len(meter.sender.records)
    args = {k: v for k, v in fields.items() if k != "attributes"}
    try:
        meter.record_llm(**args, **fields["attributes"])
    except InvalidEvent:
        assert expected is None, f"the SDK rejected what the contract accepts: {fields}"
        assert len(meter.sender.records) == before
        return
    assert expected is not None, f"the SDK accepted what the contract rejects: {fields}"
    sent = decode(UsageEvent, meter.sender.records[-1][1])
    for name in VALID_LLM:
        assert getattr(sent, name) == getattr(expected, name), (name, fields)


BOUNDARIES = [-1, 0, 1, 49, 50, 51, 59, 60, 61, 89, 90, 91, 99, 100, 101, 10**12 - 1, 10**12, 10**12 + 1, 2**63 - 1, 2**63,
              True, False, 1.0, "5", None, Decimal(1)]
WEIRD = ["", "ok", "error", "x" * 256, "x" * 257, "a\x1fb", "\x7f", "\x85", "a\u202eb", "\u2028", "\ufeff", "naïve", "a\xa0b",
         0, None, ["ok"], "0.5", "-1", "NaN", 0.1, 0.5, "1e-400", "1.500000000000000",
         Decimal("0.000000000001"), Decimal("0.0000000000001"), Decimal("-0"), Decimal("Infinity")]


def test_every_boundary_value_of_every_field_agrees_with_the_contract(offline_meter):
    offline_meter.record_llm("openai", "gpt-4o", 1, 1)  # the names are known: the one-expression path is in play
    for name in VALID_LLM:
        for value in BOUNDARIES + WEIRD + ([{"a": "b"}, {"a": 1}, {"k" * 129: "v"}, {f"k{i}": "v" for i in range(65)}]
                                           if name == "attributes" else []):
            if name == "attributes" and not isinstance(value, dict):
                continue
            _agree_with_contract(offline_meter, {**VALID_LLM, name: value})


VALID_TOOL = dict(name="search", latency_ms=10, status="ok", response_bytes=100, units=1, kind="tool_call")
WILD_TOOL = dict(name=names, latency_ms=counts, status=statuses, response_bytes=counts, units=counts,
                 kind=st.sampled_from(["tool_call", "api_call", "llm_call", "other"]))


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tool_fast_path_accepts_exactly_what_the_contract_accepts(offline_meter, data):
    f = _mostly_valid(data, VALID_TOOL, WILD_TOOL)
    try:
        build(UsageEvent, event_id=new_id(), ts="2026-01-01T00:00:00Z", tenant_id="acme", tool=f["name"], kind=f["kind"],
              latency_ms=f["latency_ms"], status=f["status"], response_bytes=f["response_bytes"], units=f["units"])
        valid = True
    except InvalidEvent:
        valid = False
    try:
        offline_meter.record_tool(**f)
    except InvalidEvent:
        assert not valid, "the SDK rejected what the contract accepts"
        return
    assert valid, "the SDK accepted what the contract rejects"
    sent = decode(UsageEvent, offline_meter.sender.records[-1][1])
    assert (sent.tool, sent.kind, sent.latency_ms, sent.units) == (f["name"], f["kind"], f["latency_ms"], f["units"])


def test_reasoning_tokens_are_part_of_output_on_every_path(offline_meter):
    offline_meter.record_llm("openai", "o3", 100, 50, reasoning_tokens=40)  # learns the name (slow path)
    offline_meter.record_llm("openai", "o3", 100, 50, reasoning_tokens=30)  # the one-expression fast path
    with offline_meter.llm_call("openai", "o3") as call:
        call.usage(100, 50, reasoning_tokens=20)
    events = [decode(UsageEvent, value) for _, value in offline_meter.sender.records]
    assert [(e.output_tokens, e.reasoning_tokens) for e in events] == [(50, 40), (50, 30), (50, 20)]
    with pytest.raises(InvalidEvent, match="reasoning_tokens"):  # reasoning is counted inside output
        offline_meter.record_llm("openai", "o3", 100, 50, reasoning_tokens=51)


def test_the_rest_of_the_price_sheet_reaches_the_event(offline_meter):
    sheet = dict(cache_write_1h_tokens=30, input_audio_tokens=20, output_audio_tokens=10, input_image_tokens=5,
                 output_image_tokens=4, web_searches=2, service_tier="flex", batch=True)
    offline_meter.record_llm("openai", "gpt-realtime", 100, 50, cache_write_tokens=40, sheet=sheet)
    with offline_meter.llm_call("anthropic", "claude-sonnet-4-5") as call:
        call.usage(100, 50, cache_write_tokens=40, cache_write_1h_tokens=40, web_searches=1)
    first, second = (decode(UsageEvent, value) for _, value in offline_meter.sender.records)
    assert {name: getattr(first, name) for name in sheet} == sheet
    assert (second.cache_write_1h_tokens, second.web_searches, second.batch) == (40, 1, False)
    with pytest.raises(InvalidEvent, match="cache_write_1h_tokens"):  # a subset of all cache writes
        offline_meter.record_llm("anthropic", "claude-sonnet-4-5", 100, 50, cache_write_tokens=10, sheet={"cache_write_1h_tokens": 11})
