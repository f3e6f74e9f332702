"""`meterline simulate`: a deterministic discrete-event simulator around the real allocator.

The engine (engine.py), its spend leases and the agents' guards (guard.py) are the production
code, driven through their public seams: the engine's injected clock, `apply_spend`, `decide`
and `heartbeat`; a Guard per simulated session with an injected clock and an in-memory feed
that delivers decisions after the configured lag. What is simulated is only what surrounds
them: agents (arrival processes, priorities, call costs, session lifetimes), the streams job's
spend updates (1-minute windows, published on the streams job's own intervals) and Kafka's
delays. No Kafka, no threads, no wall clock: the same scenario and seed give the same numbers.

A scenario is a TOML file (see allocator/scenarios/*.toml):

    name = "steady-20"           seed = 7         duration_s = 3600
    [budget]  amount = "10"  period_s = 3600  hard = true  actions = {normal = "deny", ...}
    [lag]     session_publish_s = 5   scope_publish_s = 1   kafka_s = 0.02   tick_s = 0.1
    [engine]  headroom_pct = "10"     (any EngineConfig field; durations in seconds)
    [[agents]] name = "chat"  sessions = 10  priority = "normal"  rate_per_min = 6
               arrival = "steady" | "diurnal" | "bursty" | "runaway"
               cost_min = "0.01"  cost_max = "0.10"  actual_factor = "1"
               session_s = 600  patience_s = 30  start_s = 0  stop_s = duration_s
    [gpu]     a GPU pool: parsed (`GpuSpec`) but not simulated yet
"""
from __future__ import annotations

import heapq
import inspect
import math
import random
import threading
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from meterline.schemas.events import PRIORITIES, BudgetPolicy, SpendUpdate, new_id
from meterline.schemas.scopes import lineage, scope_of

from .engine import Engine, EngineConfig, Outputs
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
class GpuSpec:
    gpus: int = 8
    sample_s: float = 2.0
    tenants: dict[str, dict] = field(default_factory=dict)   # name -> {quota_gpus, jobs_per_min, job_s, priority}


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
    gpu = GpuSpec(**data.pop("gpu")) if "gpu" in data else None
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
        if self.sc.gpu:   # parsed, not simulated yet: say so rather than report figures it did not measure
            raise NotImplementedError("GPU pools are not simulated yet ([gpu] in a scenario)")
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

    def _allocate(self) -> None:
        self._send(self.engine.decide())

    def _heartbeat(self) -> None:
        self._send(Outputs(decisions=self.engine.heartbeat()))

    def _send(self, out: Outputs) -> None:
        if out.decisions or out.retired:   # the service's next tick publishes; Kafka carries it to the guards
            self.at(self.t + self.lag["tick_s"] / 2 + self.lag["kafka_s"], self._deliver_decisions, out)

    def _deliver_decisions(self, out: Outputs) -> None:
        self.feed.deliver(out)
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
