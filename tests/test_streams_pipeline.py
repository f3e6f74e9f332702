"""The stream worker against the real broker: bad input, spend totals, GPU attribution, SIGKILL."""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from hypothesis import HealthCheck, Phase, given, settings as hsettings, strategies as st

from meterline.topics import partition_ends
from meterline.schemas.events import GpuSample, SpendUpdate, UsageEvent, build, decode, new_id
from meterline.schemas.scopes import scope_ids
from meterline.settings import Settings
from meterline.streams.codec import decode_priced
from meterline.streams.worker import StreamWorker
from meterline.topics import create_topics

pytestmark = pytest.mark.kafka
NOW = datetime.now(timezone.utc)
MODELS = [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("self-hosted", "llama-3.1-8b-instruct"), ("nobody", "mystery-9000")]


def fresh_settings(bootstrap: str) -> Settings:
    s = Settings(kafka_bootstrap=bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}")
    create_topics(s)
    return s


def usage_record(rng: random.Random, tenant: str | None = None, **overrides) -> dict:
    provider, model = rng.choice(MODELS)
    inp = rng.randint(0, 20_000)
    read = rng.randint(0, inp // 2)
    record = {"event_id": new_id(), "ts": (NOW - timedelta(seconds=rng.randint(60, 600))).isoformat(),
              "tenant_id": tenant or rng.choice(["acme", "globex", "initech"]), "team": rng.choice(["core", "ml", ""]),
              "project": rng.choice(["p1", "p2"]), "agent_id": f"agent{rng.randint(0, 3)}", "session_id": f"s{rng.randint(0, 40)}",
              "kind": "llm_call", "provider": provider, "model": model, "input_tokens": inp, "output_tokens": rng.randint(0, 4000),
              "cache_read_tokens": read, "cache_write_tokens": rng.randint(0, inp - read)}
    record["reasoning_tokens"] = rng.randint(0, record["output_tokens"])
    if rng.random() < 0.05:  # a call whose instrumentation reported no usage
        record.update(input_tokens=0, output_tokens=0, cache_read_tokens=0, cache_write_tokens=0, reasoning_tokens=0,
                      usage="missing")
    if rng.random() < 0.1:
        record.update(kind="tool_call", tool="web_search", model="", units=rng.randint(1, 5))
    if rng.random() < 0.05:
        record["cost_usd"] = "0.0123"
    record.update(overrides)
    return record


def produce(settings: Settings, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = Producer(settings.kafka_config(**{"linger.ms": 5, "enable.idempotence": True}))
    for i, (key, value) in enumerate(records):
        producer.produce(settings.topic(topic), value, key)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0


def priced_record(raw: bytes) -> dict:
    """A `priced` record (v1 JSON or priced.v2) as its JSON object, read with the consumers' decoder."""
    return json.loads(decode_priced(raw).model_dump_json())


def read_topic(settings: Settings, topic: str) -> list[bytes]:
    """Every record of the topic, read up to the high watermarks (no timing guesses)."""
    name = settings.topic(topic) if "." not in topic else topic
    consumer = Consumer(settings.kafka_config(**{"group.id": f"reader-{uuid.uuid4().hex}", "enable.auto.commit": False}))
    try:
        ends = partition_ends(consumer, name)  # retried while a leader moves
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in todo])
        out = []
        while todo:
            for msg in consumer.consume(10_000, timeout=1.0):
                if msg.error():
                    continue
                out.append(msg.value())
                if msg.offset() + 1 >= ends[msg.partition()]:
                    todo.discard(msg.partition())
        return out
    finally:
        consumer.close()


def run_worker(settings: Settings, **kw) -> Counter:
    return StreamWorker(settings, group_id=f"streams-{uuid.uuid4().hex[:6]}", checkpoint_interval=0.5, **kw).run(until_caught_up=True)


# ------------------------------------------------------------------ bad input
def _bad(rng_seed: int, kind: str) -> bytes:
    rng = random.Random(rng_seed)
    good = usage_record(rng)
    broken = {
        "truncated_json": lambda: json.dumps(good).encode()[: rng.randint(0, 40)],
        "binary": lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))),
        "wrong_type": lambda: json.dumps({**good, **dict([rng.choice(WRONG_TYPES)])}).encode(),
        "negative_tokens": lambda: json.dumps({**good, "output_tokens": -rng.randint(1, 10**6)}).encode(),
        "huge_string": lambda: json.dumps({**good, "model": "m" * rng.randint(300, 200_000)}).encode(),
        "cache_exceeds_input": lambda: json.dumps({**good, "input_tokens": 1, "cache_read_tokens": 5}).encode(),
        "reasoning_exceeds_output": lambda: json.dumps({**good, "output_tokens": 1, "reasoning_tokens": 2}).encode(),
        "unknown_usage": lambda: json.dumps({**good, "usage": "estimated"}).encode(),
        "future_ts": lambda: json.dumps({**good, "ts": (NOW + timedelta(days=1)).isoformat()}).encode(),
        "missing_tenant": lambda: json.dumps({k: v for k, v in good.items() if k != "tenant_id"}).encode(),
        "float_money": lambda: json.dumps({**good, "cost_usd": "NaN"}).encode(),
        "unknown_field": lambda: json.dumps({**good, "surprise": 1}).encode(),
        "not_an_object": lambda: b"[1, 2, 3]",
    }
    return broken[kind]()


WRONG_TYPES = [(field, value) for field, values in {
    "input_tokens": ["12", 1.5, True, [1], None], "ts": [True, [1], {"a": 1}, "yesterday", None],
    "tenant_id": [1, True, [1], None, ""], "event_id": ["x", 1, None], "kind": ["chat", 3], "attributes": [[1], {"k": 1}],
}.items() for value in values]
BAD_KINDS = ["truncated_json", "binary", "wrong_type", "negative_tokens", "huge_string", "cache_exceeds_input",
             "reasoning_exceeds_output", "unknown_usage", "future_ts",
             "missing_tenant", "float_money", "unknown_field", "not_an_object"]
stream_items = st.lists(
    st.one_of(st.tuples(st.just("valid"), st.integers(0, 10**9)),
              st.tuples(st.just("dup"), st.integers(0, 10**9)),
              st.tuples(st.sampled_from(BAD_KINDS), st.integers(0, 10**9))),
    min_size=20, max_size=300,
)


@hsettings(max_examples=3, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
@given(items=stream_items)
def test_bad_input_goes_to_dlq_and_every_valid_event_is_priced_once(kafka_bootstrap, items):
    settings = fresh_settings(kafka_bootstrap)
    records, valid_ids, bad_payloads = [], set(), []
    for kind, seed in items:
        if kind in ("valid", "dup"):
            rec = usage_record(random.Random(seed))
            raw = json.dumps(rec).encode()
            records += [(rec["tenant_id"].encode(), raw)] * (2 if kind == "dup" else 1)  # a producer retry: same bytes twice
            valid_ids.add(rec["event_id"])
        else:
            raw = _bad(seed, kind)
            records.append((b"acme", raw))
            bad_payloads.append(raw)
    records.append((b"acme", None))  # a tombstone is bad input too
    bad_payloads.append(b"")
    produce(settings, "usage", records)

    stats = run_worker(settings)

    priced = Counter(priced_record(raw)["event_id"] for raw in read_topic(settings, "priced"))
    assert set(priced) == valid_ids and set(priced.values()) == {1}
    letters = [json.loads(raw) for raw in read_topic(settings, "dlq")]
    assert sorted(base64.b64decode(d["payload_b64"]) for d in letters) == sorted(bad_payloads)
    assert all(d["reason"] and d["source_topic"] == settings.topic("usage") for d in letters)
    assert stats["priced"] == len(valid_ids) and stats["dead_letters"] == len(bad_payloads)


# ------------------------------------------------------------- spend totals
def test_spend_updates_equal_the_sum_of_priced_costs_including_gpu(kafka_bootstrap):
    settings, rng = fresh_settings(kafka_bootstrap), random.Random(3)
    events = [usage_record(rng) for _ in range(3000)]
    produce(settings, "usage", [(e["tenant_id"].encode(), json.dumps(e).encode()) for e in events])
    ts = NOW - timedelta(minutes=2)
    gpu = [  # two processes share one MIG slice (they split it), an unattributed one has a slice of its own
        build(GpuSample, sample_id=new_id(), ts=ts, node="n1", level="process", gpu_index=0, gpu_uuid="GPU-1", gpu_name="NVIDIA H100 80GB HBM3",
              mig_uuid=f"MIG-{1 if tenant else 2}", mig_slices=1, mig_total_slices=7, interval_ms=7000, pid=pid, process_memory_bytes=2**30, sm_util_pct=50,
              tenant_id=tenant, team="core" if tenant else "", session_id=session, attributed=bool(tenant),
              device_processes=2 if tenant else 1)
        for pid, tenant, session in [(1, "acme", "s1"), (2, "acme", "s2"), (3, "", "")]
    ]
    produce(settings, "gpu", [(g.key.encode(), g.to_json()) for g in gpu])

    run_worker(settings)

    expected: dict[tuple, Decimal] = defaultdict(Decimal)
    events_per_scope: Counter = Counter()
    for raw in read_topic(settings, "priced"):
        priced = decode_priced(raw)  # the sink's contract holds for every record (v1 or priced.v2)
        p = json.loads(priced.model_dump_json())
        assert priced.cost_usd == Decimal(p["cost_usd"]) and priced.catalog_version.startswith("genai-prices ")
        if priced.kind == "llm_call" and priced.cost_source == "catalog":
            assert priced.cost_usd == priced.input_cost_usd + priced.output_cost_usd + priced.cache_read_cost_usd + priced.cache_write_cost_usd
        for scope, sid in scope_ids(p["tenant_id"], p["team"], p["project"], p["agent_id"], p["session_id"]).items():
            expected[(p["tenant_id"], scope, sid)] += Decimal(p["cost_usd"])
            events_per_scope[(p["tenant_id"], scope, sid)] += 1
    # H100 $2.49/h, 1/7 slice, 7 s = 1 GPU-second = 0.000691666667 (12 dp, half-even), split between 2 processes
    # by whole pico-USD (the remainder is never charged: spend may err low by < 1 pico per process, never high).
    gpu_share = Decimal("0.000345833333")
    for key in [("acme", "tenant", "acme"), ("acme", "team", "acme/core"), ("acme", "session", "acme/core///s1"), ("acme", "session", "acme/core///s2")]:
        expected[key] += gpu_share * (2 if key[1] in ("tenant", "team") else 1)
    expected[("unattributed", "tenant", "unattributed")] += Decimal("0.000691666667")

    latest: dict[tuple, SpendUpdate] = {}
    for raw in read_topic(settings, "spend"):
        update = decode(SpendUpdate, raw)  # every update honours the contract
        latest[(update.tenant_id, update.scope, update.scope_id)] = update
    assert set(latest) == set(expected)
    for key, total in expected.items():
        assert latest[key].period_cost_usd == total, key
        assert latest[key].events == events_per_scope[key], key
    assert latest[("acme", "session", "acme/core///s1")].gpu_seconds == Decimal("0.5")
    assert latest[("unattributed", "tenant", "unattributed")].gpu_seconds == Decimal("1")
    assert any(decode(SpendUpdate, r).window_end - decode(SpendUpdate, r).window_start == timedelta(minutes=1) for r in read_topic(settings, "spend")[:1])
    anomalies = [json.loads(r) for r in read_topic(settings, "anomalies")]
    assert {a["kind"] for a in anomalies} >= {"unpriced_model"}


def test_idle_sessions_leave_memory_and_come_back_from_the_changelog_with_their_month_to_date(kafka_bootstrap):
    """Issue 17 item 3: a worker parks its idle sessions (out of its state), stops; the next one restores them from
    the spend-state changelog, they spend again, and each session's period total is the plain sum of its priced
    costs over both runs (ground truth: the priced topic)."""
    settings, rng = fresh_settings(kafka_bootstrap), random.Random(11)
    group = f"streams-{uuid.uuid4().hex[:6]}"
    batch = lambda: [usage_record(rng, tenant="acme", cost_usd="0.0001") for _ in range(300)]  # noqa: E731
    produce(settings, "usage", [(b"acme", json.dumps(e).encode()) for e in batch()])

    class Evicting(StreamWorker):  # every checkpoint as if the sessions had been idle for two hours
        evicted = 0

        def checkpoint(self, commit: str = "async") -> None:
            super().checkpoint(commit)
            self.evicted += self.spend.evict_idle(self.stream_now + timedelta(hours=2), timedelta(hours=1))

    first = Evicting(settings, group_id=group, checkpoint_interval=0.5)
    first.run(until_caught_up=True)
    assert first.evicted > 20  # sessions (and agents) aged out of memory, published first
    produce(settings, "usage", [(b"acme", json.dumps(e).encode()) for e in batch()])
    second = StreamWorker(settings, group_id=group, checkpoint_interval=0.5)
    assert second.run(until_caught_up=True)["spend_state_restored"] > 20  # what the changelog gave back (on disk)
    truth: dict[str, Decimal] = defaultdict(Decimal)
    for raw in read_topic(settings, "priced"):
        p = priced_record(raw)
        truth[scope_ids(p["tenant_id"], p["team"], p["project"], p["agent_id"], p["session_id"])["session"]] += Decimal(p["cost_usd"])
    latest = {}
    for raw in read_topic(settings, "spend"):
        update = decode(SpendUpdate, raw)
        if update.scope == "session":
            latest[update.scope_id] = update.period_cost_usd
    assert len(truth) > 20 and latest == truth


def test_a_worker_that_has_read_no_event_for_a_minute_keeps_running(kafka_bootstrap):
    """`meterline up` restarted on a quiet pipeline: its worker's first eviction (a minute in) aged states by a stream
    time it never had (datetime.min - 1 h: OverflowError), and the worker died and restarted every minute."""
    settings = fresh_settings(kafka_bootstrap)
    worker = StreamWorker(settings, group_id=f"streams-{uuid.uuid4().hex[:6]}", checkpoint_interval=0.5)
    worker._last_evict -= 61  # a minute has passed since it started  # noqa: SLF001
    stats = worker.run(until_caught_up=True)
    assert stats["priced"] == 0 and stats["evicted_scopes"] == 0


def test_the_worker_says_every_topic_it_consumes(kafka_bootstrap, tmp_path):
    """Its first line named usage and gpu only: someone checking why CPU samples were not counted was told the
    worker did not read them, though it does."""
    import os
    import subprocess
    import sys

    settings = fresh_settings(kafka_bootstrap)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env |= {"METERLINE_KAFKA_BOOTSTRAP": kafka_bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
            "METERLINE_DATA_DIR": str(tmp_path), "COLUMNS": "300"}
    run = subprocess.run([sys.executable, "-m", "meterline", "streams", "--until-caught-up"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    first = run.stdout.splitlines()[0]
    assert all(settings.topic(t) in first for t in ("usage", "gpu", "compute")), first


def test_a_damaged_changelog_record_is_dead_lettered_and_its_scope_continues_from_its_newest_good_state(kafka_bootstrap):
    """A damaged spend-state record must not restart its scope at zero (an under-count lets a session overspend):
    s1's newest record is damaged after a good one (the changelog's previous record is used), s2 has only a damaged
    one in the changelog and a good copy on `spend` (used); both damaged records reach the dlq with a reason, and
    each session's total after new spend is its good state + the priced costs (ground truth: what the test wrote
    and the priced topic)."""
    settings, rng = fresh_settings(kafka_bootstrap), random.Random(5)
    month = NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    ids = {s: scope_ids("acme", "core", "p1", "bot", s)["session"] for s in ("s1", "s2")}

    def state(session: str, period: str) -> bytes:
        return json.dumps({"update_id": str(new_id()), "ts": NOW.isoformat(), "tenant_id": "acme", "scope": "session",
                           "scope_id": ids[session], "window_start": (month + timedelta(minutes=1)).isoformat(),
                           "window_end": (month + timedelta(minutes=2)).isoformat(), "window_cost_usd": "0",
                           "period_start": month.isoformat(), "period_cost_usd": period, "events": 3, "input_tokens": 1,
                           "output_tokens": 1, "gpu_seconds": "0", "gpu_cost_usd": "0", "unpriced_events": 0}).encode()

    key = lambda session: "\x1f".join(("acme", "session", ids[session])).encode()  # noqa: E731
    bad = [state("s1", "oops"), b'{"period_cost_usd": 7']
    produce(settings, "spend-state", [(key("s1"), state("s1", "1.25")), (key("s1"), bad[0]), (key("s2"), bad[1])])
    produce(settings, "spend", [(b"acme", state("s2", "2.5"))])
    produce(settings, "usage", [(b"acme", json.dumps(usage_record(rng, tenant="acme", team="core", project="p1", agent_id="bot",
                                                                  session_id=s, cost_usd="0.001")).encode())
                                for s in ("s1", "s2") for _ in range(5)])
    stats = run_worker(settings)
    assert stats["spend_state_damaged"] == 2 and stats["spend_state_lost"] == 0
    letters = [json.loads(r) for r in read_topic(settings, "dlq")]
    assert sorted(base64.b64decode(d["payload_b64"]) for d in letters if d["error_type"] == "damaged_spend_state") == sorted(bad)
    assert all("spend-state record unreadable" in d["reason"] for d in letters)
    truth = {ids["s1"]: Decimal("1.25"), ids["s2"]: Decimal("2.5")}
    for raw in read_topic(settings, "priced"):
        p = priced_record(raw)
        truth[scope_ids("acme", p["team"], p["project"], p["agent_id"], p["session_id"])["session"]] += Decimal(p["cost_usd"])
    latest = {u.scope_id: u.period_cost_usd for u in (decode(SpendUpdate, r) for r in read_topic(settings, "spend")[1:])
              if u.scope == "session"}
    assert latest == truth and truth[ids["s1"]] == Decimal("1.255")


def test_cpu_and_memory_samples_count_in_spend_by_session_and_unattributed_ones_by_the_unattributed_tenant(kafka_bootstrap):
    from meterline.schemas.events import ComputeSample

    settings, ts = fresh_settings(kafka_bootstrap), NOW - timedelta(minutes=2)
    samples = [build(ComputeSample, sample_id=new_id(), ts=ts, node="n1", node_class="n2", level="process", pid=pid,
                     interval_ms=10_000, cpu_user_seconds=Decimal(cpu), memory_bytes=1 << 30,
                     memory_byte_seconds=Decimal(10 << 30), tenant_id=tenant, team="core" if tenant else "",
                     session_id=session, attributed=bool(tenant))
               for pid, cpu, tenant, session in [(1, "36", "acme", "s1"), (2, "3.6", "acme", "s2"), (3, "360", "", "")]]
    unknown = build(ComputeSample, **{**samples[0].model_dump(), "sample_id": new_id(), "node_class": "nope"})
    produce(settings, "compute", [(c.key.encode(), c.to_json()) for c in (*samples, unknown)])
    stats = run_worker(settings)
    assert stats["compute_samples"] == 4 and stats["compute_unpriced"] == 1 and not stats["dead_letters"], stats
    latest = {(u.tenant_id, u.scope, u.scope_id): u for u in (decode(SpendUpdate, r) for r in read_topic(settings, "spend"))}
    memory = Decimal(10) * Decimal("0.004237") / 3600  # 10 GiB-seconds at n2's $/GiB-hour
    # 36 CPU-seconds = 0.01 vCPU-hour at $0.031611; each part rounded to 12 places, then summed
    s1 = Decimal("0.000316110000") + memory.quantize(Decimal("1e-12"))
    s2 = Decimal("0.000031611000") + memory.quantize(Decimal("1e-12"))
    assert latest[("acme", "session", "acme/core///s1")].period_cost_usd == s1
    assert latest[("acme", "session", "acme/core///s2")].period_cost_usd == s2
    assert latest[("acme", "tenant", "acme")].period_cost_usd == s1 + s2  # the unknown node class is charged 0
    assert latest[("unattributed", "tenant", "unattributed")].period_cost_usd == Decimal("0.003161100000") + memory.quantize(Decimal("1e-12"))
    assert latest[("acme", "tenant", "acme")].events == 0  # samples are not usage events
    # CPU time rides along for vCPU-hour budgets: 36 + 3.6 CPU-seconds (the unknown class's 36 too: it used the CPU)
    assert latest[("acme", "session", "acme/core///s1")].cpu_seconds == Decimal(72)
    assert latest[("acme", "session", "acme/core///s2")].cpu_seconds == Decimal("3.6")
    assert latest[("acme", "tenant", "acme")].cpu_seconds == Decimal("75.6")
    assert latest[("unattributed", "tenant", "unattributed")].cpu_seconds == Decimal(360)
    _a_vcpu_hour_budget_is_spent_by_these_updates(list(latest.values()), ts)


def test_a_container_idle_against_its_cpu_limit_raises_idle_cpu_through_the_worker(kafka_bootstrap):
    """Compute samples with a CPU limit (cpu.max) that is barely used for 6 minutes: the stream worker publishes one
    idle_cpu anomaly, on the session, with the exact share used."""
    from meterline.schemas.events import Anomaly, ComputeSample

    settings, start = fresh_settings(kafka_bootstrap), NOW - timedelta(minutes=10)
    samples = [build(ComputeSample, sample_id=new_id(), ts=start + timedelta(seconds=10 * i), node="n1", node_class="n2",
                     level="cgroup", cgroup="/kubepods.slice/pod-a/crio-1.scope", interval_ms=10_000,
                     cpu_user_seconds=Decimal("0.1"), cpu_limit_cores=Decimal(4), memory_bytes=1 << 30,
                     tenant_id="acme", team="core", session_id="s-idle", attributed=True) for i in range(36)]
    produce(settings, "compute", [(c.key.encode(), c.to_json()) for c in samples])
    stats = run_worker(settings)
    assert stats["compute_samples"] == 36 and not stats["dead_letters"], stats
    idle = [a for a in (decode(Anomaly, r) for r in read_topic(settings, "anomalies")) if a.kind == "idle_cpu"]
    assert [(a.tenant_id, a.scope, a.scope_id) for a in idle] == [("acme", "session", "s-idle")]
    assert idle[0].evidence["used_pct"] == "0.25"  # 0.1 CPU-seconds of 40 core-seconds per sample


def test_budget_set_takes_a_vcpu_hour_unit_and_refuses_an_unknown_one(settings, monkeypatch):
    """`meterline budget set --unit vcpu_hours` publishes a vCPU-hour budget that `budget list` reads back from the topic."""
    from typer.testing import CliRunner

    from meterline.cli import app
    from meterline.settings import get_settings

    for name, value in (("METERLINE_KAFKA_BOOTSTRAP", settings.bootstrap), ("METERLINE_TOPIC_PREFIX", settings.topic_prefix),
                        ("METERLINE_DATA_DIR", str(settings.data_dir))):
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        done = runner.invoke(app, ["budget", "set", "--tenant", "acme", "--amount", "12.5", "--unit", "vcpu_hours", "--json"])
        assert done.exit_code == 0, done.output
        listed = json.loads(runner.invoke(app, ["budget", "list", "--json"]).stdout)
        assert [(p["policy_id"], p["unit"], p["amount"]) for p in listed] == [("tenant:acme:vcpu_hours:month", "vcpu_hours", "12.5")]
        wrong = runner.invoke(app, ["budget", "set", "--tenant", "acme", "--amount", "1", "--unit", "tpu_hours"])
        assert wrong.exit_code != 0 and "vcpu_hours" in wrong.output  # the error names the units there are
    finally:
        get_settings.cache_clear()


def _a_vcpu_hour_budget_is_spent_by_these_updates(updates: list[SpendUpdate], ts: datetime) -> None:
    """The allocator, fed the worker's real spend updates: a tenant's vCPU-hour budget counts its CPU-seconds / 3600
    (75.6 s = 0.021 h), not its dollars; a budget above it denies nothing."""
    from meterline.allocator.engine import Engine, EngineConfig
    from meterline.schemas.events import BudgetPolicy

    def decide(amount: str) -> tuple[Decimal, dict[str, str]]:
        engine = Engine(EngineConfig(), clock=lambda: ts + timedelta(minutes=1))
        engine.apply_policy(BudgetPolicy(policy_id="cpu", tenant_id="acme", scope="tenant", scope_id="acme",
                                         unit="vcpu_hours", amount=Decimal(amount), created_at=ts - timedelta(days=40)))
        for update in updates:
            engine.apply_spend(update)
        engine.decide()
        got = {d.priority: d.action for _, (_, d) in engine._published.items() if d.scope_id == "acme" and d.priority}
        return engine.budgets["cpu"].spent, got

    spent, over = decide("0.02")
    assert spent == Decimal("75.6") / 3600
    assert over["low"] == over["batch"] == "deny" and over["critical"] == "allow"  # the policy's default actions
    spent, under = decide("100")
    assert spent == Decimal("75.6") / 3600 and "deny" not in under.values()  # paced (this rate would overrun), not denied


# -------------------------------------------------------------------- crash
class Member(StreamWorker):
    """A worker that records what it owns (its consumer is busy in its own thread)."""

    owned: set[tuple[str, int]] = set()

    def _on_assign(self, consumer, partitions):
        super()._on_assign(consumer, partitions)
        self.owned = {(tp.topic, tp.partition) for tp in partitions}


def test_two_workers_count_each_tenants_token_and_gpu_spend_in_one_place(kafka_bootstrap):
    """Two workers in one group: a tenant's usage and its GPU process rows (keyed by tenant, same partition
    count, range assignment) reach the same worker, so the tenant's spend carries both."""
    settings, rng = fresh_settings(kafka_bootstrap), random.Random(8)
    group = f"streams-{uuid.uuid4().hex[:6]}"
    workers = [Member(settings, group_id=group, checkpoint_interval=0.5, instance_id=f"w{i}") for i in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for thread in threads:
        thread.start()
    while [len(w.owned) for w in workers] != [18, 18]:  # both own 6 usage + 6 gpu + 6 compute partitions before data flows
        time.sleep(0.1)
    assert all({p for t, p in w.owned if "usage" in t} == {p for t, p in w.owned if "gpu" in t}
               == {p for t, p in w.owned if "compute" in t} for w in workers)

    tenants = [f"tenant{i}" for i in range(8)]
    events = [usage_record(rng, tenant=t, cost_usd="0.5", kind="tool_call", tool="search", model="") for t in tenants for _ in range(3)]
    produce(settings, "usage", [(e["tenant_id"].encode(), json.dumps(e).encode()) for e in events])
    gpu = [build(GpuSample, sample_id=new_id(), ts=NOW - timedelta(minutes=1), node="n1", level="process", gpu_index=0,
                 gpu_uuid="GPU-1", gpu_name="NVIDIA H100 80GB HBM3", interval_ms=3_600_000, pid=100 + i, tenant_id=t,
                 session_id="s1", attributed=True, device_processes=len(tenants)) for i, t in enumerate(tenants)]
    produce(settings, "gpu", [(g.key.encode(), g.to_json()) for g in gpu])
    while sum(w.stats["priced"] for w in workers) < len(events) or sum(w.stats["gpu_samples"] for w in workers) < len(gpu):
        time.sleep(0.1)
    stop.set()  # each worker publishes its spend at the checkpoint on the way out
    for thread in threads:
        thread.join()

    gpu_share = Decimal("2.49") / len(tenants)  # an H100 hour ($2.49) shared by 8 processes
    latest = {}
    for raw in read_topic(settings, "spend"):
        update = decode(SpendUpdate, raw)
        if update.scope == "tenant":
            latest[update.tenant_id] = update
    assert {t: (u.period_cost_usd, u.gpu_cost_usd) for t, u in latest.items()} == {
        t: (Decimal("1.5") + gpu_share, gpu_share) for t in tenants}


def test_a_tenant_moved_to_a_joining_worker_is_counted_once_and_continues_from_the_changelog(kafka_bootstrap):
    """Worker w0 alone prices every tenant and ages its sessions out to its store; w1 joins the group (a rebalance:
    w0 checkpoints and drops the tenants it loses, w1 rebuilds its store from spend-state); everyone spends again.
    Each session's and tenant's last published total equals the plain sum of its priced costs over both phases
    (ground truth: the priced topic): no scope counted twice, none restarted from zero."""
    settings, rng = fresh_settings(kafka_bootstrap), random.Random(12)
    group = f"streams-{uuid.uuid4().hex[:6]}"
    # both made before anything is published: w1 must read the changelog when it is assigned, not when it was made

    class Evicting(Member):  # every checkpoint as if the sessions had been idle for two hours
        def checkpoint(self, commit: str = "async") -> None:
            super().checkpoint(commit)
            self.stats["evicted"] += self.spend.evict_idle(self.stream_now + timedelta(hours=2), timedelta(hours=1))

    def batch() -> list:
        return [(e["tenant_id"].encode(), json.dumps(e).encode()) for e in
                (usage_record(rng, tenant=f"tenant{i % 8}", cost_usd="0.01", session_id=f"s{i % 12}") for i in range(240))]

    stop, threads = threading.Event(), []
    workers = [Evicting(settings, group_id=group, checkpoint_interval=0.5, instance_id=f"w{i}") for i in range(2)]

    def start(i: int) -> None:
        threads.append(threading.Thread(target=workers[i].run, args=(stop,)))
        threads[-1].start()

    def wait(condition) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline, [(w.stats, len(w.owned)) for w in workers]
            time.sleep(0.1)

    try:
        produce(settings, "usage", batch())
        start(0)
        wait(lambda: workers[0].stats["priced"] == 240 and workers[0].stats["evicted"] > 20)
        start(1)
        wait(lambda: [len(w.owned) for w in workers] == [18, 18])  # each 6 usage + 6 gpu + 6 compute partitions
        produce(settings, "usage", batch())
        wait(lambda: sum(w.stats["priced"] for w in workers) == 480)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert workers[1].stats["priced"] > 0  # the move happened: w1 priced some tenants' second phase
    truth: dict[tuple, Decimal] = defaultdict(Decimal)
    for raw in read_topic(settings, "priced"):
        p = priced_record(raw)
        for scope, sid in scope_ids(p["tenant_id"], p["team"], p["project"], p["agent_id"], p["session_id"]).items():
            if scope in ("tenant", "session"):
                truth[(scope, sid)] += Decimal(p["cost_usd"])
    latest = {}
    for raw in read_topic(settings, "spend"):  # a tenant's updates share a partition: the last is the newest
        update = decode(SpendUpdate, raw)
        if update.scope in ("tenant", "session"):
            latest[(update.scope, update.scope_id)] = update.period_cost_usd
    assert len(truth) > 50 and latest == truth


def test_a_sample_only_tenant_that_moves_away_and_back_is_not_restored_from_a_stale_copy(kafka_bootstrap):
    """Tenants charged only by GPU process rows and CPU samples (the tenant "unattributed", a GPU-only tenant): w0
    counts them alone, w1 joins and takes some of them over (continuing from the changelog), then w1 leaves and w0
    gets them back. w0 must continue from the changelog (w1's totals), not from the copy it kept in memory when the
    tenant left it: that copy misses w1's share and would overwrite the true total (an under-count a budget cannot
    see). Each tenant's last spend update, and a fresh restore of the changelog, equal the plain sum of its samples."""
    from meterline.schemas.events import ComputeSample
    from meterline.streams.pricing import load_catalog
    from meterline.streams.codec import to_pico
    from meterline.streams.state_store import StateStore
    from meterline.streams.worker import restore_spend

    settings, catalog, phase = fresh_settings(kafka_bootstrap), load_catalog(), [0]
    group = f"streams-{uuid.uuid4().hex[:6]}"
    owners = ["", *(f"solo{i}" for i in range(11))]  # "" is the tenant "unattributed"
    truth: dict[str, Decimal] = defaultdict(Decimal)

    def samples() -> None:
        phase[0] += 1
        ts = NOW - timedelta(minutes=10 - phase[0])
        gpu = [build(GpuSample, sample_id=new_id(), ts=ts, node="n1", level="process", gpu_index=0, gpu_uuid="GPU-1",
                     gpu_name="NVIDIA H100 80GB HBM3", interval_ms=60_000 * phase[0], pid=100 + i, tenant_id=t,
                     session_id="s1" if t else "", attributed=bool(t), device_processes=1) for i, t in enumerate(owners)]
        cpu = [build(ComputeSample, sample_id=new_id(), ts=ts, node="n1", node_class="n2", level="process", pid=100 + i,
                     interval_ms=10_000, cpu_user_seconds=Decimal(36 * phase[0]), memory_bytes=1 << 30,
                     memory_byte_seconds=Decimal(10 << 30), tenant_id=t, session_id="s1" if t else "", attributed=bool(t))
               for i, t in enumerate(owners)]
        for g, c in zip(gpu, cpu):
            truth[g.key] += catalog.gpu_sample_cost(g)[1] + sum(catalog.compute_sample_cost(c))
        produce(settings, "gpu", [(g.key.encode(), g.to_json()) for g in gpu])
        produce(settings, "compute", [(c.key.encode(), c.to_json()) for c in cpu])

    def counted() -> int:
        return sum(w.stats["gpu_samples"] + w.stats["compute_samples"] for w in workers)

    def wait(condition) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline, [(w.stats, len(w.owned)) for w in workers]
            time.sleep(0.1)

    stops = [threading.Event(), threading.Event()]
    workers = [Member(settings, group_id=group, checkpoint_interval=0.5, instance_id=f"w{i}",  # a static member's
                      consumer_overrides={"session.timeout.ms": 6000}) for i in range(2)]  # leave: 6 s, not 45
    threads = [threading.Thread(target=w.run, args=(s,)) for w, s in zip(workers, stops)]
    try:
        samples()
        threads[0].start()
        wait(lambda: counted() == 2 * len(owners))
        threads[1].start()
        wait(lambda: [len(w.owned) for w in workers] == [18, 18])  # w1 took half the partitions
        samples()
        wait(lambda: counted() == 4 * len(owners))
        moved = workers[1].stats["gpu_samples"]
        stops[1].set()  # w1 leaves: w0 gets every partition back
        threads[1].join()
        wait(lambda: len(workers[0].owned) == 36)
        samples()
        wait(lambda: counted() == 6 * len(owners))
    finally:
        for stop in stops:
            stop.set()
        for thread in threads:
            if thread.ident is not None:  # started
                thread.join()
    assert 0 < moved < len(owners)  # some tenants went to w1 and came back, some stayed
    latest = {}
    for raw in read_topic(settings, "spend"):  # a tenant's updates share a partition: the last is the newest
        update = decode(SpendUpdate, raw)
        if update.scope == "tenant":
            latest[update.tenant_id] = update.period_cost_usd
    assert latest == truth
    store = StateStore()  # what the next assignment restores
    try:
        restore_spend(settings, store)
        restored = {key[0]: store.get(key)[1] for key in store.keys() if key[1] == "tenant"}
    finally:
        store.close()
    assert restored == {tenant: to_pico(total) for tenant, total in truth.items()}


def test_a_worker_that_stalled_past_its_poll_interval_does_not_overwrite_the_new_owners_totals(kafka_bootstrap):
    """w0 stalls inside a batch (its tenants' new spend unpublished) until the group moves its partitions to w1,
    which replays that input from the committed offsets and counts more. When w0 wakes it must not publish its
    copy: the partitions are w1's, and w0's totals, short of w1's share, would be the changelog's newest record
    for those scopes (the under-count a restore continues). Each tenant's last spend update, and a fresh restore,
    equal the sum of its priced costs."""
    from meterline.streams.state_store import StateStore
    from meterline.streams.worker import restore_spend

    settings, rng = fresh_settings(kafka_bootstrap), random.Random(21)
    group = f"streams-{uuid.uuid4().hex[:6]}"
    release, stalled = threading.Event(), threading.Event()

    class Stalling(Member):
        stall_after = None  # stall once, after the batch that brings `priced` to this

        def process(self, msgs):
            super().process(msgs)
            if self.stall_after is not None and self.stats["priced"] >= self.stall_after:
                self.stall_after = None
                stalled.set()
                release.wait(120)

        def _on_revoke(self, consumer, partitions, commit="sync"):
            super()._on_revoke(consumer, partitions, commit)
            self.stats["lost"] += commit == "none"

    def events(tenants, n) -> list:
        return [(e["tenant_id"].encode(), json.dumps(e).encode()) for e in
                (usage_record(rng, tenant=t, cost_usd="0.25", kind="tool_call", tool="search", model="") for t in tenants
                 for _ in range(n))]

    def wait(condition) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline, [(w.stats, len(w.owned)) for w in workers]
            time.sleep(0.1)

    def last_tenant_totals() -> dict:
        latest = {}
        for raw in read_topic(settings, "spend"):  # a tenant's updates share a partition: the last is the newest
            update = decode(SpendUpdate, raw)
            if update.scope == "tenant":
                latest[update.tenant_id] = update.period_cost_usd
        return latest

    overrides = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "max.poll.interval.ms": 7000}
    workers = [Stalling(settings, group_id=group, checkpoint_interval=0.5, consumer_overrides=overrides) for _ in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    tenants = [f"tenant{i}" for i in range(12)]
    try:
        for thread in threads:
            thread.start()
        wait(lambda: [len(w.owned) for w in workers] == [18, 18])
        produce(settings, "usage", events(tenants, 2))
        wait(lambda: sum(w.stats["priced"] for w in workers) == 24)
        mine = sorted(workers[0].tenant_partition)  # w0's tenants
        assert mine and len(mine) < len(tenants)
        wait(lambda: all(last_tenant_totals().get(t) == Decimal("0.5") for t in tenants))  # published
        workers[0].stall_after = workers[0].stats["priced"] + 3 * len(mine)
        produce(settings, "usage", events(mine, 3))
        wait(stalled.is_set)
        wait(lambda: len(workers[1].owned) == 36)  # w0 is out of the group: w1 replays w0's uncommitted input
        produce(settings, "usage", events(mine, 1))
        wait(lambda: all(last_tenant_totals().get(t) == Decimal("1.5") for t in mine))  # w1 published 2 + 3 + 1
        release.set()  # w0 wakes with its copy of 2 + 3
        wait(lambda: workers[0].stats["lost"] >= 1)
    finally:
        release.set()
        stop.set()
        for thread in threads:
            if thread.ident is not None:
                thread.join()
    truth: dict[str, Decimal] = defaultdict(Decimal)
    for raw in {priced_record(r)["event_id"]: priced_record(r) for r in read_topic(settings, "priced")}.values():
        truth[raw["tenant_id"]] += Decimal(raw["cost_usd"])
    assert last_tenant_totals() == truth
    store = StateStore()
    try:
        restore_spend(settings, store)
        restored = {key[0]: store.get(key)[1] for key in store.keys() if key[1] == "tenant"}
    finally:
        store.close()
    assert restored == {t: int(total.scaleb(12)) for t, total in truth.items()}


def _fast_records(n: int, rng: random.Random) -> list[tuple[bytes, bytes, str, str]]:
    ts = (NOW - timedelta(minutes=5)).isoformat()
    out = []
    for i in range(n):
        tenant, eid = f"tenant{i % 5}", new_id()
        raw = (f'{{"event_id":"{eid}","ts":"{ts}","tenant_id":"{tenant}","agent_id":"a{i % 7}","session_id":"s{i % 500}",'
               f'"kind":"llm_call","provider":"openai","model":"gpt-4o","input_tokens":{1000 + i % 97},"output_tokens":{i % 300},'
               f'"cache_read_tokens":{i % 50}}}').encode()
        out.append((tenant.encode(), raw, eid, tenant))
    return out


def _priced_count(settings: Settings, consumer: Consumer) -> int:
    return sum(partition_ends(consumer, settings.topic("priced")).values())  # retried while a leader moves


def test_sigkill_mid_stream_loses_nothing_and_ledger_dedupe_is_exact(kafka_bootstrap, tmp_path):
    settings, total = fresh_settings(kafka_bootstrap), 60_000
    records = _fast_records(total, random.Random(5))
    chunks = [records[:10_000], records[10_000:20_000], records[20_000:]]
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": kafka_bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(tmp_path)}
    cmd = [sys.executable, "-c", "from meterline.cli import main; main()", "streams", "--instance-id", "w1",
           "--checkpoint-interval", "0.3", "--json"]
    worker = subprocess.Popen([*cmd, "--exit-when-idle", "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    probe = Consumer(settings.kafka_config(**{"group.id": "probe"}))
    produce(settings, "usage", [(k, v) for k, v, _, _ in chunks[0]])
    while _priced_count(settings, probe) == 0:  # the worker is up and pricing
        assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    produce(settings, "usage", [(k, v) for k, v, _, _ in chunks[1]])
    worker.send_signal(signal.SIGKILL)  # mid-stream: input is still arriving
    worker.wait()
    at_kill = _priced_count(settings, probe)
    probe.close()
    produce(settings, "usage", [(k, v) for k, v, _, _ in chunks[2]])
    assert 0 < at_kill < total
    restarted = subprocess.run([*cmd, "--until-caught-up"], env=env, capture_output=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]

    priced = [priced_record(raw) for raw in read_topic(settings, "priced")]
    assert {p["event_id"] for p in priced} == {eid for _, _, eid, _ in records}  # every event at least once
    by_id = {p["event_id"]: p for p in priced}  # the ledger's dedupe by event_id
    ledger: dict[str, Decimal] = defaultdict(Decimal)
    for p in by_id.values():
        ledger[p["tenant_id"]] += Decimal(p["cost_usd"])
    from meterline.streams.pricing import load_catalog

    catalog, truth = load_catalog(), defaultdict(Decimal)
    for _, raw, _, tenant in records:
        truth[tenant] += catalog.price_usage(decode(UsageEvent, raw)).cost_usd
    assert ledger == truth  # exact to the last digit
    spend = {}
    for raw in read_topic(settings, "spend"):
        u = json.loads(raw)
        if u["scope"] == "tenant":
            spend[u["tenant_id"]] = Decimal(u["period_cost_usd"])
    assert all(spend[t] >= truth[t] for t in truth)  # real-time totals err toward over, never under
