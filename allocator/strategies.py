"""The seed's strategy table, measured: `meterline simulate strategies`.

A deterministic discrete-event simulation (integer milliseconds, a seeded RNG, no sleeping)
of one workload through five ways of buying GPU capacity:

- static: a fixed on-demand pool sized for the peak minute (at the target utilisation), FIFO;
- dynamic: an autoscaled pool (target utilisation, scale-up delay, cooldown), FIFO;
- priority: a fixed pool sized for the mean, critical first, batch preempted to its last checkpoint,
  but only once it has run a checkpoint interval since it (re)started (so lost work stays under the
  job's own work; critical may wait up to one interval when fresh batch holds every GPU);
- spot: interactive on a pool sized for the interactive peak, batch on spot instances with
  checkpoint/restart, falling back to on-demand when one more interruption could miss the deadline;
- meterline: what meterline recommends, one rule per kind of work:
  * batch never shares the pool: it runs on spot with the spot strategy's on-demand fallback, so it
    costs spot prices and misses no deadline (interruptions only re-run work since a checkpoint);
  * interactive work shares an autoscaled on-demand pool, taken in priority order, whose size each
    minute is what the last minute's busy GPU-ms needed at the target utilisation, plus a headroom
    of R idle GPUs that only the top class may take (R = GPUs the top class's peak needs); a quiet pool
    idles down to R, and to R + 1 while anything waits (none at all without requests);
  * queued work does not add to the autoscaler's demand (dynamic's does): the headroom, not more
    GPUs for the queue, is what keeps critical within its SLO, and lower classes queue a little.
  On the built-in week this keeps critical within the SLO about as often as static, at a bit more
  than half static's cost (BENCHMARKS.md).

The workload is interactive requests (agent, priority, GPU-milliseconds) and batch jobs (work,
deadline, checkpoint interval), built in (`builtin_trace`) or from the ledger (`ledger_trace`).
Money is exact: paid GPU-milliseconds x $/hour / 3.6e6, each day rounded to 12 places, the total
their sum. Metrics are floats.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import tomllib
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

CAPACITY_FILE = Path(__file__).with_name("capacity.toml")
MS_PER_HOUR = 3_600_000
DAY_MS = 86_400_000
QUANTUM = Decimal("1e-12")
RANK = {"critical": 0, "high": 1, "normal": 2, "low": 3, "batch": 4}
STRATEGIES = ("static", "dynamic", "priority", "spot", "meterline")
# Event order at one instant: work ends and GPUs come up before new work looks for them.
FINISH, READY, INTERRUPT, PREEMPTIBLE, ARRIVE, TICK = range(6)


# ---- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One GPU type: on-demand $/hour (streams/catalog.toml), spot $/hour, interruption rate."""

    gpu: str
    on_demand_usd_hour: Decimal
    spot_usd_hour: Decimal
    interruptions_per_hour: float
    source: str
    as_of: str


def load_instance(gpu: str = "h100", path: Path = CAPACITY_FILE, on_demand: Decimal | None = None) -> Instance:
    """The capacity entry for `gpu` (or [default]) priced with the ledger's own on-demand rate."""
    data = tomllib.loads(path.read_text())
    entry = data.get("instances", {}).get(gpu.lower(), data["default"])
    if on_demand is None:
        from meterline.streams.pricing import load_catalog

        on_demand = load_catalog().gpu_hourly(gpu)
        if on_demand is None:
            raise ValueError(f"no on-demand $/hour for GPU {gpu!r}: add it under [gpus] of the price catalog (METERLINE_CATALOG, default streams/catalog.toml)")
    spot = on_demand * (100 - Decimal(entry["spot_discount_pct"])) / 100
    as_of = entry["as_of"]
    return Instance(gpu, on_demand, spot, float(entry["interruptions_per_hour"]), entry["source"],
                    as_of.isoformat() if isinstance(as_of, date) else str(as_of))


@dataclass(frozen=True)
class Request:
    t: int  # arrival, ms from the trace start
    agent: str
    priority: str
    service: int  # GPU-ms


@dataclass(frozen=True)
class Job:
    name: str
    t: int
    work: int  # GPU-ms
    deadline: int  # ms from the trace start
    checkpoint: int  # ms of progress between checkpoints


@dataclass
class Trace:
    source: str
    horizon: int  # ms
    requests: list[Request]
    jobs: list[Job]


@dataclass(frozen=True)
class Knobs:
    target_util: float = 0.8
    control_ms: int = 60_000  # the autoscaler's interval
    sizing_ms: int = 900_000  # fixed pools are sized for the peak of demand averaged over this long
    scale_up_delay_ms: int = 120_000  # launch to ready, for every new instance
    cooldown_ms: int = 300_000  # no scale-down within this long of the last change
    slo_ms: int = 2_000  # the top class's wait objective (top_class: critical where there is any)
    seed: int = 7
    interruptions_per_hour: float | None = None  # overrides the instance's rate


@dataclass(frozen=True)
class Plan:
    """How one strategy buys and orders capacity."""

    name: str
    gpus: int  # fixed pool size, or the autoscaler's floor
    autoscale: bool = False
    max_gpus: int = 0
    by_priority: bool = False
    preempt_batch: bool = False
    batch_on_spot: bool = False
    reserve: int = 0  # idle GPUs only the top class may take (the allocator's critical headroom)
    count_waiting: bool = True  # the autoscaler's demand adds queued GPU-ms to busy GPU-ms


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def top_class(trace: Trace) -> str:
    """The highest priority class among the requests: the one whose waits are the latency rows (and the
    reserve's owner). `critical` unless the workload has none, e.g. a ledger whose critical agents use no GPU."""
    return min((r.priority for r in trace.requests), key=RANK.__getitem__, default="critical")


def demand_profile(trace: Trace, bucket: int) -> dict[str, list[int]]:
    """GPU-ms wanted per bucket: every request in its arrival bucket, every job spread from its arrival;
    "critical" is the top class's (top_class)."""
    n = ceil_div(trace.horizon, bucket) + 1
    out = {"all": [0] * n, "interactive": [0] * n, "critical": [0] * n}
    top = top_class(trace)
    for r in trace.requests:
        i = min(r.t // bucket, n - 1)
        out["all"][i] += r.service
        out["interactive"][i] += r.service
        if r.priority == top:
            out["critical"][i] += r.service
    for j in trace.jobs:
        t, left = j.t, j.work
        while left > 0:
            i = min(t // bucket, n - 1)
            step = min(left, (i + 1) * bucket - t) if i < n - 1 else left
            out["all"][i] += step
            t, left = t + step, left - step
    return out


def plans(trace: Trace, knobs: Knobs) -> list[Plan]:
    cap = round(knobs.sizing_ms * knobs.target_util)  # GPU-ms one GPU should do per sizing window
    prof = demand_profile(trace, knobs.sizing_ms)
    peak = max(1, ceil_div(max(prof["all"]), cap))
    inter = max(1, ceil_div(max(prof["interactive"]), cap))
    critical = max(1, ceil_div(max(prof["critical"]), cap))
    headroom = ceil_div(max(prof["critical"]), cap)  # 0 without requests: then the mix has no pool
    mean = max(1, ceil_div(sum(prof["all"]) * knobs.sizing_ms, trace.horizon * cap))
    return [
        Plan("static", peak),
        Plan("dynamic", 1, autoscale=True, max_gpus=2 * peak),
        Plan("priority", max(mean, critical), by_priority=True, preempt_batch=True),
        Plan("spot", inter, batch_on_spot=True),
        Plan("meterline", headroom, autoscale=True, max_gpus=2 * peak, by_priority=True, batch_on_spot=True, reserve=headroom,
             count_waiting=False),
    ]


# ---- the simulation ---------------------------------------------------------------------------


@dataclass(eq=False)
class Work:
    priority: str
    remaining: int
    enqueued: int
    request: Request | None = None
    job: Job | None = None
    done: int = 0  # checkpointed progress of a job
    waited: bool = False


@dataclass(eq=False)
class Gpu:
    launched: int
    spot: bool = False
    ready: bool = False
    work: Work | None = None
    started: int = 0
    epoch: int = 0  # bumped when its work is taken away, so the old FINISH is ignored
    released: int | None = None
    pooled: bool = False


@dataclass
class Outcome:
    plan: Plan
    paid: list[tuple[int, int, bool]] = field(default_factory=list)  # (from, to, spot) per instance
    busy_ms: int = 0
    top_waits: list[int] = field(default_factory=list)
    batch_work_ms: int = 0
    batch_lost_ms: int = 0
    deadline_misses: int = 0
    end: int = 0
    fallbacks: int = 0
    interruptions: int = 0


class Sim:
    def __init__(self, plan: Plan, trace: Trace, inst: Instance, knobs: Knobs):
        self.plan, self.trace, self.inst, self.k = plan, trace, inst, knobs
        self.rate = inst.interruptions_per_hour if knobs.interruptions_per_hour is None else knobs.interruptions_per_hour
        self.rng = random.Random(knobs.seed)
        self.heap: list[tuple] = []
        self.seq = itertools.count()
        self.queue: list[tuple] = []
        self.pool: list[Gpu] = []  # the shared pool's live GPUs (booting too)
        self.idle: list[Gpu] = []  # ready pool GPUs with nothing to do
        self.gone: list[Gpu] = []  # released by the autoscaler
        self.open = len(trace.requests) + len(trace.jobs)
        self.top = RANK[top_class(trace)]
        self.out = Outcome(plan, batch_work_ms=sum(j.work for j in trace.jobs))
        # the autoscaler's view of the pool: busy and waiting GPU-ms so far
        self.pool_busy = self.wait_total = self.queued = self.queued_enq = 0
        self.seen_busy = self.seen_wait = 0
        self.last_change = self.now = 0

    def at(self, t: int, kind: int, *payload: Any) -> None:
        heapq.heappush(self.heap, (t, kind, next(self.seq), payload))

    def run(self) -> Outcome:
        for r in self.trace.requests:
            self.at(r.t, ARRIVE, Work(r.priority, r.service, r.t, request=r))
        for j in self.trace.jobs:
            self.at(j.t, ARRIVE, Work("batch", j.work, j.t, job=j))
        first = demand_profile(self.trace, self.k.control_ms)["interactive" if self.plan.batch_on_spot else "all"][0]
        size = self.plan.gpus
        if self.plan.autoscale:  # a running autoscaler has already sized for the first minute
            size = min(max(size, ceil_div(first, self._cap()) + self.plan.reserve), self.plan.max_gpus)
        for _ in range(size):
            self.pool.append(Gpu(0, ready=True, pooled=True))
        self.idle = list(self.pool)
        if self.plan.autoscale:
            self.at(self.k.control_ms, TICK)
        while self.heap:
            t, kind, _, payload = heapq.heappop(self.heap)
            if kind == TICK and self.open == 0 and t >= self.trace.horizon:
                break
            self.now = t
            {FINISH: self._finish, READY: self._ready, INTERRUPT: self._interrupt, PREEMPTIBLE: self._dispatch,
             ARRIVE: self._arrive, TICK: self._tick}[kind](*payload)
        self.out.end = end = max(self.trace.horizon, self.now)
        for g in self.pool + self.gone:
            self.out.paid.append((g.launched, g.released if g.released is not None else end, False))
        return self.out

    def _cap(self) -> int:
        return round(self.k.control_ms * self.k.target_util)

    # -- the shared pool

    def _key(self, w: Work) -> tuple:
        return (RANK[w.priority], w.enqueued) if self.plan.by_priority else (w.enqueued,)

    def _enqueue(self, w: Work) -> None:
        heapq.heappush(self.queue, (*self._key(w), next(self.seq), w))
        self.queued += 1
        self.queued_enq += w.enqueued

    def _arrive(self, w: Work) -> None:
        if w.job and self.plan.batch_on_spot:
            self._launch(w)
            return
        self._enqueue(w)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            head = self.queue[0][-1]
            if RANK[head.priority] > self.top and len(self.idle) <= self.plan.reserve:
                idle = None  # the last idle GPUs are kept for the top class
            else:
                idle = self.idle.pop() if self.idle else None
            if idle is None and self.plan.preempt_batch and head.priority != "batch":
                idle = self._preempt()
            if idle is None:
                return
            heapq.heappop(self.queue)
            self.queued -= 1
            self.queued_enq -= head.enqueued
            self.wait_total += self.now - head.enqueued
            self._start(idle, head)

    def _start(self, g: Gpu, w: Work) -> None:
        if w.request and not w.waited and RANK[w.priority] == self.top:
            self.out.top_waits.append(self.now - w.request.t)
        w.waited = True
        g.work, g.started = w, self.now
        self.at(self.now + w.remaining, FINISH, g, g.epoch)
        if w.job and g.pooled and self.plan.preempt_batch and w.job.checkpoint < w.remaining:
            self.at(self.now + w.job.checkpoint, PREEMPTIBLE)  # waiting work may take it from then on

    def _preempt(self) -> Gpu | None:
        """A running batch job gives up its GPU, the one that loses least since its last checkpoint, but only
        once it has run one checkpoint interval since it (re)started: each preemption keeps at least a
        checkpoint of progress, so a job is preempted at most work ÷ checkpoint times and loses less than
        its own work in all. (Without it a restarted job, having lost nothing yet, was the first taken again.)"""
        running = [g for g in self.pool if g.work is not None and g.work.job is not None
                   and self.now - g.started >= g.work.job.checkpoint]
        if not running:
            return None
        g = min(running, key=lambda g: (self._lost(g.work, self.now - g.started), g.started))
        w = self._stop(g)
        w.enqueued = self.now
        self._enqueue(w)
        return g

    def _stop(self, g: Gpu) -> Work:
        """Take a job off its GPU: progress up to the last checkpoint is kept, the rest is lost."""
        w, ran = g.work, self.now - g.started
        lost = self._lost(w, ran)
        w.done += ran - lost
        w.remaining -= ran - lost
        self.out.batch_lost_ms += lost
        self.out.busy_ms += ran
        if g.pooled:
            self.pool_busy += ran
        g.work, g.epoch = None, g.epoch + 1
        return w

    @staticmethod
    def _lost(w: Work, ran: int) -> int:
        return ran % w.job.checkpoint

    def _finish(self, g: Gpu, epoch: int) -> None:
        if epoch != g.epoch:
            return
        w, ran = g.work, self.now - g.started
        self.out.busy_ms += ran
        g.work = None
        self.open -= 1
        if w.job and self.now > w.job.deadline:
            self.out.deadline_misses += 1
        if not g.pooled:  # a job's own instance: stop paying for it
            self.out.paid.append((g.launched, self.now, g.spot))
            return
        self.pool_busy += ran
        self.idle.append(g)
        self._dispatch()

    def _ready(self, g: Gpu) -> None:
        g.ready = True
        if g.pooled:
            self.idle.append(g)
            self._dispatch()
            return
        w = g.work
        g.work = None
        g.started = self.now
        self._start(g, w)
        if g.spot and self.rate > 0:
            hit = self.now + max(1, round(self.rng.expovariate(self.rate) * MS_PER_HOUR))
            if hit < self.now + w.remaining:
                self.at(hit, INTERRUPT, g, g.epoch)

    # -- batch on its own instances

    def _launch(self, w: Work) -> None:
        """Spot unless losing one more checkpoint interval and relaunching could miss the deadline."""
        boot = self.k.scale_up_delay_ms
        safe = self.now + 2 * boot + w.remaining + w.job.checkpoint <= w.job.deadline
        g = Gpu(self.now, spot=safe)
        if not safe:
            self.out.fallbacks += 1
        g.work = w  # held while booting; started when READY
        self.at(self.now + boot, READY, g)

    def _interrupt(self, g: Gpu, epoch: int) -> None:
        if epoch != g.epoch:
            return
        self.out.interruptions += 1
        w = self._stop(g)
        self.out.paid.append((g.launched, self.now, True))
        self._launch(w)

    # -- the autoscaler

    def _tick(self) -> None:
        running = sum(self.now - g.started for g in self.pool if g.work is not None)
        busy = self.pool_busy + running
        wait = self.wait_total + self.queued * self.now - self.queued_enq
        demand = (busy - self.seen_busy) + (wait - self.seen_wait if self.plan.count_waiting else 0)
        self.seen_busy, self.seen_wait = busy, wait
        live = self.pool
        want = ceil_div(demand, self._cap()) + self.plan.reserve
        if self.queued:  # nothing waits for ever behind the headroom
            want = max(want, self.plan.reserve + 1)
        want = min(max(want, self.plan.gpus), self.plan.max_gpus)
        if want > len(live):
            for _ in range(want - len(live)):
                g = Gpu(self.now, pooled=True)
                self.pool.append(g)
                self.at(self.now + self.k.scale_up_delay_ms, READY, g)
            self.last_change = self.now
        elif want < len(live) and self.now - self.last_change >= self.k.cooldown_ms:
            idle = self.idle[: len(live) - want]
            for g in idle:
                g.released = self.now
                self.idle.remove(g)
                self.pool.remove(g)
                self.gone.append(g)
            if idle:
                self.last_change = self.now
        self.at(self.now + self.k.control_ms, TICK)


# ---- metrics ------------------------------------------------------------------------------------


def daily_costs(out: Outcome, inst: Instance, horizon: int) -> list[Decimal]:
    """Cost per day of the horizon (anything after it counts on the last day), 12 places each."""
    days = max(1, ceil_div(horizon, DAY_MS))
    ms = [[0, 0] for _ in range(days)]
    for start, end, spot in out.paid:
        t = start
        while t < end:
            d = min(t // DAY_MS, days - 1)
            stop = end if d == days - 1 else min(end, (d + 1) * DAY_MS)
            ms[d][spot] += stop - t
            t = stop
    return [((od * inst.on_demand_usd_hour + sp * inst.spot_usd_hour) / MS_PER_HOUR).quantize(QUANTUM, ROUND_HALF_EVEN)
            for od, sp in ms]


def p99(values: list[int]) -> int:
    """Nearest-rank 99th percentile (0 for no values)."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def metrics(out: Outcome, inst: Instance, trace: Trace, knobs: Knobs) -> dict[str, Any]:
    days = daily_costs(out, inst, trace.horizon)
    # partial days are compared as rates per full day
    lengths = [min(DAY_MS, trace.horizon - i * DAY_MS) or DAY_MS for i in range(len(days))]
    rates = [float(c) * DAY_MS / max(1, n) for c, n in zip(days, lengths)]
    mean = statistics.fmean(rates)
    paid = sum(b - a for a, b, _ in out.paid)
    waits = out.top_waits
    return {
        "strategy": out.plan.name,
        "cost_usd": sum(days, Decimal(0)),
        "gpu_hours_paid": (Decimal(paid) / MS_PER_HOUR).quantize(QUANTUM, ROUND_HALF_EVEN),
        "daily_cost_cv": statistics.pstdev(rates) / mean if mean else 0.0,
        "latency_class": top_class(trace),  # the class the two latency rows measure
        "critical_p99_wait_s": p99(waits) / 1000,
        "slo_s": knobs.slo_ms / 1000,
        "slo_met_pct": 100.0 * sum(w <= knobs.slo_ms for w in waits) / len(waits) if waits else 100.0,
        "utilisation_pct": 100.0 * out.busy_ms / paid if paid else 0.0,
        "batch_lost_pct": 100.0 * out.batch_lost_ms / out.batch_work_ms if out.batch_work_ms else 0.0,
        "savings_vs_static_pct": 0.0,
        "deadline_misses": out.deadline_misses,
        "interruptions": out.interruptions,
        "on_demand_fallbacks": out.fallbacks,
        "gpus": out.plan.gpus,
    }


def simulate(trace: Trace, inst: Instance, knobs: Knobs = Knobs(), only: tuple[str, ...] = STRATEGIES) -> list[dict[str, Any]]:
    """Every strategy's metrics on one trace; savings are against static."""
    rows = [metrics(Sim(p, trace, inst, knobs).run(), inst, trace, knobs) for p in plans(trace, knobs) if p.name in only]
    static = next((r["cost_usd"] for r in rows if r["strategy"] == "static"), None)
    for r in rows:
        r["savings_vs_static_pct"] = float((static - r["cost_usd"]) * 100 / static) if static else 0.0
    return rows


# ---- workloads ----------------------------------------------------------------------------------

# (agent, priority, requests per second at the daily peak, mean GPU-seconds per request)
BUILTIN_AGENTS = (("support-bot", "critical", 0.05, 3.0), ("coder", "high", 0.04, 8.0),
                  ("coder", "normal", 0.06, 10.0), ("research", "low", 0.03, 20.0))


def builtin_trace(seed: int = 7, days: int = 7) -> Trace:
    """A week of agents: a daytime peak (weekends at half), four nightly batch jobs a day."""
    rng = random.Random(seed)
    horizon = days * DAY_MS
    requests = []
    for agent, priority, peak, mean_s in BUILTIN_AGENTS:
        t = 0.0
        while True:
            t += rng.expovariate(peak) * 1000  # thinning: candidates at the peak rate
            if t >= horizon:
                break
            if rng.random() < _load(int(t)):
                service = max(50, round(rng.expovariate(1 / mean_s) * 1000))
                requests.append(Request(int(t), agent, priority, service))
    jobs = []
    for d in range(days):
        for n in range(4):
            t = d * DAY_MS + (18 + n) * MS_PER_HOUR + rng.randrange(MS_PER_HOUR)
            work = rng.randrange(1, 4) * MS_PER_HOUR
            jobs.append(Job(f"eval-{d}-{n}", t, work, t + work + 8 * MS_PER_HOUR, 15 * 60_000))
    requests.sort(key=lambda r: (r.t, r.agent, r.priority))
    return Trace(f"built-in (seed {seed}, {days} days)", horizon, requests, jobs)


def _load(t: int) -> float:
    """Share of the peak rate at time t: low at night, high 9-18 h, halved on days 5 and 6."""
    hour = (t % DAY_MS) / MS_PER_HOUR
    level = 0.2 + 0.8 * max(0.0, math.sin(math.pi * (hour - 7) / 13)) if 7 <= hour <= 20 else 0.2
    return level * (0.5 if (t // DAY_MS) % 7 in (5, 6) else 1.0)


def ledger_trace(ledger: Any, since: datetime, until: datetime, seed: int = 7, batch_deadline_ms: int = 8 * MS_PER_HOUR,
                 checkpoint_ms: int = 15 * 60_000, max_requests: int = 200_000) -> Trace:
    """The user's own workload: requests per agent, priority and minute (priced_events), each costing
    its (agent, priority)'s GPU-seconds per request (gpu_samples level='process', by session; a session id
    without events takes its agent's most common priority); sessions of priority batch, or with GPU time
    but no events and no agent that has any, are batch jobs (their GPU-seconds, from their
    first sample, with `batch_deadline_ms` to finish). Agents without GPU time use no GPU and are left out.
    Over `max_requests`, k requests in a row become one of k times the GPU time (load kept, count bounded)."""
    from meterline.app.report import load_query

    window = {"since": since, "until": until}
    minutes = ledger.query(load_query("strategy_requests"), window).rows
    sessions = ledger.query(load_query("strategy_sessions"), window).rows
    gpu_ms: dict[tuple, int] = {}
    jobs = []
    for tenant, agent, job, priority, first, gpu_seconds in sessions:
        ms = int(Decimal(gpu_seconds) * 1000)
        if priority in ("batch", "") and ms > 0:
            t = max(0, _ms(first - since))
            jobs.append(Job(f"{tenant}/{job}", t, ms, t + max(batch_deadline_ms, 2 * ms), checkpoint_ms))
        elif ms > 0:
            key = (tenant, agent, priority)
            gpu_ms[key] = gpu_ms.get(key, 0) + ms
    counts: dict[tuple, int] = {}
    for tenant, agent, priority, _, n in minutes:
        counts[(tenant, agent, priority)] = counts.get((tenant, agent, priority), 0) + n
    total = sum(n for key, n in counts.items() if key in gpu_ms)
    merge = max(1, ceil_div(total, max_requests))
    rng, carry, requests = random.Random(seed), dict.fromkeys(counts, 0), []
    for tenant, agent, priority, minute, n in minutes:
        key = (tenant, agent, priority)
        if key not in gpu_ms:
            continue
        emit = (carry[key] + n) // merge - carry[key] // merge
        carry[key] += n
        service = max(1, gpu_ms[key] * merge // counts[key])
        start = max(0, _ms(minute - since))
        requests += [Request(start + rng.randrange(60_000), f"{tenant}/{agent}", priority, service) for _ in range(emit)]
    requests.sort(key=lambda r: (r.t, r.agent, r.priority))
    label = f"ledger {since:%Y-%m-%d %H:%M} → {until:%Y-%m-%d %H:%M} UTC" + (f" (requests merged {merge}:1)" if merge > 1 else "")
    return Trace(label, max(1, _ms(until - since)), requests, sorted(jobs, key=lambda j: (j.t, j.name)))


def _ms(delta) -> int:
    return int(delta.total_seconds() * 1000)


# ---- output and storage -----------------------------------------------------------------------

ROWS = (  # (metric, label): the seed's rows, each a number
    ("cost_usd", "cost (USD)"),
    ("daily_cost_cv", "cost predictability (CV of daily cost; 0 = flat)"),
    ("critical_p99_wait_s", "latency guarantee ({cls} p99 wait, s)"),
    ("slo_met_pct", "{cls} requests within SLO (%)"),
    ("utilisation_pct", "utilisation efficiency (busy ÷ paid GPU-s, %)"),
    ("batch_lost_pct", "risk of interruption (batch work lost and re-run, %)"),
    ("savings_vs_static_pct", "typical cost savings vs static (%)"),
    ("deadline_misses", "batch deadline misses"),
    ("gpu_hours_paid", "GPU-hours paid"),
)


def cell(metric: str, value: Any) -> str:
    if metric == "cost_usd":
        return f"{value.quantize(Decimal('0.01'), ROUND_HALF_EVEN):,}"
    if metric == "gpu_hours_paid":
        return f"{value.quantize(Decimal('0.1'), ROUND_HALF_EVEN):,}"
    if metric == "daily_cost_cv":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render_table(rows: list[dict[str, Any]], source: str, inst: Instance, knobs: Knobs, cls: str = "critical"):
    """The seed's table: one column per strategy, every cell a number. All text goes in as rich Text."""
    from rich.table import Table
    from rich.text import Text

    title = (f"compute strategies · {source} · {inst.gpu}: ${inst.on_demand_usd_hour}/h on-demand, "
             f"${inst.spot_usd_hour.normalize():f}/h spot · {cls} SLO {knobs.slo_ms / 1000:g} s")
    table = Table(title=Text(title), header_style="bold")
    table.add_column(Text("metric"))
    for r in rows:
        table.add_column(Text(r["strategy"]), justify="right")
    for metric, label in ROWS:
        table.add_row(Text(label.format(cls=cls)), *(Text(cell(metric, r[metric])) for r in rows))
    return table


def to_json(rows: list[dict[str, Any]], trace: Trace, inst: Instance, knobs: Knobs, run_id: str | None = None) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return format(v.normalize(), "f") if isinstance(v, Decimal) else v

    return {"source": trace.source, "run_id": run_id, "seed": knobs.seed, "requests": len(trace.requests),
            "batch_jobs": len(trace.jobs), "latency_class": top_class(trace), "instance": {k: plain(v) for k, v in vars(inst).items()},
            "knobs": vars(knobs), "strategies": [{k: plain(v) for k, v in r.items()} for r in rows]}


STORED = ("cost_usd", "gpu_hours_paid", "daily_cost_cv", "critical_p99_wait_s", "slo_s", "slo_met_pct", "utilisation_pct",
          "batch_lost_pct", "savings_vs_static_pct", "deadline_misses", "interruptions", "on_demand_fallbacks")


def store(client: Any, rows: list[dict[str, Any]], trace: Trace, inst: Instance, knobs: Knobs, run_id: str, ts: datetime,
          cluster: str | None = None) -> None:
    """One strategy_results row per strategy (sql/migrations/0010), for Grafana and the web page."""
    from meterline.sql.ledger import write_table
    from meterline.sql.rows import insert_rows

    insert_rows(client, write_table("strategy_results", cluster), [
        {"run_id": run_id, "ts": ts, "source": trace.source, "seed": knobs.seed, "gpu": inst.gpu,
         "on_demand_usd_hour": inst.on_demand_usd_hour, "spot_usd_hour": inst.spot_usd_hour, "strategy": r["strategy"],
         **{k: r[k] for k in STORED}} for r in rows])


def with_knobs(knobs: Knobs, **changes: Any) -> Knobs:
    return replace(knobs, **{k: v for k, v in changes.items() if v is not None})
