"""`meterline simulate`: a deterministic discrete-event simulator around the real allocator.

The engine (engine.py), its spend leases and the agents' guards (guard.py) are the production
code, driven through their public seams: the engine's injected clock, `apply_spend`, `decide`
and `heartbeat`; a Guard per simulated session with an injected clock and an in-memory feed
that delivers decisions after the configured lag. What is simulated is only what surrounds
them: agents (arrival processes, priorities, call costs, session lifetimes), the streams job's
spend updates (1-minute windows, published on the streams job's own intervals) and Kafka's
delays. No Kafka, no threads, no wall clock: the same scenario and seed give the same numbers.
`run_live` is the exception: the same scenario for real, to confirm the simulator (issue 14).

A scenario is a TOML file (see allocator/scenarios/*.toml):

    name = "steady-20"           seed = 7         duration_s = 3600
    [budget]  amount = "10"  period_s = 3600  hard = true  actions = {normal = "deny", ...}
    [lag]     session_publish_s = 5   scope_publish_s = 1   kafka_s = 0.02   tick_s = 0.1
    [engine]  headroom_pct = "10"     (any EngineConfig field; durations in seconds)
    [[agents]] name = "chat"  sessions = 10  priority = "normal"  rate_per_min = 6
               arrival = "steady" | "diurnal" | "bursty" | "runaway"
               cost_min = "0.01"  cost_max = "0.10"  actual_factor = "1"
               session_s = 600  patience_s = 30  start_s = 0  stop_s = duration_s
    [gpu]     gpus = 8  slices = 1 (MIG slices per GPU)  sample_s = 2  checkpoint_s = 0  pending_visible = true
    [gpu.tenants.a]  gpu_hours = "4"  weight = "1"      (quota = gpu_hours / period hours; see GpuCluster)
    [[gpu.tenants.a.jobs]]  priority = "batch"  backlog = 20  per_min = 0  job_s = 600  job_s_max = 900  slots = 1
"""
from __future__ import annotations

import heapq
import inspect
import math
import random
import threading
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from meterline.schemas.events import PRIORITIES, BudgetPolicy, GpuSample, SpendUpdate, new_id
from meterline.schemas.scopes import lineage, scope_of

from .engine import Engine, EngineConfig, Outputs
from .gpu import fair_shares
from .guard import BudgetExceeded, Compiled, Guard, GuardError, Throttled

START = datetime(2026, 6, 1, tzinfo=timezone.utc)   # a month start: the streams job's period starts here too
PICO = Decimal("1e-12")
ZERO = Decimal(0)
TENANT = "sim"


def _default(cls, name: str) -> float:
    return inspect.signature(cls.__init__).parameters[name].default


def production_lag() -> dict[str, float]:
    """Feedback delays as the running components are configured by default (streams worker, allocator)."""
    from meterline.streams.worker import StreamWorker

    from .service import AllocatorService

    return {"session_publish_s": _default(StreamWorker, "checkpoint_interval"),    # sessions/agents: every checkpoint
            "scope_publish_s": _default(StreamWorker, "publish_interval"),         # tenant/team/project
            "tick_s": _default(AllocatorService, "tick"), "heartbeat_s": _default(AllocatorService, "heartbeat_every"),
            "kafka_s": 0.02}


# ---- scenario ----------------------------------------------------------------------------

@dataclass
class AgentSpec:
    name: str
    sessions: int = 1
    priority: str = "normal"
    rate_per_min: float = 6.0
    arrival: str = "steady"           # steady | diurnal | bursty | runaway
    cost_min: Decimal = Decimal("0.02")
    cost_max: Decimal = Decimal("0.02")
    actual_factor: Decimal = Decimal(1)   # actual cost / the estimate the guard reserves
    session_s: float = 0.0            # mean session lifetime (0: one session for the whole run)
    patience_s: float = 30.0          # how long a held-back call waits before the agent gives up
    start_s: float = 0.0
    stop_s: float | None = None
    team: str = "t"
    amplitude: float = 0.8            # diurnal: rate x (1 + amplitude sin)
    burst_every_s: float = 300.0      # bursty: a burst of burst_s at burst_factor x rate, else rate / burst_factor
    burst_s: float = 30.0
    burst_factor: float = 8.0
    runaway_at_s: float = 0.0         # runaway: rate x runaway_factor from then on
    runaway_factor: float = 20.0

    def rate(self, t: float, duration: float) -> float:
        """Calls per second at time t (before the session's own sequencing)."""
        base = self.rate_per_min / 60
        if self.arrival == "diurnal":
            return base * (1 + self.amplitude * math.sin(2 * math.pi * t / duration))
        if self.arrival == "bursty":
            return base * self.burst_factor if t % self.burst_every_s < self.burst_s else base / self.burst_factor
        if self.arrival == "runaway" and t >= self.runaway_at_s:
            return base * self.runaway_factor
        return base

    def peak(self) -> float:
        factor = {"diurnal": 1 + self.amplitude, "bursty": self.burst_factor, "runaway": self.runaway_factor}
        return self.rate_per_min / 60 * max(1.0, factor.get(self.arrival, 1.0))


@dataclass
class GpuJobSpec:
    priority: str = "batch"
    backlog: int = 0                  # jobs already waiting at start_s
    per_min: float = 0.0              # then Poisson arrivals at this rate
    job_s: float = 600.0              # GPU time a job needs, uniform in [job_s, job_s_max]
    job_s_max: float | None = None
    slots: int = 1                    # GPUs (or MIG slices) a job holds
    start_s: float = 0.0
    stop_s: float | None = None
    idle_s: float = 0.0               # after its work a job keeps its GPUs this long at 0 % (a notebook left open)


@dataclass
class GpuTenantSpec:
    gpu_hours: Decimal = ZERO         # its tenant GPU-hour budget over the period: quota = gpu_hours / period hours
    weight: Decimal = ZERO            # for spare capacity (0: the engine weighs by quota)
    jobs: list[GpuJobSpec] = field(default_factory=list)


@dataclass
class GpuSpec:
    gpus: int = 8
    slices: int = 1                   # MIG slices per GPU (1: whole GPUs)
    sample_s: float = 2.0             # the collector's NVML interval
    checkpoint_s: float = 0.0         # a preempted job keeps its progress up to its last checkpoint (0: none)
    pending_visible: bool = True      # the engine is told each tenant's waiting GPUs (gpu_pending)
    tenants: dict[str, GpuTenantSpec] = field(default_factory=dict)


def _gpu_spec(raw: dict) -> GpuSpec:
    raw = dict(raw)
    tenants = {name: GpuTenantSpec(**_coerce(GpuTenantSpec, {**t, "jobs": [GpuJobSpec(**_coerce(GpuJobSpec, j))
                                                                            for j in t.get("jobs", [])]}))
               for name, t in raw.pop("tenants", {}).items()}
    return GpuSpec(tenants=tenants, **_coerce(GpuSpec, raw))


@dataclass
class Scenario:
    name: str
    duration_s: float
    budget: dict[str, Any]
    agents: list[AgentSpec]
    seed: int = 1
    lag: dict[str, float] = field(default_factory=production_lag)
    engine: dict[str, Any] = field(default_factory=dict)
    gpu: GpuSpec | None = None
    expect: dict[str, Any] = field(default_factory=dict)   # targets the suite's tests assert for this scenario
    description: str = ""


def _coerce(cls, raw: dict) -> dict:
    types = {f.name: f.type for f in fields(cls)}
    unknown = set(raw) - set(types)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    return {k: Decimal(str(v)) if types[k] == "Decimal" else v for k, v in raw.items()}


def parse_scenario(data: dict) -> Scenario:
    data = dict(data)
    agents = [AgentSpec(**_coerce(AgentSpec, a)) for a in data.pop("agents", [])]
    lag = {**production_lag(), **data.pop("lag", {})}
    gpu = _gpu_spec(data.pop("gpu")) if "gpu" in data else None
    return Scenario(agents=agents, lag=lag, gpu=gpu, **data)


def load_scenario(path: str | Path) -> Scenario:
    return parse_scenario(tomllib.loads(Path(path).read_text()))


def builtin_scenarios() -> list[Scenario]:
    folder = resources.files("meterline.allocator") / "scenarios"
    return [parse_scenario(tomllib.loads(f.read_text())) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".toml")]


# ---- the stand-ins around the real code ----------------------------------------------------

class SimFeed:
    """DecisionFeed's public surface (decisions, version, changed) filled by the simulator."""

    def __init__(self) -> None:
        self.decisions: dict[str, Compiled] = {}
        self.version = 0
        self.changed = threading.Condition()
        self.received: dict[str, float] = {}

    def deliver(self, out: Outputs) -> None:
        for d in out.decisions:
            self.decisions[d.key] = Compiled(d)
        for key in out.retired:
            self.decisions.pop(key, None)
        self.version += 1


class SpendStream:
    """The streams job's spend output: per scope, the current UTC minute's cost (re-sent as it
    grows) and period-to-date events; sessions/agents and the levels above on their own intervals."""

    def __init__(self) -> None:
        self.scopes: dict[str, list] = {}   # scope_id -> [minute, window cost, period cost, events]
        self.dirty: set[str] = set()

    def add(self, session_id: str, cost: Decimal, now: datetime) -> None:
        minute = now.replace(second=0, microsecond=0)
        for _, scope_id in lineage(session_id):
            s = self.scopes.setdefault(scope_id, [minute, ZERO, ZERO, 0])
            if s[0] != minute:
                s[0], s[1] = minute, ZERO
            s[1] += cost
            s[2] += cost
            s[3] += 1
            self.dirty.add(scope_id)

    def drain(self, levels: tuple[str, ...], now: datetime) -> list[SpendUpdate]:
        due = sorted(sid for sid in self.dirty if scope_of(sid) in levels)
        self.dirty.difference_update(due)
        return [self._update(sid, now) for sid in due]

    def _update(self, scope_id: str, now: datetime) -> SpendUpdate:
        minute, window, period, events = self.scopes[scope_id]
        return SpendUpdate(update_id=new_id(), ts=now, tenant_id=TENANT, scope=scope_of(scope_id), scope_id=scope_id,
                           window_start=minute, window_end=minute + timedelta(minutes=1), window_cost_usd=window,
                           period_start=START, period_cost_usd=period, events=events)


@dataclass
class Session:
    spec: AgentSpec
    slot: int
    guard: Guard
    path: str
    ends: float
    rng: random.Random


@dataclass
class Request:
    session: Session
    estimate: Decimal
    actual: Decimal
    asked: float
    done: bool = False
    why: str = ""     # what held it back last (for the refusal counts)


# ---- the simulation ------------------------------------------------------------------------

class Simulation:
    def __init__(self, scenario: Scenario):
        self.sc = scenario
        self.lag = scenario.lag
        self.t = 0.0
        self._queue: list = []
        self._seq = 0
        self.engine = Engine(_engine_config(scenario.engine), clock=self.now)
        self.policy = _policy(scenario)
        self.engine.apply_policy(self.policy)
        self.feed = SimFeed()
        self.feed.announce = lambda *a: self.at(self.t + self.lag["kafka_s"], self._announce, *a)
        self.feed.release = lambda *a: self.at(self.t + self.lag["kafka_s"], self._release_lease, *a)
        self.stream = SpendStream()
        self.rng = random.Random(scenario.seed)
        self.parked: list[Request] = []
        self.spent = ZERO
        self.demand = ZERO
        self.asked: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.why: Counter[str] = Counter()
        self.samples: list[tuple[float, Decimal]] = []
        self.exhausted_at: float | None = None
        self.last_call_at: float | None = None
        self._sessions_started = 0
        self.gpu = None

    def now(self) -> datetime:
        return START + timedelta(seconds=self.t)

    def at(self, t: float, fn, *args) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, fn, args))

    def run(self) -> dict[str, Any]:
        d = self.sc.duration_s
        self._deliver_decisions(self.engine.decide())
        for spec in self.sc.agents:
            for slot in range(spec.sessions):
                rng = random.Random(f"{self.sc.seed}:{spec.name}:{slot}")
                self.at(spec.start_s + rng.uniform(0, 1), self._next_call, self._new_session(spec, slot, rng, spec.start_s))
        self._every(self.lag["session_publish_s"], lambda: self._publish(("session", "agent")))
        self._every(self.lag["scope_publish_s"], lambda: self._publish(("tenant", "team", "project")))
        self._every(self.engine.config.full_render_every.total_seconds(), self._allocate)
        self._every(self.lag["heartbeat_s"], self._heartbeat)
        self._every(d / 200, self._sample)
        if self.sc.gpu:
            self.gpu = GpuCluster(self, self.sc.gpu)
            self.gpu.start()
        while self._queue and self._queue[0][0] <= d:
            self.t, _, fn, args = heapq.heappop(self._queue)
            fn(*args)
        self.t = d
        self._sample()
        return self.report()

    def _every(self, period: float, fn) -> None:
        def tick():
            fn()
            self.at(self.t + period, tick)
        self.at(period, tick)

    # ---- agents ----
    def _new_session(self, spec: AgentSpec, slot: int, rng: random.Random, t: float) -> Session:
        self._sessions_started += 1
        sid = f"{spec.name}-{slot}-{self._sessions_started}"
        guard = Guard(self.feed, TENANT, spec.team, "p", spec.name, sid, priority=spec.priority,
                      clock=lambda: (START + timedelta(seconds=self.t)).timestamp())
        life = rng.expovariate(1 / spec.session_s) if spec.session_s else math.inf
        return Session(spec, slot, guard, guard.scopes["session"], t + life, rng)

    def _next_call(self, s: Session) -> None:
        spec, stop = s.spec, s.spec.stop_s if s.spec.stop_s is not None else self.sc.duration_s
        if self.t >= stop:
            return
        if self.t >= s.ends:
            s = self._new_session(spec, s.slot, s.rng, self.t)
        nanos = _log_uniform(s.rng, spec.cost_min, spec.cost_max)
        estimate = Decimal(nanos) / 10**9
        req = Request(s, estimate, (estimate * spec.actual_factor).quantize(PICO), self.t)
        self.asked[spec.priority] += 1
        self.demand += req.actual
        self._try(req)

    def _think(self, s: Session) -> float:
        """Time to the session's next call: a thinned Poisson process at the spec's rate(t)."""
        t, peak = self.t, s.spec.peak()
        while True:
            t += s.rng.expovariate(peak)
            if s.rng.random() * peak <= s.spec.rate(t, self.sc.duration_s):
                return t

    def _try(self, req: Request) -> None:
        if req.done:
            return
        guard, prio = req.session.guard, req.session.spec.priority
        try:
            guard.check("m", cost_usd=req.estimate, wait=False)
        except Throttled as err:
            queued = str(err).startswith("queued")   # a queue is released by the next decision, not by time
            req.why = "queued" if queued else "throttled"
            return self._hold(req, retry_at=None if queued else self.t + max(err.retry_after, 0.001))
        except BudgetExceeded as err:
            if str(err).startswith(("deny", "preempt")):
                self._note_exhaustion(err)
                req.why = "denied"
                return self._finish(req, served=False)
            req.why = "lease"
            return self._hold(req, retry_at=None)   # waiting for a lease: retried when decisions arrive
        except GuardError:
            req.why = "unavailable"
            return self._finish(req, served=False)
        guard.record(req.actual, reserved_usd=req.estimate)
        self.spent += req.actual
        self.last_call_at = self.t
        self.stream.add(req.session.path, req.actual, self.now())
        self.served[prio] += 1
        self._finish(req, served=True)

    def _hold(self, req: Request, retry_at: float | None) -> None:
        deadline = req.asked + req.session.spec.patience_s
        if (retry_at or self.t) > deadline:
            return self._finish(req, served=False)
        if retry_at is None:
            self.parked.append(req)
            self.at(deadline, self._give_up, req)
        else:
            self.at(retry_at, self._try, req)

    def _give_up(self, req: Request) -> None:
        if not req.done:
            self._finish(req, served=False)

    def _finish(self, req: Request, served: bool) -> None:
        req.done = True
        if not served:
            self.refused[req.session.spec.priority] += 1
            self.why[req.why] += 1
        self.at(self._think(req.session), self._next_call, req.session)

    def _note_exhaustion(self, err: BudgetExceeded) -> None:
        if self.exhausted_at is None and err.policy_id == self.policy.policy_id:
            self.exhausted_at = self.t

    # ---- pipeline and allocator ----
    def _publish(self, levels: tuple[str, ...]) -> None:
        updates = self.stream.drain(levels, self.now())
        if updates:
            self.at(self.t + self.lag["kafka_s"], self._apply_spend, updates)

    def _apply_spend(self, updates: list[SpendUpdate]) -> None:
        for u in updates:
            self.engine.apply_spend(u)
        self._allocate()

    def _announce(self, session_id: str, priority: str, need: Decimal, spent: Decimal) -> None:   # as the service does
        self.engine.announce(TENANT, session_id, priority, need, spent)
        self._allocate()

    def _release_lease(self, session_id: str, priority: str, ceiling: Decimal, spent: Decimal, need: Decimal) -> None:
        self.engine.release(TENANT, session_id, ceiling, spent, need)
        self._allocate()

    def _allocate(self) -> None:
        self._send(self.engine.decide())

    def _heartbeat(self) -> None:
        self._send(Outputs(decisions=self.engine.heartbeat()))

    def _send(self, out: Outputs) -> None:
        if out.decisions or out.retired:   # the service's next tick publishes; Kafka carries it to the guards
            self.at(self.t + self.lag["tick_s"] / 2 + self.lag["kafka_s"], self._deliver_decisions, out)

    def _deliver_decisions(self, out: Outputs) -> None:
        self.feed.deliver(out)
        if self.gpu:
            self.gpu.on_decisions()
        parked, self.parked = self.parked, []
        for req in parked:
            self._try(req)

    def _sample(self) -> None:
        self.samples.append((self.t, self.spent))

    # ---- figures ----
    def report(self) -> dict[str, Any]:
        amount, period = self.policy.amount, float(self.sc.budget.get("period_s", self.sc.duration_s))
        plan = [float(amount) * min(1.0, t / period) for t, _ in self.samples]
        err = [float(s) - p for (_, s), p in zip(self.samples, plan)]
        rmse = math.sqrt(sum(e * e for e in err) / len(err)) / float(amount) * 100
        served = {p: _share(self.served[p], self.asked[p]) for p in PRIORITIES if self.asked[p]}
        out = {"scenario": self.sc.name, "seed": self.sc.seed, "duration_s": self.sc.duration_s,
               "budget_usd": str(amount), "spent_usd": str(self.spent), "demand_usd": str(self.demand),
               "demand_ratio": round(float(self.demand / amount), 3),
               "utilisation_pct": round(float(self.spent / amount * 100), 3),
               "overshoot_pct": round(float(max(ZERO, self.spent - amount) / amount * 100), 3),
               "pacing_rmse_pct": round(rmse, 3), "served_pct": served,
               "requests": dict(self.asked), "refused": dict(self.refused), "refused_by": dict(self.why),
               "exhaustion_to_last_call_s": (round(self.last_call_at - self.exhausted_at, 3)
                                             if self.exhausted_at is not None and self.last_call_at is not None else None),
               "sessions": self._sessions_started}
        if self.gpu:
            out["gpu"] = self.gpu.report()
        return out


# ---- GPU pools ------------------------------------------------------------------------------

@dataclass
class GpuJob:
    tenant: str
    priority: str
    slots: int
    work_s: float                     # GPU time still to do
    seq: int                          # arrival order (the scheduler is FIFO, with backfill)
    started: float | None = None
    run: int = 0                      # bumped on every start, so a preempted run's finish event is ignored
    placed: list[str] = field(default_factory=list)
    idle_s: float = 0.0               # held idle this long once its work is done
    idle_from: float | None = None    # when its idle tail began

    @property
    def session(self) -> str:
        """Its session scope id, as the collector attributes its process rows (an idle reclaim names it)."""
        return f"{self.tenant}/gpu/p/jobs/job-{self.seq}"


class GpuCluster:
    """A pool of GPUs (or MIG slices) and a FIFO scheduler around the real engine's GPU decisions.

    What is simulated: jobs, the scheduler and the NVML collector. Every `sample_s` each device and
    each running job's slot becomes a GpuSample row, applied to the engine one Kafka hop later
    (`apply_gpu`), and the engine is told each tenant's waiting GPUs (its `gpu_pending` seam, when
    `pending_visible`). A waiting job starts when slots are free and its tenant's Guard at the job's
    priority lets it (a `preempt` on `tenant:X:batch` refuses new batch jobs); when such a decision
    arrives the scheduler preempts X's newest batch jobs until X holds at most `max_concurrent` GPUs.
    """

    def __init__(self, sim: Simulation, spec: GpuSpec):
        self.sim, self.spec = sim, spec
        self.gpu_per_slot = Decimal(1) / spec.slices
        self.slots = [f"GPU-{g}" if spec.slices == 1 else f"MIG-{g}-{i}" for g in range(spec.gpus) for i in range(spec.slices)]
        self.free = list(self.slots)
        self.holder: dict[str, GpuJob] = {}
        self.waiting: list[GpuJob] = []
        self.running: list[GpuJob] = []
        self.guards: dict[tuple[str, str], Guard] = {}
        self.quota: dict[str, Decimal] = {}
        self.weight = {t: ts.weight for t, ts in spec.tenants.items() if ts.weight}
        self.received: dict[str, float] = defaultdict(float)   # GPU-seconds held
        self.entitled: dict[str, float] = defaultdict(float)   # GPU-seconds of fair share (quota first, spare by weight)
        self.share: dict[str, Decimal] = {}
        self.last = 0.0
        self.preemptions = self.in_quota_preemptions = self.reclaims = 0
        self.lost_s = 0.0
        self.done = 0
        self._seq = 0

    def start(self) -> None:
        sim, period = self.sim, int(self.sim.sc.budget.get("period_s", self.sim.sc.duration_s))
        for tenant, ts in sorted(self.spec.tenants.items()):
            policy = BudgetPolicy(policy_id=f"{tenant}-gpu-hours", tenant_id=tenant, scope="tenant", scope_id=tenant,
                                  unit="gpu_hours", amount=ts.gpu_hours, period="custom", period_anchor=START,
                                  period_seconds=period, created_at=START)
            sim.engine.apply_policy(policy)
            self.quota[tenant] = ts.gpu_hours * 3600 / period
            for n, job in enumerate(ts.jobs):
                rng = random.Random(f"{sim.sc.seed}:gpu:{tenant}:{n}")
                for _ in range(job.backlog):
                    sim.at(job.start_s, self._arrive, tenant, job, rng)
                if job.per_min:
                    sim.at(job.start_s + rng.expovariate(job.per_min / 60), self._arrive_poisson, tenant, job, rng)
        if self.weight:   # the engine's GPU weights are configuration (EngineConfig.gpu_weights)
            sim.engine.config = replace(sim.engine.config, gpu_weights=self.weight)
        if self.spec.pending_visible:
            sim.engine.gpu_pending = self.pending
        sim._every(self.spec.sample_s, self._sample)

    # ---- jobs and the scheduler ----
    def pending(self, tenant: str) -> Decimal:
        return sum((j.slots * self.gpu_per_slot for j in self.waiting if j.tenant == tenant), ZERO)

    def _held(self, tenant: str) -> Decimal:
        return sum((j.slots * self.gpu_per_slot for j in self.running if j.tenant == tenant), ZERO)

    def _busy(self, tenant: str) -> Decimal:
        """GPUs it holds and uses (a job's idle tail holds a GPU but is no demand and no use)."""
        return sum((j.slots * self.gpu_per_slot for j in self.running if j.tenant == tenant and j.idle_from is None), ZERO)

    def _arrive_poisson(self, tenant: str, spec: GpuJobSpec, rng: random.Random) -> None:
        if self.sim.t < (spec.stop_s if spec.stop_s is not None else self.sim.sc.duration_s):
            self._arrive(tenant, spec, rng)
            self.sim.at(self.sim.t + rng.expovariate(spec.per_min / 60), self._arrive_poisson, tenant, spec, rng)

    def _arrive(self, tenant: str, spec: GpuJobSpec, rng: random.Random) -> None:
        self._advance()
        self._seq += 1
        work = rng.uniform(spec.job_s, spec.job_s_max) if spec.job_s_max else spec.job_s
        self.waiting.append(GpuJob(tenant, spec.priority, spec.slots, work, self._seq, idle_s=spec.idle_s))
        self._schedule()

    def _guard(self, job: GpuJob) -> Guard:
        key = (job.tenant, job.priority)
        if key not in self.guards:
            self.guards[key] = Guard(self.sim.feed, job.tenant, "gpu", "p", "jobs", f"{job.tenant}-{job.priority}",
                                     priority=job.priority, clock=lambda: self.sim.now().timestamp())
        return self.guards[key]

    def _admits(self, job: GpuJob) -> bool:
        try:
            self._guard(job).check(None, wait=False)
            return True
        except GuardError:   # preempt/deny, a queue or a throttle: it waits for the next decision
            return False

    def _schedule(self) -> None:
        for job in sorted(self.waiting, key=lambda j: j.seq):
            if len(self.free) >= job.slots and self._admits(job):
                self.waiting.remove(job)
                job.placed, self.free = self.free[:job.slots], self.free[job.slots:]
                job.started, job.run = self.sim.t, job.run + 1
                self.running.append(job)
                for slot in job.placed:
                    self.holder[slot] = job
                self.sim.at(self.sim.t + job.work_s, self._finish, job, job.run)
        self._reshare()

    def _finish(self, job: GpuJob, run: int) -> None:
        if job.run != run or job.started is None:
            return   # this run was preempted (or reclaimed)
        self._advance()
        if job.idle_s and job.idle_from is None:   # work done: it keeps its GPUs, idle, a while longer
            job.idle_from = self.sim.t
            self.sim.at(self.sim.t + job.idle_s, self._finish, job, run)
            self._reshare()
            return
        self._release(job)
        self.done += 1
        self._schedule()

    def _release(self, job: GpuJob) -> None:
        self.running.remove(job)
        for slot in job.placed:
            del self.holder[slot]
        self.free = sorted(self.free + job.placed, key=self.slots.index)
        job.placed, job.started = [], None

    def on_decisions(self) -> None:
        """Decisions arrived: preempt down to any `max_concurrent` in force, then start what may start."""
        self._advance()
        now = self.sim.now().timestamp()
        for tenant in sorted(self.quota):
            d = self.sim.feed.decisions.get(f"tenant:{tenant}:batch")
            if d is None or d.action != "preempt" or d.expires <= now or d.decision.limits.max_concurrent is None:
                continue
            limit = Decimal(d.decision.limits.max_concurrent)
            for job in sorted((j for j in self.running if j.tenant == tenant and j.priority == "batch"),
                              key=lambda j: (-j.started, -j.seq)):
                if self._held(tenant) <= limit:
                    break
                self._preempt(job)
        for job in list(self.running):   # idle -> busy: a preempt on a job's own session releases its GPUs
            d = self.sim.feed.decisions.get(f"session:{job.session}:*")
            if d is not None and d.action == "preempt" and d.expires > now:
                self.reclaims += 1
                if job.idle_from is None:
                    self._preempt(job)   # busy work: the engine must never do this (counted as a preemption)
                else:
                    self._release(job)   # its work is done: nothing lost
                    self.done += 1
        self._schedule()

    def _preempt(self, job: GpuJob) -> None:
        ran = self.sim.t - job.started
        kept = ran // self.spec.checkpoint_s * self.spec.checkpoint_s if self.spec.checkpoint_s else 0.0
        self.lost_s += (ran - kept) * float(job.slots * self.gpu_per_slot)
        job.work_s -= kept
        self._release(job)
        self.waiting.append(job)
        self.preemptions += 1
        if self._held(job.tenant) < self.quota[job.tenant]:
            self.in_quota_preemptions += 1   # this took the tenant below its guaranteed quota

    # ---- the collector ----
    def _sample(self) -> None:
        now, ms = self.sim.now(), int(self.spec.sample_s * 1000)
        rows = []
        for g in range(self.spec.gpus):
            rows.append(GpuSample(sample_id=new_id(), ts=now, node="sim", level="gpu", gpu_index=g, gpu_uuid=f"GPU-{g}",
                                  interval_ms=ms))
        for slot, job in sorted(self.holder.items()):
            g = int(slot.split("-")[1])
            mig = {"mig_uuid": slot, "mig_slices": 1, "mig_total_slices": self.spec.slices} if self.spec.slices > 1 else {}
            rows.append(GpuSample(sample_id=new_id(), ts=now, node="sim", level="process", gpu_index=g, gpu_uuid=f"GPU-{g}",
                                  interval_ms=ms, utilization_pct=90 if job.idle_from is None else 0, tenant_id=job.tenant,
                                  team="gpu", project="p", agent_id="jobs", session_id=f"job-{job.seq}", attributed=True, **mig))
        self.sim.at(self.sim.t + self.sim.lag["kafka_s"], self._apply, rows)

    def _apply(self, rows: list[GpuSample]) -> None:
        for row in rows:
            self.sim.engine.apply_gpu(row)
        self.sim._allocate()

    # ---- figures ----
    def _advance(self) -> None:
        dt, self.last = self.sim.t - self.last, self.sim.t
        for tenant in self.quota:
            self.received[tenant] += dt * float(self._busy(tenant))
            self.entitled[tenant] += dt * float(self.share.get(tenant, ZERO))

    def _reshare(self) -> None:
        """Each tenant's entitlement now, from its true demand (what it runs and what waits)."""
        demand = {t: self._busy(t) + self.pending(t) for t in self.quota}
        self.share = fair_shares(Decimal(self.spec.gpus), self.quota, self.weight or self.quota, demand)

    def report(self) -> dict[str, Any]:
        self._advance()
        ratios = {t: self.received[t] / self.entitled[t] for t in sorted(self.quota) if self.entitled[t] > 0}
        capacity_s = self.spec.gpus * self.sim.sc.duration_s
        return {"gpus": self.spec.gpus, "jain": round(jain(list(ratios.values())), 4) if ratios else None,
                "utilisation_pct": round(sum(self.received.values()) / capacity_s * 100, 3),
                "preemptions": self.preemptions, "in_quota_preemptions": self.in_quota_preemptions,
                "idle_reclaims": self.reclaims,
                "lost_gpu_s": round(self.lost_s, 3), "jobs_done": self.done, "jobs_waiting": len(self.waiting),
                "tenants": {t: {"quota_gpus": str(self.quota[t]), "gpu_hours": round(self.received[t] / 3600, 4),
                                "entitled_gpu_hours": round(self.entitled[t] / 3600, 4),
                                "received_to_entitled": round(ratios[t], 4) if t in ratios else None}
                            for t in sorted(self.quota)}}


def jain(xs: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything."""
    squares = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * squares) if squares else 1.0


# ---- closed loop: the same scenario for real ------------------------------------------------

def run_live(scenario: Scenario, settings) -> dict[str, Any]:
    """Run a scenario's agents for real, in wall-clock time: the allocator service on Kafka, one Guard
    per session on a real DecisionFeed, spend through SpendReporter (the streams job's stand-in, which
    publishes every scope every `lag.session_publish_s`). Sessions draw the same costs and think times
    as in `simulate` (same seeds); what differs is real time, threads and the broker. Returns the
    figures both report: spent, utilisation and overshoot of the hard budget. No [gpu], no session_s."""
    import time

    from .budgets import publish_policy
    from .guard import DecisionFeed
    from .service import run_in_thread
    from .simulate import SpendReporter

    sc, lag = scenario, scenario.lag
    service, stop, thread = run_in_thread(settings, Engine(_engine_config(sc.engine)), tick=lag["tick_s"],
                                          heartbeat_every=lag["heartbeat_s"])
    feed = DecisionFeed(settings, tenants={TENANT}).start()
    if not (service.ready.wait(30) and feed.wait_ready(30)):
        raise RuntimeError("the allocator or the decision feed did not start")
    t0 = time.time()
    start = datetime.fromtimestamp(t0, timezone.utc)
    policy = _policy(sc).model_copy(update={"period_anchor": start, "created_at": start})
    publish_policy(settings, policy)
    while not any(d.decision.policy_id == policy.policy_id for d in list(feed.decisions.values())):
        if time.time() - t0 > 30:
            raise RuntimeError("no decision for the budget reached the guards")
        time.sleep(0.01)
    t0 = time.time()   # the scenario's t = 0: the budget is known to the guards
    reporter = SpendReporter(settings, interval=lag["session_publish_s"]).start()
    lock, totals = threading.Lock(), Counter()
    spent = [ZERO]

    def session(spec: AgentSpec, slot: int) -> None:
        rng = random.Random(f"{sc.seed}:{spec.name}:{slot}")
        guard = Guard(feed, TENANT, spec.team, "p", spec.name, f"{spec.name}-{slot}", priority=spec.priority,
                      queue_timeout=spec.patience_s, lease_timeout=spec.patience_s)
        stop_s = spec.stop_s if spec.stop_s is not None else sc.duration_s
        t, peak = spec.start_s + rng.uniform(0, 1), spec.peak()
        while t < stop_s:
            time.sleep(max(0.0, t0 + t - time.time()))
            estimate = Decimal(_log_uniform(rng, spec.cost_min, spec.cost_max)) / 10**9
            actual = (estimate * spec.actual_factor).quantize(PICO)
            why = _live_try(guard, estimate, time.time() + spec.patience_s)
            served = not why
            if served:
                guard.record(actual, reserved_usd=estimate)
                reporter.add(guard.scopes["session"], actual)
            with lock:
                totals["asked"] += 1
                totals["served"] += served
                totals[f"refused: {why}"] += bool(why)
                spent[0] += actual if served else ZERO
            t = time.time() - t0
            while True:   # the simulator's thinned Poisson process, from when this call ended
                t += rng.expovariate(peak)
                if rng.random() * peak <= spec.rate(t, sc.duration_s):
                    break

    threads = [threading.Thread(target=session, args=(spec, slot), daemon=True)
               for spec in sc.agents for slot in range(spec.sessions)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        reporter.stop()
        stop.set()
        thread.join()
        feed.close()
    amount = policy.amount
    return {"scenario": sc.name, "budget_usd": str(amount), "spent_usd": str(spent[0]),
            "utilisation_pct": round(float(spent[0] / amount * 100), 3),
            "overshoot_pct": round(float(max(ZERO, spent[0] - amount) / amount * 100), 3),
            "requests": totals["asked"], "served": totals["served"], "wall_s": round(time.time() - t0, 3),
            "refused_by": {k.removeprefix("refused: "): v for k, v in totals.items() if k.startswith("refused: ") and v}}


def _live_try(guard: Guard, estimate: Decimal, deadline: float) -> str:
    """One call as the simulator's agents make it: throttled calls retry after the guard's wait, calls
    waiting for a lease or a queue retry as decisions arrive, until the agent's patience runs out.
    Returns why it was refused ('' when it went ahead)."""
    import time

    while True:
        try:
            guard.check("m", cost_usd=estimate, wait=False)
            return ""
        except Throttled as err:
            why, pause = ("queued", 0.01) if str(err).startswith("queued") else ("throttled", max(err.retry_after, 0.001))
        except BudgetExceeded as err:
            if str(err).startswith(("deny", "preempt")):
                return "denied"
            why, pause = "lease", 0.01
        except GuardError:
            return "unavailable"
        if time.time() + pause > deadline:
            return why
        time.sleep(pause)


def _share(n: int, d: int) -> float:
    return round(n / d * 100, 3) if d else 100.0


def _log_uniform(rng: random.Random, low: Decimal, high: Decimal) -> int:
    """An integer nano-USD cost, log-uniform in [low, high] (the draw is a float, the cost is exact)."""
    lo, hi = int(low * 10**9), int(high * 10**9)
    return lo if hi <= lo else min(hi, max(lo, round(lo * (hi / lo) ** rng.random())))


def _policy(sc: Scenario) -> BudgetPolicy:
    b = sc.budget
    actions = {p: "deny" for p in PRIORITIES} | b.get("actions", {})
    return BudgetPolicy(policy_id=f"{sc.name}-budget", tenant_id=TENANT, scope="tenant", scope_id=TENANT,
                        amount=Decimal(str(b["amount"])), period="custom", period_anchor=START,
                        period_seconds=int(b.get("period_s", sc.duration_s)), hard=b.get("hard", True),
                        actions=actions, created_at=START)


def _engine_config(raw: dict) -> EngineConfig:
    types = {f.name: f.type for f in fields(EngineConfig)}
    kw = {}
    for k, v in raw.items():
        kind = types[k]
        kw[k] = timedelta(seconds=v) if kind == "timedelta" else Decimal(str(v)) if kind == "Decimal" else v
    return EngineConfig(**kw)


def simulate(scenario: Scenario) -> dict[str, Any]:
    return Simulation(scenario).run()
