"""`meterline plan gpu` (allocator/plan.py) on traces with a known answer."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from fractions import Fraction

import pytest

from inprocess import open_ledger

METERLINE = str(Path(sys.executable).with_name("meterline"))


def meterline(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([METERLINE, *args], capture_output=True, text=True, timeout=300)

from meterline.allocator import plan as pl
from meterline.allocator import strategies as st

H100 = st.Instance("h100", Decimal("2.49"), Decimal("0.996"), 0.0, "test", "2026-01-01")
HOUR, MIN = 3_600_000, 60_000


def minutes(pool: str, n_sessions: int, priority: str, profile: str = "", slices: int = 0) -> list[pl.Demand]:
    """n sessions, each busy the whole of every minute of one hour."""
    return [pl.Demand(pool, "NVIDIA H100", "acme" if s % 2 else "umbrella", f"{priority}-{s}", priority, m * MIN, MIN,
                      profile, slices, 7 if profile else 0)
            for m in range(60) for s in range(n_sessions)]


# Every minute: 3 critical sessions and 1 batch session, each a whole GPU-minute.
KNOWN = minutes("n/H100", 3, "critical") + minutes("n/H100", 1, "batch")


def plan(demand, util=1.0, wait_ms=2_000) -> pl.PoolPlan:
    return pl.plan_pool(demand, HOUR, H100, st.Knobs(target_util=util), wait_ms)


def test_the_known_trace_needs_four_gpus_one_of_them_spot():
    p = plan(KNOWN)
    # 4 GPU-minutes a minute: 3 GPUs would let batch take a GPU freed at a minute's end before critical arrives
    assert (p.gpus_for_util, p.gpus_for_wait, p.interactive_gpus, p.gpus, p.spot_gpus) == (4, 4, 3, 4, 1)
    assert p.p95_wait_s == 0 and p.utilisation_pct == 100.0
    assert p.tenants == {"acme": Decimal(1), "umbrella": Decimal(3)}  # busy GPU-hours per tenant
    assert pl.cost(p.gpus, p.spot_gpus, Decimal(1), H100) == (Decimal("9.96"), Decimal("8.466"))  # 4 x 2.49; 3 x 2.49 + 0.996


def test_critical_alone_is_sized_by_the_wait_and_a_lower_utilisation_target_adds_headroom():
    crit = minutes("n/H100", 3, "critical")
    assert pl.gpus_for_wait(pl.trace_of(crit, HOUR), H100, st.Knobs(), 2_000) == (3, 0)
    assert pl.gpus_for_wait(pl.trace_of(crit, HOUR), H100, st.Knobs(), 120_000)[0] == 3  # 2 GPUs: waits grow each minute
    assert plan(crit, util=0.8).gpus == 4  # 2700 busy GPU-s per 15 min / (900 s x 0.8) = 3.75


def test_what_if_growth_scales_the_units_of_work_and_the_plan():
    assert len(pl.grow(KNOWN, Fraction(3, 2))) == len(KNOWN) * 3 // 2
    p = plan(pl.grow(KNOWN, Fraction(2)))
    assert (p.gpus, p.spot_gpus) == (8, 2)


def test_mig_work_is_sized_per_profile_in_slices():
    mig = minutes("m/A100", 2, "normal", "3g.40gb", 3) + minutes("m/A100", 3, "normal", "1g.10gb", 1)
    assert pl.mig_layout(mig, 1.0) == ({"1g.10gb": 3, "3g.40gb": 2}, 2)  # 9 slices on 7-slice GPUs
    assert pl.mig_layout(mig, 0.8) == ({"1g.10gb": 4, "3g.40gb": 3}, 2)  # 13 slices
    p = plan(mig)
    assert (p.gpus, p.mig_gpus, p.gpus_for_wait) == (2, 2, 0)


@pytest.fixture
def store(tmp_path):
    with open_ledger(tmp_path) as opened:
        yield opened


SINCE = datetime(2026, 1, 5, tzinfo=timezone.utc)


def seed_ledger(client) -> None:
    """The known trace as process rows (6 samples of 10 s per session-minute) on h100-node-1/2, plus events
    giving the critical sessions their priority (batch sessions have none: a batch priority comes from events too)."""
    from meterline.schemas.events import GpuSample, PricedEvent, new_id
    from meterline.sql.rows import contract_row, gpu_sample_row, insert_rows, with_offsets

    rows, events = [], []
    for d in KNOWN:
        for k in range(6):
            s = GpuSample(sample_id=new_id(), ts=SINCE + timedelta(milliseconds=d.minute_ms + k * 10_000),
                          node=f"h100-node-{1 + int(d.session[-1]) % 2}", level="process", gpu_index=0, gpu_uuid="G",
                          gpu_name="NVIDIA H100 80GB HBM3", interval_ms=10_000, pid=1, attributed=True, tenant_id=d.tenant,
                          session_id=d.session)
            rows.append(gpu_sample_row(s, Decimal(10), Decimal("0.01"), "v"))
    for session, tenant in {(d.session, d.tenant) for d in KNOWN}:
        events.append(PricedEvent(event_id=new_id(), ts=SINCE, tenant_id=tenant, session_id=session, kind="llm_call",
                                  provider="selfhosted", model="m", priority=session.split("-")[0], cost_usd=Decimal(0),
                                  list_cost_usd=Decimal(0), cost_source="catalog", catalog_version="v", priced_at=SINCE))
    insert_rows(client, "gpu_samples", [with_offsets(r, "gpu", 0, i) for i, r in enumerate(rows)])
    insert_rows(client, "priced_events", [with_offsets(contract_row(e), "priced", 0, i) for i, e in enumerate(events)])


def test_the_ledger_trace_gives_the_known_plan_and_the_command_prints_it(store, monkeypatch):
    client, direct, settings = store
    seed_ledger(client)
    demand = pl.ledger_demand(direct, SINCE, SINCE + timedelta(hours=1))
    assert {d.pool for d in demand} == {"h100-node/NVIDIA H100 80GB HBM3"} and len(demand) == len(KNOWN)
    [(p, inst)] = pl.plan_all(demand, HOUR, st.Knobs(target_util=1.0), 2_000)
    assert (p.gpus, p.spot_gpus, inst.gpu, inst.on_demand_usd_hour) == (4, 1, "h100", Decimal("2.49"))
    client.close()  # the command opens the store itself, in its own process (chDB keeps one path per process)
    monkeypatch.setenv("METERLINE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("METERLINE_CLICKHOUSE_DSN", settings.dsn)
    args = ["plan", "gpu", "--since", "2026-01-05T00:00", "--until", "2026-01-05T01:00", "--target-util", "1", "--json"]
    result = meterline(args)
    assert result.returncode == 0, result.stderr
    [pool] = json.loads(result.stdout)["pools"]
    assert (pool["gpus"], pool["spot_gpus"], pool["cost_window_on_demand_usd"], pool["cost_window_with_spot_usd"]) == (
        4, 1, "9.96", "8.466")
    assert pool["cost_30d_on_demand_usd"] == "7171.2"  # 4 x 720 h x 2.49
    grown = json.loads(meterline([*args, "--what-if", "2"]).stdout)["pools"][0]
    assert (grown["gpus"], grown["spot_gpus"]) == (8, 2)
