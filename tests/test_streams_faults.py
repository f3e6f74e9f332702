"""No record stops the stream worker, and an event id's first copy wins (issue 10, worker side).

Real broker throughout: the worker's consumer and producer are real. The fuzz test feeds
`StreamWorker.process` message objects built here (a tiny stand-in for confluent_kafka.Message:
a broker round trip per hypothesis example would be far too slow) and checks what the real
producer wrote to the real topics once at the end.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import random
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st

from meterline.schemas import events as ev
from meterline.schemas.events import GpuSample, UsageEvent, build, new_id
from meterline.streams.codec import decode_usage
from meterline.streams.pricing import Catalog
from meterline.streams.worker import StreamWorker, commit_offsets, usage_digest

from test_streams_pipeline import priced_record, produce, read_topic, run_worker

pytestmark = [pytest.mark.kafka, pytest.mark.xdist_group("streams_faults")]  # one process makes the module fixtures
UTC = timezone.utc
NOW = datetime.now(UTC)


def tool_event(tenant: str, cost: str, **overrides) -> dict:
    """A usage event whose charge is its explicit cost (the ground truth needs no catalog)."""
    return {"event_id": new_id(), "ts": (NOW - timedelta(minutes=2)).isoformat(), "tenant_id": tenant, "team": "core",
            "session_id": "s1", "kind": "tool_call", "tool": "search", "cost_usd": cost, **overrides}


def letters(settings) -> list[dict]:
    return [json.loads(raw) for raw in read_topic(settings, "dlq")]


def tenant_spend(settings) -> dict[str, Decimal]:
    latest = {}
    for raw in read_topic(settings, "spend"):
        update = json.loads(raw)
        if update["scope"] == "tenant":
            latest[update["tenant_id"]] = Decimal(update["period_cost_usd"])
    return latest


# ------------------------------------------------------------- commit errors
class CommitOnce:
    """A consumer whose commit raises the given Kafka errors, in turn, then succeeds (pure logic)."""

    def __init__(self, *codes: int) -> None:
        self.codes, self.calls = list(codes), 0

    def assignment(self) -> list:
        return [TopicPartition("usage", 0)]

    def position(self, partitions: list) -> list:
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in partitions]

    def commit(self, offsets: list, asynchronous: bool = True) -> None:
        assert [(tp.partition, tp.offset) for tp in offsets] == [(0, 7)]
        self.calls += 1
        if self.codes:
            raise KafkaException(KafkaError(self.codes.pop(0)))


RETRIED = [KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.NOT_COORDINATOR, KafkaError.REQUEST_TIMED_OUT,
           KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError.COORDINATOR_NOT_AVAILABLE]
SKIPPED = [KafkaError._ASSIGNMENT_LOST, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
           KafkaError.UNKNOWN_MEMBER_ID]


def test_an_async_commit_covers_what_was_processed_not_what_was_consumed_after_it(settings):
    """librdkafka's offset-less async commit takes the stored offsets when its thread sends it, by which time
    the next consume() may have stored more (librdkafka #4534, confluent-kafka-python #933): a crash then
    loses records nobody processed. commit_offsets commits the positions of the moment it is called."""
    from confluent_kafka import Consumer

    produce(settings, "usage", [(b"acme", b"x")] * 3_000)
    name = settings.topic("usage")
    consumer = Consumer(settings.kafka_config(**{"group.id": f"race-{uuid.uuid4().hex}", "enable.auto.commit": False,
                                                 "auto.offset.reset": "earliest"}))
    try:
        consumer.assign([TopicPartition(name, p) for p in range(12)])
        processed = []
        while not processed:
            processed = consumer.consume(200, timeout=1.0)
        expected = {tp.partition: tp.offset for tp in consumer.position(consumer.assignment()) if tp.offset >= 0}
        assert commit_offsets(consumer, asynchronous=True)
        while consumer.consume(1_000, timeout=0.2):  # the next batches, never processed (a crash follows)
            pass
        committed = {tp.partition: tp.offset for tp in consumer.committed(consumer.assignment(), timeout=30) if tp.offset >= 0}
        assert committed == expected
    finally:
        consumer.close()


@pytest.mark.parametrize("code", RETRIED)
def test_a_retriable_commit_error_is_retried_in_place(code):
    consumer = CommitOnce(code, code)
    assert commit_offsets(consumer, backoff=(0, 0, 0)) is True
    assert consumer.calls == 3
    always = CommitOnce(*[code] * 10)  # still failing after the retries: the next checkpoint commits
    assert commit_offsets(always, backoff=(0, 0)) is False and always.calls == 3


@pytest.mark.parametrize("code", SKIPPED)
def test_a_lost_assignment_or_rebalance_skips_the_commit(code):
    consumer = CommitOnce(code)
    assert commit_offsets(consumer, backoff=(0, 0)) is False
    assert consumer.calls == 1  # not retried: the partitions are not ours to commit now


class WatermarkOnce(CommitOnce):
    """A consumer whose get_watermark_offsets raises the given Kafka errors, in turn, then reports an end of 7."""

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float | None = None) -> tuple[int, int]:
        self.calls += 1
        if self.codes:
            raise KafkaException(KafkaError(self.codes.pop(0)))
        return 0, 7


def test_caught_up_waits_out_a_leader_election_and_raises_what_does_not_pass():
    """Right after a topic is created its partitions may answer NOT_LEADER for a moment (seen under load):
    caught_up() asks again instead of stopping the worker; an error that will not pass still raises."""
    electing = WatermarkOnce(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
    assert StreamWorker.caught_up(SimpleNamespace(consumer=electing)) is True
    assert electing.calls == 3
    with pytest.raises(KafkaException):
        StreamWorker.caught_up(SimpleNamespace(consumer=WatermarkOnce(KafkaError.TOPIC_AUTHORIZATION_FAILED)))


class UnreadSince(WatermarkOnce):
    """Nothing consumed yet (position -1): where the group left off comes from committed(), which raises the given
    Kafka errors in turn, then answers `offset`; the end is 7."""

    def __init__(self, offset: int, *codes: int) -> None:
        super().__init__()
        self.offset, self.committed_errors = offset, list(codes)

    def position(self, partitions: list) -> list:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]

    def committed(self, partitions: list, timeout: float | None = None) -> list:
        self.calls += 1
        if self.committed_errors:
            raise KafkaException(KafkaError(self.committed_errors.pop(0)))
        return [TopicPartition(tp.topic, tp.partition, self.offset) for tp in partitions]


def test_caught_up_reads_where_the_group_left_off_while_the_coordinator_moves():
    """A worker that consumed nothing since it started is caught up when its group committed the end already;
    the committed read waits out a coordinator that moves (NOT_COORDINATOR on a fresh broker) instead of raising."""
    moving = UnreadSince(7, KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    assert StreamWorker.caught_up(SimpleNamespace(consumer=moving)) is True
    assert moving.calls == 4  # two refused committed() reads, the answer, one watermark read
    assert StreamWorker.caught_up(SimpleNamespace(consumer=UnreadSince(6))) is False  # one record left to read
    with pytest.raises(KafkaException):
        StreamWorker.caught_up(SimpleNamespace(consumer=UnreadSince(7, KafkaError.GROUP_AUTHORIZATION_FAILED)))


@pytest.mark.parametrize("code", [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
                                  KafkaError.FENCED_INSTANCE_ID, KafkaError.INVALID_CONFIG])
def test_an_error_that_concerns_every_record_still_raises(code):
    with pytest.raises(KafkaException):
        commit_offsets(CommitOnce(code), backoff=(0, 0))


def test_the_worker_checkpoint_survives_commit_failures_and_records_progress(settings):
    worker = StreamWorker(settings, group_id=f"g-{uuid.uuid4().hex[:6]}")
    real = worker.consumer
    try:
        before = worker.last_progress
        worker.consumer = CommitOnce(KafkaError._ASSIGNMENT_LOST)
        worker.checkpoint("sync")  # skipped, no exit
        assert worker.last_progress == before
        worker.consumer = CommitOnce(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
        worker.checkpoint("sync")
        assert worker.consumer.calls == 2 and worker.last_progress > before
        worker.consumer = CommitOnce(KafkaError.TOPIC_AUTHORIZATION_FAILED)
        with pytest.raises(KafkaException):
            worker.checkpoint("sync")
    finally:
        real.close()


# ------------------------------------------------------------------- fuzz
# bench/fake_kafka.py: what process() reads of a confluent_kafka.Message (bench/profile.py feeds the same one)
_spec = importlib.util.spec_from_file_location("bench_fake_kafka", Path(__file__).parents[1] / "bench" / "fake_kafka.py")
_fake_kafka = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fake_kafka)
Message = _fake_kafka.Message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=40)
    | st.sampled_from(["0001-01-01T00:30:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00Z",
                       "2024-02-30T00:00:00Z", "1e400", "-0", "0.0000000000001", "NaN", "", "\x00"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
USAGE_FIELDS = list(UsageEvent.model_fields)
GPU_FIELDS = list(GpuSample.model_fields)


def usage_base() -> dict:
    return {"event_id": new_id(), "ts": (NOW - timedelta(minutes=1)).isoformat(), "tenant_id": "acme", "team": "core",
            "agent_id": "a1", "session_id": "s1", "kind": "llm_call", "provider": "openai", "model": "gpt-4o",
            "input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 200, "attributes": {"k": "v"}}


def gpu_base() -> dict:
    return {"sample_id": new_id(), "ts": (NOW - timedelta(minutes=1)).isoformat(), "node": "n1", "level": "process",
            "gpu_index": 0, "gpu_uuid": "GPU-1", "gpu_name": "NVIDIA H100 80GB HBM3", "interval_ms": 1000, "pid": 7,
            "tenant_id": "acme", "session_id": "s1", "attributed": True, "device_processes": 1}


records = st.one_of(
    st.tuples(st.sampled_from(["usage", "gpu"]), st.binary(max_size=300).map(lambda b: ("bytes", b))),
    st.tuples(st.just("usage"), st.tuples(st.just("fields"), st.dictionaries(st.sampled_from(USAGE_FIELDS), json_values, max_size=3),
                                          st.sets(st.sampled_from(USAGE_FIELDS), max_size=2))),
    st.tuples(st.just("gpu"), st.tuples(st.just("fields"), st.dictionaries(st.sampled_from(GPU_FIELDS), json_values, max_size=3),
                                        st.sets(st.sampled_from(GPU_FIELDS), max_size=2))),
)


def render(topic: str, spec: tuple) -> bytes:
    if spec[0] == "bytes":
        return spec[1]
    record = usage_base() if topic == "usage" else gpu_base()
    record.update(spec[1])
    for name in spec[2]:
        record.pop(name, None)
    return json.dumps(record).encode()


def contract_accepts(topic: str, raw: bytes) -> bool:
    """The oracle: the pydantic contract accepts the record."""
    try:
        ev.decode(UsageEvent if topic == "usage" else GpuSample, raw)
        return True
    except ev.InvalidEvent:
        return False


@pytest.fixture(scope="module")
def fuzz_worker(kafka_bootstrap):
    from test_streams_pipeline import fresh_settings

    settings = fresh_settings(kafka_bootstrap)
    worker = StreamWorker(settings, group_id=f"fuzz-{uuid.uuid4().hex[:6]}")
    worker.expected = Counter()
    worker.offsets = Counter()
    yield worker
    worker.checkpoint("none")
    worker.consumer.close()
    priced = [priced_record(raw) for raw in read_topic(settings, "priced")]
    assert len(priced) == worker.expected["priced"] == len({p["event_id"] for p in priced})
    assert len(read_topic(settings, "dlq")) == worker.expected["dead_letters"]


@hsettings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(records, min_size=1, max_size=4))
@example(batch=[("usage", ("fields", {"ts": "0001-01-01T00:30:00+01:00"}, set()))])
@example(batch=[("gpu", ("fields", {"ts": "0001-01-01T00:30:00+01:00"}, set()))])
@example(batch=[("usage", ("bytes", b'{"event_id": "\xff\xfe"}'))])
def test_fuzz_any_record_is_priced_once_or_dead_lettered_never_raised(fuzz_worker, batch):
    worker = fuzz_worker
    worker.dedupe.ids.clear()  # each example's records stand alone (a fuzzed event_id may repeat)
    msgs, valid = [], Counter()
    for topic, spec in batch:
        raw = render(topic, spec)
        worker.offsets[topic] += 1
        msgs.append(Message(worker.topics[topic], 0, worker.offsets[topic], b"acme", raw))
        valid[(topic, contract_accepts(topic, raw))] += 1
    ids = [json.loads(m.value())["event_id"] for m in msgs if m.topic() == worker.topics["usage"] and contract_accepts("usage", m.value())]
    repeats = len(ids) - len(set(ids))  # the same event twice in one batch: a duplicate
    before = Counter(worker.stats)

    worker.process(msgs)  # never raises

    delta = Counter(worker.stats)
    delta.subtract(before)
    assert delta["priced"] + delta["duplicates"] + delta["conflicting_duplicates"] == valid[("usage", True)]
    assert delta["priced"] == valid[("usage", True)] - repeats
    assert delta["gpu_samples"] == valid[("gpu", True)]
    assert delta["dead_letters"] == valid[("usage", False)] + valid[("gpu", False)] + delta["conflicting_duplicates"]
    worker.expected["priced"] += delta["priced"]
    worker.expected["dead_letters"] += delta["dead_letters"]


def test_usage_digest_is_of_the_fields_not_the_bytes():
    record = usage_base()
    raw = json.dumps(record).encode()
    fast = decode_usage(raw)
    slow = ev.decode(UsageEvent, raw)  # the pydantic path (the fallback) must agree with the fast path
    spaced = json.dumps(dict(reversed(list(record.items()))), indent=3).encode()
    assert type(fast) is not type(slow)
    assert usage_digest(fast) == usage_digest(slow) == usage_digest(decode_usage(spaced))
    for change in [{"tenant_id": "other"}, {"cost_usd": "0.1"}, {"attributes": {"k": "w"}}, {"input_tokens": 1201}]:
        assert usage_digest(decode_usage(json.dumps({**record, **change}).encode())) != usage_digest(fast), change


# ----------------------------------------------------------- poison records
def test_poison_records_between_valid_events_are_dead_lettered_and_the_rest_priced(settings, monkeypatch):
    real_price = Catalog.price_pico

    def price_pico(self, event):
        if event.model == "exploding-model":
            raise RuntimeError("rates table is corrupt for exploding-model")
        return real_price(self, event)

    real_gpu_cost = Catalog.gpu_sample_cost

    def gpu_sample_cost(self, sample):
        if sample.gpu_name == "Exploding GPU":
            raise ArithmeticError("no rate for a negative slice")
        return real_gpu_cost(self, sample)

    monkeypatch.setattr(Catalog, "price_pico", price_pico)
    monkeypatch.setattr(Catalog, "gpu_sample_cost", gpu_sample_cost)
    rng = random.Random(11)
    valid = [tool_event(rng.choice(["acme", "globex"]), f"{rng.randint(1, 10**6)}.{rng.randint(0, 10**12 - 1):012d}")
             for _ in range(60)]
    big = json.dumps({**tool_event("acme", "1"), "tool": "t" * 900_000}).encode()  # invalid (tool too long), 900 KB
    poison = {
        "year one": json.dumps(tool_event("acme", "1", ts="0001-01-01T00:30:00+01:00")).encode(),
        "big": big,
        "pricing raises": json.dumps({**tool_event("acme", None), "kind": "llm_call", "model": "exploding-model",
                                      "provider": "openai", "input_tokens": 10}).encode(),
        "tombstone": None,
        "invalid utf-8": b'{"event_id": "\xff\xfe\xfd", "tenant_id": "acme"}',
    }
    stream = [(e["tenant_id"].encode(), json.dumps(e).encode()) for e in valid]
    for i, raw in enumerate(poison.values()):
        stream.insert(10 * (i + 1), (b"acme", raw))
    produce(settings, "usage", stream)
    gpu = build(GpuSample, sample_id=new_id(), ts=NOW - timedelta(minutes=1), node="n1", level="process", gpu_index=0,
                gpu_uuid="GPU-9", gpu_name="Exploding GPU", interval_ms=1000, pid=9, tenant_id="acme", attributed=True)
    produce(settings, "gpu", [(b"acme", gpu.to_json())])

    stats = run_worker(settings)  # returns: nothing stopped it

    truth: Counter = Counter()
    for e in valid:
        truth[e["tenant_id"]] += Decimal(e["cost_usd"])
    priced = [priced_record(raw) for raw in read_topic(settings, "priced")]
    assert sorted(p["event_id"] for p in priced) == sorted(e["event_id"] for e in valid)  # each valid one, once
    assert {p["event_id"]: Decimal(p["cost_usd"]) for p in priced} == {e["event_id"]: Decimal(e["cost_usd"]) for e in valid}
    assert tenant_spend(settings) == truth  # nothing of a poison record was charged

    dead = letters(settings)
    assert stats["dead_letters"] == len(dead) == len(poison) + 1
    by_payload = {}
    for letter in dead:
        assert letter["reason"] and "\n" not in letter["reason"]
        by_payload[base64.b64decode(letter["payload_b64"])[:64]] = letter
    assert by_payload[poison["year one"][:64]]["source_topic"] == settings.topic("usage")
    raises = by_payload[poison["pricing raises"][:64]]
    assert raises["error_type"] == "RuntimeError" and raises["reason"].startswith("pricing failed: RuntimeError: rates table")
    assert by_payload[b""]["error_type"] == "InvalidEvent" and "tombstone" in by_payload[b""]["reason"]
    assert by_payload[poison["invalid utf-8"][:64]]["error_type"] == "InvalidEvent"
    gpu_letter = by_payload[gpu.to_json()[:64]]
    assert gpu_letter["error_type"] == "ArithmeticError" and gpu_letter["source_topic"] == settings.topic("gpu")
    assert gpu_letter["reason"].startswith("pricing failed: ArithmeticError")
    big_letter = by_payload[big[:64]]
    assert len(json.dumps(big_letter)) < 1_000_000
    assert "truncated" in big_letter["reason"] and hashlib.sha256(big).hexdigest() in big_letter["reason"]
    assert base64.b64decode(big_letter["payload_b64"]) == big[: ev.MAX_DEAD_PAYLOAD_BYTES]


def test_a_priced_record_kafka_refuses_is_dead_lettered_and_its_spend_taken_back(settings, monkeypatch):
    """produce() refuses a record over message.max.bytes (the real producer): that event's spend is
    undone and it goes to the dlq; the loop goes on."""
    def oversized(real):
        def priced(self, event, *args):
            body = real(self, event, *args)
            return body + b" " * 2_000_000 if event.tool == "oversized" else body
        return priced

    for name in ("_priced_json", "_priced_v2"):  # whichever METERLINE_PRICED_FORMAT picks
        monkeypatch.setattr(StreamWorker, name, oversized(getattr(StreamWorker, name)))
    ok, refused = tool_event("acme", "2.5"), tool_event("acme", "7", tool="oversized")
    produce(settings, "usage", [(b"acme", json.dumps(e).encode()) for e in (refused, ok)])

    stats = run_worker(settings)

    assert [priced_record(r)["event_id"] for r in read_topic(settings, "priced")] == [ok["event_id"]]
    assert tenant_spend(settings) == {"acme": Decimal("2.5")}
    [letter] = letters(settings)
    assert letter["error_type"] == "MSG_SIZE_TOO_LARGE" and letter["reason"].startswith("producing the priced record failed")
    assert stats["priced"] == 1 and stats["dead_letters"] == 1


def test_an_output_kafka_refuses_becomes_a_bounded_dead_letter(settings):
    worker = StreamWorker(settings, group_id=f"g-{uuid.uuid4().hex[:6]}")
    try:
        worker._produce(worker.topics["anomalies"], b"x" * 2_000_000, b"acme")  # the real producer refuses it
        worker.checkpoint("none")
    finally:
        worker.consumer.close()
    [letter] = letters(settings)
    assert letter["error_type"] == "MSG_SIZE_TOO_LARGE" and letter["source_topic"] == settings.topic("anomalies")
    assert "truncated" in letter["reason"] and len(json.dumps(letter)) < 1_000_000
    assert worker.stats["refused_outputs"] == 1


# ------------------------------------------------------- first write wins
def test_the_first_copy_of_an_event_id_wins_and_a_conflicting_copy_is_refused_and_raised(settings):
    group = f"streams-{uuid.uuid4().hex[:6]}"
    worker = StreamWorker(settings, group_id=group, checkpoint_interval=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        victim = tool_event("victim", "3.25")
        produce_to(settings, 3, b"victim", json.dumps(victim).encode())
        wait_for(worker, thread, 1)
        forged = {**victim, "tenant_id": "attacker", "cost_usd": "0.01"}  # same id, another tenant, another partition
        retry = json.dumps(dict(reversed(list(victim.items()))), indent=1).encode()  # same fields, other bytes
        reused = {**victim, "cost_usd": "9.99"}  # same tenant, another body
        produce_to(settings, 7, b"attacker", json.dumps(forged).encode())
        wait_for(worker, thread, 2)
        produce_to(settings, 3, b"victim", retry)
        wait_for(worker, thread, 3)
        produce_to(settings, 3, b"victim", json.dumps(reused).encode())
        wait_for(worker, thread, 4)
    finally:
        stop.set()
        thread.join()

    priced = [priced_record(r) for r in read_topic(settings, "priced")]
    assert [(p["event_id"], p["tenant_id"], Decimal(p["cost_usd"])) for p in priced] == [(victim["event_id"], "victim", Decimal("3.25"))]
    assert tenant_spend(settings) == {"victim": Decimal("3.25")}  # the attacker's tenant has no spend at all
    dead = sorted(letters(settings), key=lambda d: d["offset"])
    assert [d["error_type"] for d in dead] == ["conflicting_duplicate"] * 2
    usage = settings.topic("usage")
    first = dead[0]["reason"]
    assert "'victim'" in first and "'attacker'" in first and victim["event_id"] in first
    assert f"{usage}[3]@0" in first and f"{usage}[7]@0" in first
    assert f"{usage}[3]@2" in dead[1]["reason"]
    anomalies = [json.loads(r) for r in read_topic(settings, "anomalies") if json.loads(r)["kind"] == "conflicting_duplicate"]
    by_severity = {a["severity"]: a for a in anomalies}
    assert len(anomalies) == 2 and set(by_severity) == {"critical", "warning"}
    critical = by_severity["critical"]
    assert critical["tenant_id"] == critical["scope_id"] == "victim" and critical["scope"] == "tenant"
    assert critical["evidence"] == {"event_id": victim["event_id"], "first_tenant": "victim", "copy_tenant": "attacker",
                                    "first_at": f"{usage}[3]@0", "copy_at": f"{usage}[7]@0", "stage": "streams"}
    assert worker.stats["duplicates"] == 1 and worker.stats["priced"] == 1


def produce_to(settings, partition: int, key: bytes, value: bytes) -> None:
    from confluent_kafka import Producer

    producer = Producer(settings.kafka_config(**{"enable.idempotence": True}))
    producer.produce(settings.topic("usage"), value, key, partition=partition)
    assert producer.flush(30) == 0


def wait_for(worker: StreamWorker, thread: threading.Thread, n: int) -> None:
    """Until the worker has handled n usage records, whatever it made of them (one at a time: consume order)."""
    while sum(worker.stats[c] for c in ("priced", "duplicates", "conflicting_duplicates")) < n:
        assert thread.is_alive(), "the worker stopped"  # run() returns only on stop: it died
        time.sleep(0.05)


# ------------------------------------------------------------- broker outage
@pytest.mark.slow
def test_a_broker_freeze_longer_than_the_session_does_not_freeze_the_worker(own_broker):
    """Issue 10: after a broker SIGSTOP longer than the group session, the worker sat in a synchronous
    commit forever (the group waited for this thread to serve its revoke; the commit waited for the
    group). Its own broker (frozen here), a 6 s session so the test needs only a 12 s freeze."""
    import os
    import signal

    _, status, settings = own_broker
    worker = StreamWorker(settings, group_id="freeze-streams", checkpoint_interval=1.0,
                          consumer_overrides={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    before = [tool_event(f"t{i % 5}", "0.25") for i in range(200)]
    produce(settings, "usage", [(e["tenant_id"].encode(), json.dumps(e).encode()) for e in before])
    wait_for(worker, thread, 200)
    os.kill(status.pid, signal.SIGSTOP)
    time.sleep(12)
    os.kill(status.pid, signal.SIGCONT)
    after = [tool_event(f"t{i % 5}", "0.5") for i in range(200)]
    produce(settings, "usage", [(e["tenant_id"].encode(), json.dumps(e).encode()) for e in after])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len({priced_record(r)["event_id"] for r in read_topic(settings, "priced")}) < 400:
        time.sleep(1)
    stop.set()
    thread.join(60)
    assert not thread.is_alive(), "the worker is stuck (it does not even stop)"
    priced = {priced_record(r)["event_id"]: Decimal(priced_record(r)["cost_usd"]) for r in read_topic(settings, "priced")}
    assert priced == {e["event_id"]: Decimal(e["cost_usd"]) for e in before + after}
