"""Idle GPU time is charged by the stated policy, and every report adds up to what the GPUs cost.

A ledger of three devices over two hours: an H100 that two tenants use part of the time, an H100
nobody uses (held by one tenant, then reassigned to another), and an A100 in MIG mode with a used
slice, an idle slice held by its own tenant, and unpartitioned capacity. The expected charges are
computed here tick by tick from the rows that went in, independently of app/gpu_idle.py.
"""
from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import ROUND_DOWN, Decimal

import pytest

from inprocess import cli_on, filled_ledger
from meterline.schemas.events import GpuAllocation, GpuSample, new_id
from meterline.settings import get_settings
from meterline.sql.rows import gpu_sample_row, plain_row, with_offsets
from meterline.streams.pricing import load_catalog

ZERO = Decimal(0)
HOUR0 = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
SINCE, UNTIL = HOUR0.isoformat(), (HOUR0 + timedelta(hours=2)).isoformat()
H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
TICK_S = 600  # one sample per device every 10 minutes: 12 ticks in the two hours


def sample(ts, node, uuid, name, level, **fields) -> GpuSample:
    return GpuSample(sample_id=new_id(), ts=ts, node=node, gpu_index=0, gpu_uuid=uuid, gpu_name=name, level=level,
                     interval_ms=TICK_S * 1000, **fields)


def make_samples() -> list[GpuSample]:
    rows = []
    for k in range(12):
        ts = HOUR0 + timedelta(seconds=TICK_S * k + 30)
        rows.append(sample(ts, "n1", "GPU-shared", H100, "gpu", utilization_pct=50))
        users = [("acme", "a-s1")] * (k % 3 == 0) + [("globex", "g-s1")] * (k % 2 == 0) + [("", "")] * (k == 5)
        for tenant, session in users:  # some ticks two sessions share the device, some nobody runs
            rows.append(sample(ts, "n1", "GPU-shared", H100, "process", pid=100, device_processes=len(users),
                               attributed=bool(tenant), tenant_id=tenant, team="research" if tenant else "",
                               session_id=session))
        rows.append(sample(ts, "n1", "GPU-idle", H100, "gpu", utilization_pct=0))  # never used
        rows.append(sample(ts, "n2", "GPU-mig", A100, "gpu", utilization_pct=30))
        slices = {"MIG-used": 3, "MIG-held": 2}  # 5 of 7 slices partitioned: 2/7 of the device is in no slice
        for mig, n in slices.items():
            rows.append(sample(ts, "n2", "GPU-mig", A100, "mig", mig_uuid=mig, mig_slices=n, mig_total_slices=7))
        rows.append(sample(ts, "n2", "GPU-mig", A100, "process", mig_uuid="MIG-used", mig_slices=3, mig_total_slices=7,
                           pid=7, attributed=True, tenant_id="initech", team="ml", session_id="i-s1"))
    return rows


ALLOCATIONS = [  # GPU-idle: umbrella/ops for the first hour, then (a newer record) globex; one MIG slice: acme
    GpuAllocation(allocation_id="a1", node="n1", gpu_uuid="GPU-idle", tenant_id="umbrella", team="ops", valid_from=HOUR0,
                  created_at=HOUR0),
    GpuAllocation(allocation_id="a2", node="n1", gpu_uuid="GPU-idle", tenant_id="globex", valid_from=HOUR0 + timedelta(hours=1),
                  created_at=HOUR0 + timedelta(hours=1)),
    GpuAllocation(allocation_id="a3", node="n2", gpu_uuid="GPU-mig", mig_uuid="MIG-held", tenant_id="acme",
                  valid_from=HOUR0 - timedelta(days=1), created_at=HOUR0),
]


def holder(s: GpuSample, unit: str) -> str:
    if s.gpu_uuid == "GPU-idle":
        return "umbrella" if s.ts < HOUR0 + timedelta(hours=1) else "globex"
    return "acme" if unit == "MIG-held" else ""


def expected(samples, priced, policy: str) -> dict[str, Decimal]:
    """Tenant -> GPU cost (process + idle), from the rows, tick by tick: the rule as the docs state it."""
    out: dict[str, Decimal] = defaultdict(Decimal)
    unit_cost: dict[tuple, Decimal] = defaultdict(Decimal)  # (hour, node, gpu, unit, sample ts) -> idle cost
    users: dict[tuple, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for s in samples:
        cost = priced[s.sample_id]
        hour = s.ts.replace(minute=0, second=0)
        if s.level == "process":
            out[s.tenant_id or "unattributed"] += cost
            unit_cost[(hour, s.node, s.gpu_uuid, s.mig_uuid, s.ts)] -= cost
            if s.tenant_id:
                users[(hour, s.node, s.gpu_uuid)][s.tenant_id] += cost
        elif s.level == "mig":
            unit_cost[(hour, s.node, s.gpu_uuid, s.mig_uuid, s.ts)] += cost
            unit_cost[(hour, s.node, s.gpu_uuid, "", s.ts)] -= cost
        else:
            unit_cost[(hour, s.node, s.gpu_uuid, "", s.ts)] += cost
    per_unit: dict[tuple, Decimal] = defaultdict(Decimal)  # (hour, node, gpu, unit, holder)
    for (hour, node, gpu, unit, ts), cost in unit_cost.items():
        probe = next(s for s in samples if s.ts == ts and s.gpu_uuid == gpu)
        per_unit[(hour, node, gpu, unit, holder(probe, unit))] += cost
    for (hour, node, gpu, unit, held), cost in per_unit.items():
        shares = users.get((hour, node, gpu))
        if policy == "separate":
            out["idle"] += cost
        elif policy == "proportional" and shares:
            total, parts = sum(shares.values()), {}
            for tenant, w in shares.items():
                parts[tenant] = (cost * w / total).quantize(Decimal("1e-12"), ROUND_DOWN)
            parts[min(shares, key=lambda t: (-shares[t], t))] += cost - sum(parts.values())
            for tenant, part in parts.items():
                out[tenant] += part
        else:
            out[held or "idle"] += cost
    return {k: v for k, v in out.items() if v}


pytestmark = pytest.mark.xdist_group("app_gpu_idle")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    catalog, samples = load_catalog(), make_samples()
    priced = {s.sample_id: catalog.gpu_sample_cost(s) for s in samples}
    tables = {"gpu_samples": [with_offsets(gpu_sample_row(s, *priced[s.sample_id], catalog.version), "gpu", 0, i)
                              for i, s in enumerate(samples)],
              "gpu_allocations": [with_offsets(plain_row(a), "gpu-allocations", 0, i) for i, a in enumerate(ALLOCATIONS)]}
    with filled_ledger(tmp_path_factory.mktemp("gpu-idle"), tables) as settings:
        yield {"settings": settings, "samples": samples, "cost": {k: v[1] for k, v in priced.items()}}


@pytest.fixture
def cli(filled, monkeypatch):
    with cli_on(filled["settings"], monkeypatch) as invoke:
        yield invoke


def report(cli, name: str, *args: str) -> list[dict]:
    return json.loads(cli("report", name, "--since", SINCE, "--until", UNTIL, "-f", "json", *args))["rows"]


@pytest.mark.parametrize("policy", ["owner", "proportional", "separate"])
def test_every_gpu_second_lands_on_a_chargeback_line_by_the_policy(cli, filled, policy):
    devices = sum((Decimal(r["cost_usd"]) for r in report(cli, "gpu", "--gpu-idle", policy)), ZERO)
    lines = report(cli, "chargeback", "--gpu-idle", policy)
    charged = sum((Decimal(r["total_cost_usd"]) for r in lines), ZERO)
    (totals,) = report(cli, "totals", "--gpu-idle", policy)
    assert charged == devices == Decimal(totals["total_cost_usd"])  # to the last digit, idle time in
    assert {r["tenant"]: Decimal(r["total_cost_usd"]) for r in lines} == expected(filled["samples"], filled["cost"], policy)


def test_the_policy_is_shown_and_settings_choose_the_default(cli, monkeypatch):
    assert "idle GPU time: owner" in cli("report", "chargeback", "--since", SINCE, "--until", UNTIL, "--gpu-idle", "owner")
    monkeypatch.setenv("METERLINE_GPU_IDLE_POLICY", "separate")
    get_settings.cache_clear()
    doc = json.loads(cli("report", "chargeback", "--since", SINCE, "--until", UNTIL, "-f", "json"))
    assert doc["gpu_idle"] == "separate" and "idle" in {r["tenant"] for r in doc["rows"]}


def test_a_holder_below_the_tenant_is_charged_on_its_qualified_line(cli, filled):
    teams = {r["team"]: Decimal(r["gpu_idle_cost_usd"]) for r in report(cli, "chargeback", "--by", "team", "--gpu-idle", "owner")}
    first_hour = [s for s in filled["samples"] if s.gpu_uuid == "GPU-idle" and s.ts < HOUR0 + timedelta(hours=1)]
    assert teams["umbrella/ops"] == sum((filled["cost"][s.sample_id] for s in first_hour), ZERO) > 0
    assert "ops" not in teams and "research" not in teams  # never a bare team name


def test_report_gpu_says_who_was_charged_each_devices_unused_time(cli, filled):
    rows = {r["gpu_uuid"]: r for r in report(cli, "gpu", "--gpu-idle", "owner")}
    assert rows["GPU-idle"]["unused_charged_to"] == "globex, umbrella"
    assert Decimal(rows["GPU-idle"]["unused_cost_usd"]) == Decimal(rows["GPU-idle"]["cost_usd"])
    assert Decimal(rows["GPU-idle"]["process_cost_usd"]) == ZERO
    mig = rows["GPU-mig"]  # initech's slice time is its own; the held slice acme's; the rest nobody's
    assert mig["unused_charged_to"] == "acme, idle"
    used = sum((filled["cost"][s.sample_id] for s in filled["samples"] if s.level == "process" and s.gpu_uuid == "GPU-mig"), ZERO)
    assert Decimal(mig["process_cost_usd"]) == used


def test_split_is_exact_and_favours_the_largest_share():
    from meterline.app.gpu_idle import split

    parts = split(Decimal("0.000000000010"), {"b": Decimal(1), "a": Decimal(1), "c": Decimal(1)})
    assert sum(parts.values()) == Decimal("0.000000000010") and parts["a"] == Decimal("0.000000000004")
    assert split(Decimal("1"), {"x": Decimal(3), "y": Decimal(1)}) == {"x": Decimal("0.75"), "y": Decimal("0.25")}


@pytest.mark.parametrize("policy", ["owner", "proportional", "separate"])
def test_focus_carries_the_idle_time_as_allocated_rows_and_adds_up_to_the_devices(cli, filled, tmp_path, policy):
    import csv

    out = tmp_path / "focus.csv"
    cli("report", "focus", "--out", str(out), "--since", SINCE, "--until", UNTIL, "--gpu-idle", policy)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    devices = sum((Decimal(r["cost_usd"]) for r in report(cli, "gpu")), ZERO)
    assert sum((Decimal(r["EffectiveCost"]) for r in rows), ZERO) == devices
    idle = [r for r in rows if r["x_Kind"] == "gpu_idle"]
    assert idle and {r["AllocatedMethodId"] for r in idle} == {policy}
    per_tenant = defaultdict(Decimal)
    for r in rows:
        per_tenant[r["SubAccountId"]] += Decimal(r["EffectiveCost"])
    assert dict(per_tenant) == expected(filled["samples"], filled["cost"], policy)
