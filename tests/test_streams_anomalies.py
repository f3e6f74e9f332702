"""Anomaly detectors, driven by stream time only (pure, no Kafka)."""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from meterline.schemas.events import GpuSample, build, new_id
from meterline.streams.anomalies import Detectors, IdleCpus, IdleGpus, RunawaySessions, SpendSpikes, UnpricedModels

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=timezone.utc)
PICO = 10**12
CENT = PICO // 100


def steady(rng: random.Random, minutes: int, tenants=("acme",), agents=4, sessions=12):
    """Usage of a steady workload: every session calls every ~2 s for a few cents, with noise."""
    for second in range(0, minutes * 60, 2):
        for tenant in tenants:
            for s in range(sessions):
                if rng.random() < 0.8:
                    cost = rng.randint(CENT // 2, 2 * CENT)
                    yield SimpleNamespace(usage="reported", tenant_id=tenant, agent_id=f"agent{s % agents}", session_id=f"{tenant}-s{s}",
                                          ts=T0 + timedelta(seconds=second, milliseconds=rng.randint(0, 1999)),
                                          kind="llm_call", model="gpt-4o", tool="", provider="openai",
                                          input_tokens=rng.randint(500, 5000), output_tokens=rng.randint(50, 900)), cost


def run(detectors: Detectors, stream):
    found = []
    for event, cost in stream:
        found += detectors.usage(event, cost, unpriced=False)
        detectors.tick(event.ts)
    return found


def test_steady_workload_raises_nothing():
    assert run(Detectors(), steady(random.Random(7), minutes=30, tenants=("acme", "globex"))) == []


def test_runaway_session_flagged_within_seconds_of_stream_time():
    rng, detectors = random.Random(1), Detectors()
    assert run(detectors, steady(rng, minutes=15)) == []
    start = T0 + timedelta(minutes=15, seconds=5)
    found = []
    for i in range(200):  # a loop: 5 calls a second, 20 cents each
        ts = start + timedelta(milliseconds=200 * i)
        event = SimpleNamespace(usage="reported", tenant_id="acme", agent_id="agent1", session_id="acme-s1", ts=ts, kind="llm_call", model="gpt-4o",
                                tool="", provider="openai", input_tokens=1000 + i, output_tokens=500)
        found += detectors.usage(event, 20 * CENT, unpriced=False)
    runaway = [a for a in found if a.kind == "runaway_session"]
    assert len(runaway) == 1, found
    assert runaway[0].scope == "session" and runaway[0].scope_id == "acme-s1"
    assert runaway[0].ts - start <= timedelta(seconds=10)
    assert runaway[0].severity in ("warning", "critical")
    assert set(runaway[0].evidence) >= {"session_minute_cost_usd", "threshold_usd", "agent_baseline_usd"}
    repeated = [a for a in found if a.kind == "repeated_calls"]
    assert repeated and repeated[0].evidence["identical_calls"].isdigit()


def test_tenant_spike_flagged_within_seconds_and_not_repeated_in_cooldown():
    rng, detectors = random.Random(2), Detectors()
    assert run(detectors, steady(rng, minutes=10)) == []
    start = T0 + timedelta(minutes=10, seconds=1)
    found = []
    for i in range(300):  # ten times the usual rate for 30 s, across many new sessions
        event = SimpleNamespace(usage="reported", tenant_id="acme", agent_id="agent9", session_id=f"burst{i}", ts=start + timedelta(milliseconds=100 * i),
                                kind="llm_call", model="gpt-4o", tool="", provider="openai", input_tokens=800, output_tokens=100)
        found += detectors.usage(event, 10 * CENT, unpriced=False)
    spikes = [a for a in found if a.kind == "spend_spike"]
    assert len(spikes) == 1
    assert spikes[0].ts - start <= timedelta(seconds=10)
    assert spikes[0].scope == "tenant" and spikes[0].tenant_id == "acme"
    assert int(spikes[0].evidence["bucket_seconds"]) == 10


def test_spike_baseline_is_per_tenant():
    spikes = SpendSpikes()
    found = []
    for i in range(600):  # a big tenant spending a lot steadily never flags a small one, nor itself
        ts = T0 + timedelta(seconds=i)
        found += spikes.observe("big", ts, 50 * PICO)
        found += spikes.observe("small", ts, CENT)
    assert found == []


def test_runaway_needs_history_first():
    detector = RunawaySessions()
    found = [a for i in range(100) for a in detector.observe("t", "a", "s", T0 + timedelta(seconds=i), PICO)]
    assert found == []  # no baseline yet: a new agent is not a runaway by definition


def test_unpriced_model_raised_once_per_hour():
    detector = UnpricedModels()
    first = detector.observe("acme", "nobody", "mystery", T0)
    assert [a.kind for a in first] == ["unpriced_model"] and first[0].scope == "model"
    assert detector.observe("acme", "nobody", "mystery", T0 + timedelta(minutes=59)) == []
    assert len(detector.observe("acme", "nobody", "mystery", T0 + timedelta(minutes=61))) == 1


def gpu_row(ts, util, memory, session="s1"):
    return build(GpuSample, sample_id=new_id(), ts=ts, node="n1", level="process", gpu_index=0, gpu_uuid="GPU-1", gpu_name="H100",
                 interval_ms=10_000, pid=42, sm_util_pct=util, process_memory_bytes=memory, tenant_id="acme", session_id=session,
                 attributed=True)


def test_idle_gpu_held_memory_at_zero_utilisation():
    detector = IdleGpus()
    found = []
    for i in range(40):  # 10 s samples: 400 s idle with 20 GiB held
        found += detector.observe(gpu_row(T0 + timedelta(seconds=10 * i), 0, 20 * 2**30), 10 * PICO, PICO // 360)
    assert len(found) == 1
    anomaly = found[0]
    assert anomaly.kind == "idle_gpu" and anomaly.scope == "session" and anomaly.scope_id == "s1"
    assert int(anomaly.evidence["idle_seconds"]) >= 300


def test_busy_or_empty_gpu_is_not_idle():
    detector = IdleGpus()
    found = []
    for i in range(60):
        found += detector.observe(gpu_row(T0 + timedelta(seconds=10 * i), 0 if i % 20 else 80, 20 * 2**30), 0, 0)
        found += detector.observe(gpu_row(T0 + timedelta(seconds=10 * i), 0, 0, session="s2"), 0, 0)
    assert found == []


def test_calls_without_usage_raise_unmetered_calls_per_agent_with_the_fix():
    from meterline.schemas.events import UsageEvent

    def call(agent: str, minutes: int, usage: str = "missing") -> UsageEvent:
        return build(UsageEvent, event_id=new_id(), ts=T0 + timedelta(minutes=minutes), tenant_id="acme", team="t",
                     project="p", agent_id=agent, session_id="s", kind="llm_call", provider="openai", model="gpt-4o",
                     usage=usage)

    detectors = Detectors()
    found = [a for m in range(30) for a in detectors.usage(call("bot", m), 0, False)]
    found += detectors.usage(call("bot", 30, usage="reported"), 0, False)  # metered calls never count
    found += detectors.usage(call("other", 31), 0, False)
    assert [(a.kind, a.scope, a.scope_id) for a in found] == [("unmetered_calls", "agent", "acme/t/p/bot"),
                                                               ("unmetered_calls", "agent", "acme/t/p/other")]
    assert "include_usage" in found[0].message
    again = detectors.usage(call("bot", 61), 0, False)  # an hour later, with what came meanwhile
    assert len(again) == 1 and again[0].evidence["calls_last_period"] == "30"


def test_idle_pods_sharing_a_gpu_are_told_apart():
    """DCGM rows have no pid: two pods on one GPU are two devices' worth of state, one busy, one idle."""
    detector = IdleGpus()
    found = []
    for i in range(40):
        ts = T0 + timedelta(seconds=10 * i)
        for pod, util in (("idle-pod", 0), ("busy-pod", 0 if i % 5 else 90)):
            row = gpu_row(ts, util, 20 * 2**30, session=pod).model_copy(update={"pid": None, "namespace": "ns", "pod": pod})
            found += detector.observe(row, 10 * PICO, PICO // 360)
    assert [a.scope_id for a in found] == ["idle-pod"]


def cpu_row(ts, cpu: str, limit: str | None, cgroup="/kubepods.slice/pod-a/cri-containerd-1.scope", session="s1"):
    from decimal import Decimal

    from meterline.schemas.events import ComputeSample

    return build(ComputeSample, sample_id=new_id(), ts=ts, node="n1", level="cgroup", cgroup=cgroup, interval_ms=10_000,
                 cpu_user_seconds=Decimal(cpu), cpu_limit_cores=None if limit is None else Decimal(limit),
                 memory_bytes=1 << 30, namespace="agents", pod="planner", tenant_id="acme", session_id=session, attributed=True)


def test_idle_cpu_a_container_that_uses_little_of_its_cpu_limit():
    detector = IdleCpus()
    found = []
    for i in range(40):  # 10 s samples of a 2-core limit: 0.5 CPU-seconds each = 2.5 % of 20 core-seconds, for 400 s
        found += detector.observe(cpu_row(T0 + timedelta(seconds=10 * i), "0.5", "2"), PICO // 1000)
    (anomaly,) = found  # once per idle stretch
    assert anomaly.kind == "idle_cpu" and anomaly.scope == "session" and anomaly.scope_id == "s1"
    seconds = int(anomaly.evidence["idle_seconds"])
    assert seconds >= 300 and anomaly.evidence["used_pct"] == "2.50" and anomaly.evidence["cpu_limit_cores"] == "2"
    samples = seconds // 10  # the evidence adds up: what it used against what it reserved, and what that cost
    assert anomaly.evidence["reserved_core_seconds"] == str(20 * samples) and anomaly.evidence["paid_usd"] == f"{samples / 1000:.12f}"
    assert "agents/planner" in anomaly.message


def test_busy_unlimited_or_per_process_cpu_is_not_idle():
    detector = IdleCpus()
    found = []
    for i in range(60):
        ts = T0 + timedelta(seconds=10 * i)
        found += detector.observe(cpu_row(ts, "0.5" if i % 20 else "15", "2"), 0)  # busy every 200 s: the stretch restarts
        found += detector.observe(cpu_row(ts, "0", None, cgroup="/system.slice/cron.service"), 0)  # no limit: nothing reserved
        found += detector.observe(cpu_row(ts, "1.2", "2", cgroup="/batch"), 0)  # 6 %: above the 5 % line
    assert found == []
