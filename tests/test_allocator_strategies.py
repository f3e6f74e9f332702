"""`meterline simulate strategies`: each strategy on hand-checkable traces, determinism, storage and the report."""
from __future__ import annotations

import gc
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterline.allocator import strategies as st
from meterline.allocator.strategies import Job, Knobs, Plan, Request, Sim, Trace

H100 = st.Instance("h100", Decimal("2.49"), Decimal("0.996"), 0.0, "test", "2026-01-01")
MIN, HOUR = 60_000, 3_600_000
BOOT = Knobs().scale_up_delay_ms


def run(plan: Plan, trace: Trace, inst: st.Instance = H100, rng=None, knobs: Knobs = Knobs()) -> st.Outcome:
    sim = Sim(plan, trace, inst, knobs)
    if rng is not None:
        sim.rng, sim.rate = rng, 1.0
    return sim.run()


class Draws:
    """Stands in for the RNG: interruptions after these many hours, then never."""

    def __init__(self, *hours: float):
        self.hours = list(hours)

    def expovariate(self, _rate: float) -> float:
        return self.hours.pop(0) if self.hours else 1e9


def test_a_constant_load_costs_the_same_static_or_dynamic():
    # every 250 ms a request of 1 s: exactly 4 GPUs busy all the time; at 80 % both keep 5
    day = 2 * HOUR
    trace = Trace("constant", day, [Request(t, "a", "normal", 1000) for t in range(0, day, 250)], [])
    rows = {r["strategy"]: r for r in st.simulate(trace, H100, only=("static", "dynamic"))}
    paid_hours = Decimal(5) * (day + 750) / HOUR  # the last request ends 750 ms after the day
    assert rows["static"]["cost_usd"] == rows["dynamic"]["cost_usd"] == (paid_hours * Decimal("2.49")).quantize(st.QUANTUM)
    assert rows["dynamic"]["savings_vs_static_pct"] == 0.0
    assert rows["static"]["utilisation_pct"] == pytest.approx(80.0, abs=0.01)
    assert rows["static"]["critical_p99_wait_s"] == 0.0  # the top class present (normal) never waits


def test_a_spot_interruption_reruns_exactly_the_work_since_the_last_checkpoint():
    job = Job("train", 0, 60 * MIN, 24 * HOUR, 10 * MIN)
    out = run(Plan("spot", 1, batch_on_spot=True), Trace("one job", 2 * HOUR, [], [job]), rng=Draws(25 / 60))
    assert out.interruptions == 1 and out.fallbacks == 0
    assert out.batch_lost_ms == 5 * MIN  # 25 minutes run, checkpoints at 10 and 20
    spot = sorted((a, b) for a, b, is_spot in out.paid if is_spot)
    assert spot == [(0, BOOT + 25 * MIN), (BOOT + 25 * MIN, 2 * BOOT + 65 * MIN)]  # 40 minutes left after the restart
    assert out.busy_ms == 65 * MIN and out.deadline_misses == 0


def test_spot_falls_back_to_on_demand_when_one_more_interruption_could_miss_the_deadline():
    tight = Job("urgent", 0, 60 * MIN, 2 * BOOT + 70 * MIN - 1, 10 * MIN)
    out = run(Plan("spot", 1, batch_on_spot=True), Trace("tight", 2 * HOUR, [], [tight]), rng=Draws(0.1))
    assert out.fallbacks == 1 and out.interruptions == 0
    assert [(a, b) for a, b, spot in out.paid if not spot and b != 2 * HOUR] == [(0, BOOT + 60 * MIN)]
    assert out.deadline_misses == 0
    loose = Job("loose", 0, 60 * MIN, 2 * BOOT + 70 * MIN, 10 * MIN)  # one interruption is recoverable: spot
    assert run(Plan("spot", 1, batch_on_spot=True), Trace("loose", 2 * HOUR, [], [loose]), rng=Draws(1e9)).fallbacks == 0


def test_priority_queuing_preempts_batch_to_its_checkpoint_and_serves_critical_first():
    trace = Trace("preempt", HOUR, [Request(25 * MIN, "bot", "critical", MIN), Request(25 * MIN, "bot", "low", MIN)],
                  [Job("eval", 0, 30 * MIN, HOUR, 10 * MIN)])
    out = run(Plan("priority", 1, by_priority=True, preempt_batch=True), trace)
    assert out.top_waits == [0]  # the critical request took the batch job's GPU at once
    assert out.batch_lost_ms == 5 * MIN
    # critical 25-26, low 26-27 (it outranks batch), then the job's last 10 minutes: 27-37
    assert out.busy_ms == 25 * MIN + 2 * MIN + 10 * MIN and out.deadline_misses == 0
    fifo = run(Plan("static", 1), trace)  # without priority the request waits for the job
    assert fifo.top_waits == [5 * MIN] and fifo.batch_lost_ms == 0


def test_a_restarted_batch_job_is_not_preempted_again_before_its_next_checkpoint():
    # one GPU; a 30-minute job checkpoints every 10; a critical minute arrives 9 minutes into each run
    trace = Trace("thrash", HOUR, [Request(m * MIN, "bot", "critical", MIN) for m in (9, 19, 29)],
                  [Job("eval", 0, 30 * MIN, HOUR, 10 * MIN)])
    out = run(Plan("priority", 1, by_priority=True, preempt_batch=True), trace)
    # taken at its checkpoints, never in between: 0-10 job, 10-11 critical, 11-21 job, 21-22 critical,
    # 22-32 job (done), 32-33 critical. Preempting at 9, 19 and 29 would lose 9 minutes three times over.
    assert out.batch_lost_ms == 0
    assert out.top_waits == [1 * MIN, 2 * MIN, 3 * MIN]  # the price: critical waits for the checkpoint
    assert out.busy_ms == 33 * MIN and out.deadline_misses == 0


def test_lost_work_stays_under_the_jobs_own_work_however_often_critical_arrives():
    # a critical request every 2 minutes, 1 minute each, for the whole hour: each preemption keeps a checkpoint
    trace = Trace("storm", 2 * HOUR, [Request(m * MIN, "bot", "critical", MIN) for m in range(1, 60, 2)],
                  [Job("eval", 0, 20 * MIN, 2 * HOUR, 10 * MIN)])
    out = run(Plan("priority", 1, by_priority=True, preempt_batch=True), trace)
    assert out.batch_lost_ms < 20 * MIN and out.deadline_misses == 0  # without the rule: 30 preemptions, a minute lost each
    assert out.busy_ms == 20 * MIN + out.batch_lost_ms + 30 * MIN


def test_meterline_keeps_an_idle_gpu_for_critical_and_does_not_scale_for_the_queue():
    # the quiet pool is the one headroom GPU; low work arriving at 10 minutes may not take it, so it
    # waits for the GPU the 10-minute tick launches (ready at 12); the critical request at 11 gets the headroom
    low = [Request(10 * MIN, "coder", "low", 10 * MIN) for _ in range(3)]
    trace = Trace("headroom", HOUR, low + [Request(11 * MIN, "bot", "critical", MIN)], [])
    (plan,) = [p for p in st.plans(trace, Knobs()) if p.name == "meterline"]
    assert (plan.gpus, plan.reserve, plan.count_waiting, plan.batch_on_spot) == (1, 1, False, True)
    out = run(plan, trace)
    assert out.top_waits == [0]
    assert sorted(a for a, _, _ in out.paid)[:2] == [0, 10 * MIN]
    # queued GPU-ms do not buy GPUs, busy ones do: counting the 20 queued minutes would pay for more
    dyn = run(replace(plan, count_waiting=True), trace)
    assert sum(b - a for a, b, _ in out.paid) < sum(b - a for a, b, _ in dyn.paid)


def test_without_requests_the_mix_has_no_pool_and_batch_pays_spot_only():
    trace = Trace("batch only", 2 * HOUR, [], [Job("train", 0, HOUR, 12 * HOUR, 15 * MIN)])
    (mix,) = st.simulate(trace, H100, only=("meterline",))
    assert mix["cost_usd"] == (Decimal(BOOT + HOUR) / HOUR * Decimal("0.996")).quantize(st.QUANTUM)
    assert mix["latency_class"] == "critical" and mix["slo_met_pct"] == 100.0


def test_dynamic_scaling_pays_for_a_spike_and_its_cooldown_but_not_for_the_quiet_hours():
    quiet = [Request(t, "a", "normal", 500) for t in range(0, 6 * HOUR, 10_000)]
    spike = [Request(2 * HOUR + i * 200, "a", "normal", 2_000) for i in range(9000)]  # 10 GPUs' worth for 30 minutes
    trace = Trace("spike", 6 * HOUR, sorted(quiet + spike, key=lambda r: r.t), [])
    rows = {r["strategy"]: r for r in st.simulate(trace, H100, only=("static", "dynamic"))}
    assert rows["dynamic"]["cost_usd"] < rows["static"]["cost_usd"]
    assert rows["static"]["critical_p99_wait_s"] == 0.0  # sized for the peak: 13 GPUs, nobody waits
    assert rows["dynamic"]["critical_p99_wait_s"] > BOOT / 1000  # the scale-up delay shows
    assert rows["dynamic"]["utilisation_pct"] > rows["static"]["utilisation_pct"]


def test_the_builtin_table_is_all_numbers_and_the_same_for_the_same_seed():
    inst = st.load_instance("h100")
    assert inst.on_demand_usd_hour == Decimal("2.49") and inst.spot_usd_hour == Decimal("0.996")  # catalog.toml, 60 % off
    trace = st.builtin_trace(seed=5, days=2)
    rows = st.simulate(trace, inst, Knobs(seed=5))
    assert [r["strategy"] for r in rows] == list(st.STRATEGIES)
    for metric, _ in st.ROWS:
        for r in rows:
            float(st.cell(metric, r[metric]).replace(",", ""))  # every cell a number
    static = rows[0]
    assert static["daily_cost_cv"] == 0.0 and static["savings_vs_static_pct"] == 0.0
    by = {r["strategy"]: r for r in rows}
    mix = by["meterline"]  # what a user wants: critical served like static, cost well below it, batch safe
    assert mix["slo_met_pct"] >= static["slo_met_pct"] - 1 and mix["slo_met_pct"] > by["dynamic"]["slo_met_pct"]
    assert mix["critical_p99_wait_s"] <= mix["slo_s"]
    assert mix["cost_usd"] < by["dynamic"]["cost_usd"] and mix["savings_vs_static_pct"] > 30
    assert mix["deadline_misses"] == 0 and by["priority"]["batch_lost_pct"] < 100
    assert {r["latency_class"] for r in rows} == {"critical"}
    assert all(r["cost_usd"] == sum(st.daily_costs(*_outcome(r, trace, inst), trace.horizon), Decimal(0)) for r in rows[:1])
    again = st.simulate(st.builtin_trace(seed=5, days=2), inst, Knobs(seed=5))
    assert again == rows
    other = st.simulate(st.builtin_trace(seed=6, days=2), inst, Knobs(seed=6))
    assert [r["cost_usd"] for r in other] != [r["cost_usd"] for r in rows]
    doc = json.loads(json.dumps(st.to_json(rows, trace, inst, Knobs(seed=5))))
    assert Decimal(doc["strategies"][0]["cost_usd"]) == static["cost_usd"]  # exact through JSON


def _outcome(row, trace, inst):
    plan = next(p for p in st.plans(trace, Knobs(seed=5)) if p.name == row["strategy"])
    return Sim(plan, trace, inst, Knobs(seed=5)).run(), inst


def test_the_table_shows_user_text_as_text():
    from rich.console import Console

    trace = Trace("[bold red]evil[/]", HOUR, [Request(0, "a", "critical", 100)], [])
    rows = st.simulate(trace, H100)
    console = Console(record=True, width=200)
    console.print(st.render_table(rows, trace.source, H100, Knobs()))
    assert "[bold red]evil[/]" in console.export_text()


@pytest.fixture
def store(tmp_path):
    from meterline.app.store import DirectLedger
    from meterline.settings import Settings
    from meterline.sql import ledger

    gc.collect()
    settings = Settings(data_dir=tmp_path / "data", clickhouse_dsn=f"chdb://{tmp_path / 'ch'}")
    client = ledger.connect(settings)
    ledger.migrate(client)
    yield client, DirectLedger(settings, client)
    client.close()
    gc.collect()


def test_stored_runs_feed_the_strategies_report(store):
    from meterline.app.report import ReportParams, run_report

    client, direct = store
    trace = Trace("t", HOUR, [Request(i * 1000, "a", "critical", 300) for i in range(3600)], [Job("j", 0, 20 * MIN, HOUR, MIN)])
    now = datetime.now(timezone.utc).replace(microsecond=0)
    old = st.simulate(trace, H100, only=("static",))
    st.store(client, old, trace, H100, Knobs(), "old", now - timedelta(hours=1))
    rows = st.simulate(trace, H100)
    st.store(client, rows, trace, H100, Knobs(), "new", now)
    result = run_report(direct, "strategies", ReportParams.parse(since="1d"))
    got = result.dicts()
    assert [r["strategy"] for r in got] == list(st.STRATEGIES) and {r["run_id"] for r in got} == {"new"}
    assert [r["cost_usd"] for r in got] == [r["cost_usd"] for r in rows]  # exact Decimal round trip
    assert got[3]["deadline_misses"] == rows[3]["deadline_misses"]


def test_the_ledger_workload_is_replayed_per_agent_priority_and_batch_session(store):
    from meterline.schemas.events import GpuSample, PricedEvent, new_id
    from meterline.sql.rows import contract_row, gpu_sample_row, insert_rows, with_offsets

    client, direct = store
    since = datetime(2026, 1, 5, tzinfo=timezone.utc)
    events = [PricedEvent(event_id=new_id(), ts=since + timedelta(minutes=i), tenant_id="acme", agent_id="bot", session_id="s1",
                          kind="llm_call", provider="self-hosted", model="m", priority="critical", cost_usd=Decimal(0),
                          list_cost_usd=Decimal(0), cost_source="catalog", catalog_version="v", priced_at=since) for i in range(10)]
    insert_rows(client, "priced_events", [with_offsets(contract_row(e), "priced", 0, i) for i, e in enumerate(events)])

    def sample(session: str, minute: int, agent: str = "") -> dict:
        s = GpuSample(sample_id=new_id(), ts=since + timedelta(minutes=minute), node="n", level="process", gpu_index=0,
                      gpu_uuid="G", gpu_name="H100", interval_ms=10_000, pid=1, attributed=True, tenant_id="acme",
                      agent_id=agent, session_id=session)
        return gpu_sample_row(s, Decimal(10), Decimal("0.01"), "v")

    # "gpu-7" is the GPU collector's own id for a session of agent bot: it counts as bot's (critical) GPU time
    gpu = [sample("s1", 1), sample("s1", 2), sample("gpu-7", 3, agent="bot"), sample("train", 30), sample("train", 31),
           sample("train", 32)]
    insert_rows(client, "gpu_samples", [with_offsets(r, "gpu", 0, i) for i, r in enumerate(gpu)])
    trace = st.ledger_trace(direct, since, since + timedelta(hours=1))
    assert trace.horizon == HOUR and len(trace.requests) == 10
    assert {(r.agent, r.priority, r.service) for r in trace.requests} == {("acme/bot", "critical", 3000)}  # 30 GPU-s / 10 calls
    assert [(j.name, j.t, j.work) for j in trace.jobs] == [("acme/train", 30 * MIN, 30_000)]  # no events: a batch job
    assert sorted(r.t // MIN for r in trace.requests) == list(range(10))  # each in its own minute
    assert st.simulate(trace, H100)[0]["deadline_misses"] == 0


def test_the_command_prints_json_and_refuses_bad_knobs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from meterline.cli import app

    monkeypatch.setenv("METERLINE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("METERLINE_CLICKHOUSE_DSN", f"chdb://{tmp_path / 'ch'}")
    result = CliRunner().invoke(app, ["simulate", "strategies", "--json", "--seed", "2", "--interruptions-per-hour", "0.5"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [s["strategy"] for s in doc["strategies"]] == list(st.STRATEGIES)
    spot = doc["strategies"][3]
    assert spot["interruptions"] > 0 and spot["batch_lost_pct"] > 0 and spot["deadline_misses"] == 0
    bad = CliRunner().invoke(app, ["simulate", "strategies", "--target-util", "2"])
    assert bad.exit_code == 1 and "--target-util" in bad.output
