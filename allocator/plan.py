"""`meterline plan gpu`: how many GPUs (and which MIG layout) each pool needs, and what that costs.

Demand is the ledger's busy GPU-seconds (gpu_samples level='process') per pool, tenant, session and minute.
A pool is a GPU model on a node class (the node name without its trailing number). Each session's busy time
in a minute is one unit of work of that length (cut into pieces of at most one GPU-minute, so a session on
two GPUs is two pieces), arriving at the minute's start with the session's priority (`normal` without
events). The sizing is the simulator's capacity model (allocator/strategies.py: a fixed on-demand pool,
critical first, no preemption), with two constraints:

- utilisation: the busiest `sizing_ms` window (15 min) runs at most at the target utilisation
  (strategies.plans' static size);
- wait: the top class's p95 wait is within the target, found by search (the smallest pool that meets it:
  doubling, then bisection; more GPUs never make a non-preemptive priority queue wait longer here).

The plan is the larger of the two. Its spot share is the GPUs the pool needs beyond what its interactive
work (every class but batch) needs alone: those serve batch only, which can restart from a checkpoint.
Money is exact: GPUs x hours x $/hour, on demand vs with that share on spot (allocator/capacity.toml).

MIG work (process rows with a MIG profile) is sized apart: per profile, the peak minute's busy instances
at the target utilisation, rounded up; GPUs = slices / slices per GPU, rounded up (NVIDIA's placement
rules may need one more GPU for some mixes). Queueing is simulated: the ledger records no queue.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

from . import strategies as st

MINUTE_MS = 60_000
HOURS_30_DAYS = 720
MAX_GPUS = 100_000


@dataclass(frozen=True)
class Demand:
    """One session's busy time in one minute of one pool (a row of sql/queries/plan_gpu_demand.sql)."""

    pool: str  # "<node class>/<GPU model>"
    gpu_name: str
    tenant: str
    session: str
    priority: str
    minute_ms: int  # from the window's start
    gpu_ms: int  # whole-GPU ms; for MIG, slice-instance ms
    mig_profile: str = ""
    mig_slices: int = 0
    mig_total_slices: int = 0


@dataclass
class PoolPlan:
    pool: str
    gpu_name: str
    horizon_ms: int
    tenants: dict[str, Decimal] = field(default_factory=dict)  # busy GPU-hours per tenant
    gpus_for_util: int = 0
    gpus_for_wait: int = 0
    interactive_gpus: int = 0
    p95_wait_s: float = 0.0
    utilisation_pct: float = 0.0
    mig: dict[str, int] = field(default_factory=dict)  # profile -> instances
    mig_gpus: int = 0

    @property
    def gpus(self) -> int:
        return max(self.gpus_for_util, self.gpus_for_wait) + self.mig_gpus

    @property
    def spot_gpus(self) -> int:
        return max(self.gpus_for_util, self.gpus_for_wait) - self.interactive_gpus


# ---- demand -> a trace ----------------------------------------------------------------------------


def grow(demand: list[Demand], factor: Fraction) -> list[Demand]:
    """What-if: `factor` times as many units of work (not longer ones). Unit i becomes
    floor((i+1)f) - floor(if) copies, so the count is exactly floor(n f) and the shape is kept."""
    out = []
    for i, d in enumerate(demand):
        out += [d] * (math.floor((i + 1) * factor) - math.floor(i * factor))
    return out


def trace_of(demand: list[Demand], horizon_ms: int, interactive_only: bool = False) -> st.Trace:
    """Whole-GPU work as the simulator's requests: pieces of at most a GPU-minute each."""
    requests = []
    for n, d in enumerate(demand):
        if d.mig_profile or (interactive_only and d.priority == "batch"):
            continue
        left = d.gpu_ms
        while left > 0:
            piece = min(left, MINUTE_MS)
            requests.append(st.Request(d.minute_ms, f"{d.tenant}/{d.session}#{n}", d.priority, piece))
            left -= piece
    requests.sort(key=lambda r: (r.t, st.RANK[r.priority], r.agent))
    return st.Trace("plan", horizon_ms, requests, [])


def p95(values: list[int]) -> int:
    """Nearest-rank 95th percentile (0 for none)."""
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1] if ordered else 0


# ---- sizing -----------------------------------------------------------------------------------------


def run_pool(trace: st.Trace, gpus: int, inst: st.Instance, knobs: st.Knobs) -> st.Outcome:
    return st.Sim(st.Plan("plan", gpus, by_priority=True), trace, inst, knobs).run()


def gpus_for_util(trace: st.Trace, knobs: st.Knobs) -> int:
    """strategies.plans' static size: the busiest sizing window at the target utilisation."""
    if not trace.requests:
        return 0
    cap = round(knobs.sizing_ms * knobs.target_util)
    return st.ceil_div(max(st.demand_profile(trace, knobs.sizing_ms)["all"]), cap)


def gpus_for_wait(trace: st.Trace, inst: st.Instance, knobs: st.Knobs, p95_wait_ms: int) -> tuple[int, int]:
    """(the smallest pool whose top class waits at most p95_wait_ms at the 95th percentile, that wait)."""
    if not trace.requests:
        return 0, 0

    def wait(n: int) -> int:
        return p95(run_pool(trace, n, inst, knobs).top_waits)

    busy = sum(r.service for r in trace.requests)
    lo = max(1, st.ceil_div(busy, trace.horizon))  # fewer cannot even do the work in the window
    hi = lo
    while wait(hi) > p95_wait_ms:
        lo, hi = hi + 1, hi * 2
        if hi > MAX_GPUS:
            raise ValueError(f"no pool up to {MAX_GPUS} GPUs meets a p95 wait of {p95_wait_ms} ms")
    while lo < hi:  # wait(hi) meets the target; find the smallest that does
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if wait(mid) <= p95_wait_ms else (mid + 1, hi)
    return hi, wait(hi)


def mig_layout(demand: list[Demand], target_util: float) -> tuple[dict[str, int], int]:
    """({profile: instances}, GPUs): per profile the peak minute's busy instances at the target utilisation."""
    busy: dict[tuple[str, int], int] = defaultdict(int)
    shape: dict[str, tuple[int, int]] = {}
    for d in demand:
        if d.mig_profile:
            busy[(d.mig_profile, d.minute_ms)] += d.gpu_ms
            shape[d.mig_profile] = (d.mig_slices, d.mig_total_slices)
    peak: dict[str, int] = defaultdict(int)
    for (profile, _), ms in busy.items():
        peak[profile] = max(peak[profile], ms)
    instances = {p: math.ceil(ms / (MINUTE_MS * target_util)) for p, ms in sorted(peak.items())}
    slices = sum(n * shape[p][0] for p, n in instances.items())
    per_gpu = max((t for _, t in shape.values()), default=0)
    return instances, (st.ceil_div(slices, per_gpu) if per_gpu else 0)


def plan_pool(demand: list[Demand], horizon_ms: int, inst: st.Instance, knobs: st.Knobs, p95_wait_ms: int) -> PoolPlan:
    first = demand[0]
    plan = PoolPlan(first.pool, first.gpu_name, horizon_ms)
    tenants: dict[str, int] = defaultdict(int)
    for d in demand:
        whole = d.gpu_ms * d.mig_slices // d.mig_total_slices if d.mig_profile and d.mig_total_slices else d.gpu_ms
        tenants[d.tenant] += whole
    plan.tenants = {t: Decimal(ms) / st.MS_PER_HOUR for t, ms in sorted(tenants.items())}
    trace = trace_of(demand, horizon_ms)
    plan.gpus_for_util = gpus_for_util(trace, knobs)
    plan.gpus_for_wait = gpus_for_wait(trace, inst, knobs, p95_wait_ms)[0]
    inter = trace_of(demand, horizon_ms, interactive_only=True)
    plan.interactive_gpus = max(gpus_for_util(inter, knobs), gpus_for_wait(inter, inst, knobs, p95_wait_ms)[0])
    whole = max(plan.gpus_for_util, plan.gpus_for_wait)
    if whole:
        out = run_pool(trace, whole, inst, knobs)
        plan.p95_wait_s, plan.utilisation_pct = p95(out.top_waits) / 1000, 100.0 * out.busy_ms / (whole * out.end)
    plan.mig, plan.mig_gpus = mig_layout(demand, knobs.target_util)
    return plan


def cost(gpus: int, spot_gpus: int, hours: Decimal, inst: st.Instance) -> tuple[Decimal, Decimal]:
    """(all on demand, with `spot_gpus` of them on spot) for `hours`, exact to 12 places."""
    on_demand = gpus * hours * inst.on_demand_usd_hour
    mixed = (gpus - spot_gpus) * hours * inst.on_demand_usd_hour + spot_gpus * hours * inst.spot_usd_hour
    return tuple(v.quantize(st.QUANTUM, ROUND_HALF_EVEN) for v in (on_demand, mixed))


def instance_for(gpu_name: str) -> st.Instance:
    """On-demand $/hour by the catalog's name match (`NVIDIA H100 80GB HBM3` is h100), spot from capacity.toml."""
    import tomllib

    from meterline.streams.pricing import load_catalog

    on_demand = load_catalog().gpu_hourly(gpu_name)
    if on_demand is None:
        raise ValueError(f"no on-demand $/hour for GPU {gpu_name!r}: add it under [gpus] of the price catalog (METERLINE_CATALOG, default streams/catalog.toml)")
    known = tomllib.loads(st.CAPACITY_FILE.read_text()).get("instances", {})
    name = gpu_name.lower()
    key = max((k for k in known if k in name), key=len, default=name)  # the longest match: gh200 before h200
    return st.load_instance(key, on_demand=on_demand)


# ---- the ledger and output ----------------------------------------------------------------------------


def ledger_demand(ledger: Any, since: datetime, until: datetime) -> list[Demand]:
    from meterline.app.report import load_query

    rows = ledger.query(load_query("plan_gpu_demand"), {"since": since, "until": until}).rows
    out = []
    for node_class, gpu_name, tenant, session, priority, profile, slices, total, minute, seconds in rows:
        ms = int(Decimal(seconds) * 1000)
        if profile and slices:  # the row charges slices/total of the GPU; the instance was busy that long
            ms = ms * total // slices
        if ms > 0:
            out.append(Demand(f"{node_class}/{gpu_name}", gpu_name, tenant, session or "unattributed", priority or "normal",
                              max(0, int((minute - since).total_seconds() * 1000)), ms, profile, slices, total))
    return out


def plan_all(demand: list[Demand], horizon_ms: int, knobs: st.Knobs, p95_wait_ms: int, instances: Any = instance_for
             ) -> list[tuple[PoolPlan, st.Instance]]:
    pools: dict[str, list[Demand]] = defaultdict(list)
    for d in demand:
        pools[d.pool].append(d)
    out = []
    for name in sorted(pools):
        inst = instances(pools[name][0].gpu_name)
        out.append((plan_pool(pools[name], horizon_ms, inst, knobs, p95_wait_ms), inst))
    return out


def to_json(plans: list[tuple[PoolPlan, st.Instance]], growth: Fraction, p95_wait_ms: int, knobs: st.Knobs) -> dict[str, Any]:
    def money(v: Decimal) -> str:
        return format(v.normalize(), "f")

    pools = []
    for p, inst in plans:
        window = Decimal(p.horizon_ms) / st.MS_PER_HOUR
        od, mixed = cost(p.gpus, p.spot_gpus, window, inst)
        od30, mixed30 = cost(p.gpus, p.spot_gpus, Decimal(HOURS_30_DAYS), inst)
        pools.append({"pool": p.pool, "gpu": inst.gpu, "gpus": p.gpus, "gpus_for_utilisation": p.gpus_for_util,
                      "gpus_for_wait": p.gpus_for_wait, "spot_gpus": p.spot_gpus, "mig_gpus": p.mig_gpus, "mig_layout": p.mig,
                      "p95_wait_s": p.p95_wait_s, "utilisation_pct": round(p.utilisation_pct, 1),
                      "busy_gpu_hours": {t: money(h.quantize(st.QUANTUM)) for t, h in p.tenants.items()},
                      "on_demand_usd_hour": money(inst.on_demand_usd_hour), "spot_usd_hour": money(inst.spot_usd_hour),
                      "cost_window_on_demand_usd": money(od), "cost_window_with_spot_usd": money(mixed),
                      "cost_30d_on_demand_usd": money(od30), "cost_30d_with_spot_usd": money(mixed30)})
    return {"growth": str(growth), "target_utilisation": knobs.target_util, "target_p95_wait_s": p95_wait_ms / 1000,
            "pools": pools}


def render_table(doc: dict[str, Any]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"GPU plan · demand x{doc['growth']} · target utilisation {doc['target_utilisation']:g}, "
                             f"p95 wait of the top class ≤ {doc['target_p95_wait_s']:g} s"), header_style="bold")
    for name in ("pool", "GPUs", "for util", "for wait", "on spot", "MIG layout", "p95 wait s", "util %",
                 "30 d on demand $", "30 d with spot $"):
        table.add_column(Text(name), justify="left" if name in ("pool", "MIG layout") else "right")
    for p in doc["pools"]:
        layout = ", ".join(f"{k} x{n}" for k, n in p["mig_layout"].items()) + (f" ({p['mig_gpus']} GPUs)" if p["mig_gpus"] else "")
        cells = (p["pool"], p["gpus"], p["gpus_for_utilisation"], p["gpus_for_wait"], p["spot_gpus"], layout or "-",
                 f"{p['p95_wait_s']:g}", f"{p['utilisation_pct']:.1f}", f"{Decimal(p['cost_30d_on_demand_usd']):,.2f}",
                 f"{Decimal(p['cost_30d_with_spot_usd']):,.2f}")
        table.add_row(*(Text(str(c)) for c in cells))
    return table
