"""The decision engine: budgets + spend + GPU capacity -> throttle decisions. Pure logic.

No I/O here: the clock, the ledger query and the model catalog are injected, so every
rule is testable with a controllable clock. The Kafka service (service.py) feeds it
records and publishes what it returns.

Rules, per budget (a BudgetPolicy on one scope), evaluated for each priority class:
  exhausted        spent >= amount            -> the policy's action for the class
  reserve          remaining < headroom       -> normal/low/batch get their exceed action;
                                                 critical/high keep the reserved headroom
  hot (pacing)     recent rate > allowed rate  -> throttle batch/low (normal too when the
                   (= remaining / time left)     forecast exhaustion is near); critical/high run
  otherwise        allow
A soft budget never denies (deny becomes throttle) and grants no leases. Under a hard USD
budget whose sessions the engine knows, the leases pace spend, so "hot" does not apply and the
headroom is the protected reserve below (at most headroom_pct).

Hard USD budgets also grant spend leases to the sessions below them (see `_grant`):
each live session gets a cumulative spend ceiling that its guard enforces locally, and
the sum of ceilings never exceeds the budget, so Kafka's delay cannot cause overshoot.

Leases follow the pacing plan and priority (see `_compute_pool`, `_grant`):
  announce         a guard holding no lease (or one used up) sends a zero-cost session
                   announcement: its class, the waiting call's cost and its own spend
                   count (`announce`). The engine knows the session before it spends, so
                   no call passes unleased; until the lease arrives a session may spend
                   only a starter (1 % of the uncommitted budget over max(slots, live)).
  critical/high    may be granted anything uncommitted, critical first; ahead of need
                   only from beyond the protected reserve (it stays free for a waiting call).
  normal/low/batch up to the plan (the budget spread evenly over the period) one look-ahead
                   from now plus about a call per live session, never into the protected
                   reserve: critical/high calls expected in the time left at their rate so
                   far, + 2.33 sigma, + two calls.
A session that cannot be granted now waits at its ceiling (`allow`); it is denied only
when nothing is left for its class this period, critical/high also when the call it waits for
fits neither the uncommitted rest nor that plus the unspent leases that may still lapse back
(`_out_of_reach`: denied at once, not after its guard's lease_timeout; the guard then says
what its next call needs, a cheaper one may fit); a lower-class one out of calls also when the rest
left cannot make up the call it waits for, where no critical/high work shares the budget (a scrap
left uncommitted would keep it waiting at `allow`, holding a rest a cheaper session could spend). Near the end a lower-class call that would
strand an unusable rest waits for a dearer one (`_hold_out`). A lower-class guard its lease
denies gives back the rest it cannot use (`release`), where no critical/high work shares the budget.
GPU: borrowing and reclaim by fair share (`_gpu_decisions`); a holder idle past
`gpu_reclaim_idle_for` while others wait is told to release its GPUs (`_idle_reclaims`).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_DOWN, Decimal

from meterline.schemas.events import (
    PRIORITIES,
    Action,
    Anomaly,
    BudgetPolicy,
    DecisionLimits,
    GpuSample,
    Priority,
    SpendUpdate,
    ThrottleDecision,
    decision_key,
    new_id,
    utcnow,
)

from .gpu import GpuPool, GpuWaits, fair_shares
from .slo import Curve, ModelStats, StatsTable, pick_downgrade, plan_share, tier_below
from .periods import period_bounds
from meterline.schemas.scopes import canonical, is_within, level_key, lineage, scope_ids, scope_of, tenant_of

ZERO = Decimal(0)
CENT_NANO = Decimal("1e-12")
SEVERITY: dict[str, int] = {"allow": 0, "downgrade": 1, "throttle": 2, "queue": 3, "preempt": 4, "deny": 5}
PROTECTED: tuple[Priority, ...] = ("critical", "high")
LedgerSpend = Callable[[str, str, datetime], Decimal]


Seconds = tuple[Decimal, Decimal]  # (GPU-seconds, CPU-seconds) of a window or a period
NO_SECONDS: Seconds = (ZERO, ZERO)
UNIT_SECONDS = {"gpu_hours": 0, "vcpu_hours": 1}  # which of them a budget's hours count


def plus(a: Seconds, b: Seconds) -> Seconds:
    return a[0] + b[0], a[1] + b[1]


def growth(new: Seconds, old: Seconds) -> Seconds:
    """What a period-to-date pair grew by (never negative: a stale or reordered update adds nothing)."""
    return max(ZERO, new[0] - old[0]), max(ZERO, new[1] - old[1])


def in_unit(unit: str, cost_usd: Decimal, seconds: Seconds) -> Decimal:
    """Spend in a budget's unit: dollars, or GPU-hours / vCPU-hours from the samples' seconds."""
    return cost_usd if unit == "usd" else seconds[UNIT_SECONDS[unit]] / 3600


def usd(x: Decimal) -> Decimal:
    """Round down to the contract's 12 decimal places (grants round toward less spend)."""
    return x.quantize(CENT_NANO, rounding=ROUND_DOWN)


@dataclass(frozen=True)
class EngineConfig:
    decision_ttl: timedelta = timedelta(seconds=30)
    rate_window: timedelta = timedelta(minutes=5)     # recent spend rate for pacing and forecast
    headroom_pct: Decimal = Decimal(10)               # of each budget, kept for critical and high
    forecast_horizon: timedelta = timedelta(hours=1)  # throttle normal too when exhaustion is this close
    lease_idle: timedelta = timedelta(seconds=60)     # a session silent this long stops being renewed
    lease_slots: int = 20                             # a grant is at most pool / max(live sessions, slots)
    starter_pct: Decimal = Decimal(1)                 # of the uncommitted budget kept for unseen sessions
    pacing_lookahead: timedelta = timedelta(seconds=60)  # lower classes' grants run at most this far ahead of plan
    lease_refill: timedelta = timedelta(seconds=10)   # a grant covers at least this long at the session's rate
    window_memory: timedelta = timedelta(hours=2)     # re-sent windows are recognised this long
    ledger_lag: timedelta = timedelta(minutes=2)      # stream windows this recent may not be in the ledger yet
    gpu_idle_for: timedelta = timedelta(minutes=10)
    gpu_reclaim_idle_for: timedelta = timedelta(minutes=5)   # a holder idle this long while others wait is preempted
    full_render_every: timedelta = timedelta(seconds=1)  # between re-evaluating everything (rates decay with time)
    gpu_weights: dict[str, Decimal] = field(default_factory=dict)


@dataclass
class BudgetState:
    policy: BudgetPolicy
    start: datetime
    end: datetime
    spent: Decimal = ZERO                       # in the policy's unit
    fired: set[int] = field(default_factory=set)
    recent: deque = field(default_factory=deque)  # (window_end, cost in unit, events)
    starters: deque = field(default_factory=deque)   # (live until, starter) as published recently
    smallest_need: Decimal | None = None          # the cheapest call a guard announced waiting for, this period

    def roll(self, now: datetime) -> None:
        if now >= self.end or now < self.start:
            self.start, self.end = period_bounds(self.policy, now)
            self.spent, self.fired, self.smallest_need = ZERO, set(), None
            self.recent.clear()

    @property
    def remaining(self) -> Decimal:
        return self.policy.amount - self.spent

    def rate(self, now: datetime, window: timedelta) -> tuple[Decimal, Decimal]:
        """(cost per second, events per second) over the recent window."""
        while self.recent and now - self.recent[0][0] >= window:
            self.recent.popleft()
        span = Decimal(max(1.0, min(window, now - self.start).total_seconds()))
        return sum((c for _, c, _ in self.recent), ZERO) / span, Decimal(sum(e for _, _, e in self.recent)) / span


@dataclass
class Lease:
    session_id: str
    epoch: datetime
    epoch_end: datetime
    spent: Decimal = ZERO
    limit: Decimal = ZERO
    last_grant: Decimal = ZERO
    events: int = 0
    last_seen: datetime | None = None
    live_until: datetime | None = None   # expiry of the last published lease decision
    priority: Priority = "normal"        # as announced by its guard (sessions that never announce: normal)
    need: Decimal = ZERO                 # the call its guard waits to fit (announced), until it spends again
    first_seen: datetime | None = None

    @property
    def outstanding(self) -> Decimal:
        return max(ZERO, self.limit - self.spent)


@dataclass
class Pool:
    """What one hard budget may still grant in this render, by class (grants are taken off)."""
    any: Decimal         # critical/high: everything uncommitted but the starter reserve
    paced: Decimal       # normal/low/batch now: up to plan(now + look-ahead), less the protected reserve
    period: Decimal      # normal/low/batch for the rest of the period
    reserve: Decimal     # kept for unseen sessions' starters
    protected: Decimal   # kept for critical/high
    call: Decimal        # the budget's recent mean call cost
    live: int
    held: Decimal = ZERO  # granted to normal/low/batch sessions, not spent yet
    returnable: Decimal = ZERO   # held by sessions not stuck on a call of their own: it may still come back
    shared: bool = False  # critical/high sessions are under it (a lower class's rest is their margin: kept)


@dataclass
class Outputs:
    decisions: list[ThrottleDecision] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)   # keys to tombstone on the control topic
    alerts: list[Anomaly] = field(default_factory=list)


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, clock: Callable[[], datetime] = utcnow,
                 ledger_spend: LedgerSpend | None = None, downgrade_for: Callable[[str], str | None] | None = None,
                 primary_model: Callable[[str, str], str | None] | None = None,
                 gpu_pending: Callable[[str], Decimal] | None = None):
        self.config = config or EngineConfig()
        self.clock = clock
        self.ledger_spend = ledger_spend
        self.downgrade_for = downgrade_for
        self.primary_model = primary_model
        self.gpu_pending = gpu_pending
        self.budgets: dict[str, BudgetState] = {}
        self.leases: dict[str, Lease] = {}
        self.gpu = GpuPool()
        self.gpu_waits = GpuWaits()   # what guards announce they wait for: gpu_pending when none is injected
        self._windows: dict[tuple, dict[datetime, tuple[Decimal, Seconds, datetime]]] = {}  # by level_key
        self._published: dict[str, tuple[tuple, ThrottleDecision]] = {}
        self._alerts: list[Anomaly] = []
        self._tenants_seen: set[str] = set()
        self._totals: dict[str, tuple[datetime, int, Seconds]] = {}
        self._by_level: dict[tuple[str, int, str], list[BudgetState]] = {}
        self._sources: dict[tuple, list[ThrottleDecision]] = {}   # rendered decisions per rule source
        self._dirty: set[tuple] = set()
        self._last_full: datetime | None = None
        self._pools: dict[str, Pool] = {}   # per render: policy_id -> what may still be granted
        self._lease_ids: dict[tuple, str] = {}   # level_key -> the id a session's lease is kept under
        self.model_stats: StatsTable = {}        # SLO downgrades: (scope id, model) -> measured (load_model_stats)
        self.pacing: dict[str, Curve] = {}       # policy id -> its period's pacing curve (set_pacing)

    # ---- inputs -------------------------------------------------------------------------
    def apply_policy(self, policy: BudgetPolicy) -> None:
        old = self.budgets.get(policy.policy_id)
        start, end = period_bounds(policy, self.clock())
        state = BudgetState(policy, start, end)
        if old and (old.start, old.end) == (start, end) and old.policy.unit == policy.unit:
            state.spent, state.fired, state.recent, state.starters = old.spent, old.fired, old.recent, old.starters
        else:
            state.spent = self._spend_in_memory(policy, start)
        self.budgets[policy.policy_id] = state
        self._policies_changed()

    def restore_fired(self, policy_id: str, period_start: datetime, threshold: int) -> None:
        """A threshold alerted before a restart (its alert is on the anomalies topic): not alerted again this period."""
        state = self.budgets.get(policy_id)
        if state is not None and state.start == period_start:
            state.fired.add(threshold)

    def remove_policy(self, policy_id: str) -> None:
        self.budgets.pop(policy_id, None)
        self._sources.pop(("budget", policy_id), None)
        self._policies_changed()

    def _policies_changed(self) -> None:
        self._by_level = {}
        for state in self.budgets.values():
            self._by_level.setdefault(level_key(state.policy.scope_id), []).append(state)
        self._last_full = None   # leases and liveness may change anywhere: re-render everything next time

    def apply_spend(self, update: SpendUpdate) -> None:
        """Add a window's spend to every budget on its scope (a re-sent window counts once)."""
        now = self.clock()
        scope_id = canonical(update.tenant_id, update.scope, update.scope_id)
        lease = self._lease_for(scope_id, now) if update.scope == "session" else None  # before the window lands
        d_events, d_secs = self._period_deltas(scope_id, update)
        windows = self._windows.setdefault(level_key(scope_id), {})
        old_usd, old_secs, _ = windows.get(update.window_start, (ZERO, NO_SECONDS, update.window_end))
        d_usd = max(ZERO, update.window_cost_usd - old_usd)
        windows[update.window_start] = (max(old_usd, update.window_cost_usd), plus(old_secs, d_secs), update.window_end)
        for state in self._budgets_on(scope_id):
            state.roll(now)
            if update.window_end > state.start and update.window_start < state.end:  # overlap counts whole: errs toward throttling
                delta = in_unit(state.policy.unit, d_usd, d_secs)
                state.spent += delta
                state.recent.append((update.window_end, delta, d_events))
                self._check_alerts(state, now)
                self._dirty.add(("budget", state.policy.policy_id))
        if update.tenant_id not in self._tenants_seen:
            self._tenants_seen.add(update.tenant_id)
            self._dirty.add(("live", update.tenant_id))
        if lease:
            self._dirty.add(("lease", lease.session_id))
        if lease and update.window_end > lease.epoch:
            lease.spent += d_usd
            lease.events += d_events
            lease.last_seen = now

    def announce(self, tenant_id: str, session_id: str, priority: Priority, need: Decimal = ZERO,
                 spent: Decimal = ZERO) -> None:
        """A guard without a usable lease says it is live, what its next call needs and what it has
        spent by its own count (ahead of the stream's): lease it before it spends."""
        now = self.clock()
        scope_id = canonical(tenant_id, "session", session_id)
        lease = self._lease_for(scope_id, now)
        if lease is not None:
            lease.priority, lease.last_seen, lease.need = priority, now, max(lease.spent, spent) + max(ZERO, need)
            self._dirty.add(("lease", lease.session_id))
            for state in self._hard_ancestors(lease.session_id):
                if need > 0 and (state.smallest_need is None or need < state.smallest_need):
                    state.smallest_need = need

    def release(self, tenant_id: str, session_id: str, ceiling: Decimal, spent: Decimal, need: Decimal = ZERO) -> None:
        """A guard its lease denied gives back its ceiling above `spent`: it stopped there before it
        said so. A release of a ceiling raised since is ignored (the guard spends against the new one).
        Without this a dear session's rest (under one of its calls) stayed committed to it: the demo's
        hooli ended 87.8 % used with 12 % stranded in two leases while a cheap session waited."""
        lease = self._lease_for(canonical(tenant_id, "session", session_id), self.clock())
        if lease is None or _nanos(usd(lease.limit)) != _nanos(ceiling):
            return
        hard = self._hard_ancestors(lease.session_id)
        if any(other.priority in PROTECTED for s in hard for other in self._under(s)):
            # with critical/high work under the budget a stranded rest is the margin its late calls fall back on
            # (runaway-500 lost a high call when rests went back to the lower classes): kept where it is
            return
        lease.limit = max(lease.spent, min(lease.limit, spent))
        lease.need = lease.limit + max(ZERO, need)   # what it waits for: not re-granted unless that fits
        lease.last_grant = ZERO
        self._dirty.add(("lease", lease.session_id))
        for state in hard:
            self._dirty.add(("budget", state.policy.policy_id))

    def _period_deltas(self, scope_id: str, update: SpendUpdate) -> tuple[int, Seconds]:
        """New events and (GPU-, CPU-) seconds since the last update (the contract carries them period-to-date)."""
        old = self._totals.get(scope_id)
        seconds = (update.gpu_seconds, update.cpu_seconds)
        self._totals[scope_id] = (update.period_start, update.events, seconds)
        if old is None or old[0] != update.period_start:
            return update.events, seconds
        return max(0, update.events - old[1]), growth(seconds, old[2])

    def announce_gpu(self, tenant_id: str, session_id: str, gpus: Decimal) -> None:
        """A session waits for `gpus` GPUs (0: no longer): the queue a reclaim is for."""
        self.gpu_waits.note(tenant_id, canonical(tenant_id, "session", session_id), max(ZERO, gpus), self.clock())
        self._dirty.add(("gpu",))

    def _pending_gpus(self, tenant_id: str, now: datetime) -> Decimal:
        return self.gpu_pending(tenant_id) if self.gpu_pending else self.gpu_waits.pending(tenant_id, now)

    def apply_gpu(self, sample: GpuSample) -> None:
        self._dirty.add(("gpu",))
        if sample.level == "process" and sample.session_id and sample.tenant_id:
            self.gpu_waits.placed(canonical(sample.tenant_id, "session", sample.session_id))
        self.gpu.observe(sample.level, sample.gpu_uuid, sample.mig_uuid, sample.mig_slices, sample.mig_total_slices,
                         sample.tenant_id, sample.utilization_pct, sample.ts, _holder(sample))

    def reconcile(self) -> None:
        """Period-to-date spend = ledger up to the recent past + the stream's recent windows.

        Windows newer than `ledger_lag` may be counted twice; that only errs toward throttling.
        """
        if self.ledger_spend is None:
            return
        now = self.clock()
        for state in self.budgets.values():
            if state.policy.unit != "usd":
                continue
            state.roll(now)
            recorded = self.ledger_spend(state.policy.scope, state.policy.scope_id, state.start)
            recent = sum((c for start, (c, _, end) in self._windows.get(level_key(state.policy.scope_id), {}).items()
                          if end > state.start and end > now - self.config.ledger_lag), ZERO)
            state.spent = recorded + recent
            self._check_alerts(state, now)

    # ---- outputs ------------------------------------------------------------------------
    def decide(self) -> Outputs:
        """Decisions whose content changed since they were last published, plus new alerts."""
        now = self.clock()
        full = self._last_full is None or now - self._last_full >= self.config.full_render_every
        if full:
            self._last_full = now
            self._forget_old_windows(now)
            self.gpu.prune(now)
        wanted = self._render(now, full)
        out = Outputs(alerts=self._alerts)
        self._alerts = []
        for key, decision in wanted.items():
            signature = _signature(decision)
            previous = self._published.get(key)
            if previous is None or previous[0] != signature:
                self._published[key] = (signature, decision)
                out.decisions.append(decision)
        for key in [k for k in self._published if k not in wanted]:
            del self._published[key]
            out.retired.append(key)
        return out

    def heartbeat(self) -> list[ThrottleDecision]:
        """Live decisions past half their TTL, renewed (same id, fresh times) so guards keep them."""
        now = self.clock()
        renewed = []
        for key, (signature, decision) in list(self._published.items()):
            if decision.expires_at - now < self.config.decision_ttl / 2:
                if key.startswith("session:") and self._idle(self.leases.get(decision.scope_id), now):
                    continue  # an idle session's lease lapses; its commitment is released after expiry
                fresh = decision.model_copy(update={"issued_at": now, "expires_at": now + self.config.decision_ttl})
                self._published[key] = (signature, fresh)
                renewed.append(fresh)
                if decision.scope == "session" and decision.scope_id in self.leases:
                    self.leases[decision.scope_id].live_until = fresh.expires_at
        return renewed

    # ---- rendering ----------------------------------------------------------------------
    def _render(self, now: datetime, full: bool) -> dict[str, ThrottleDecision]:
        """Re-render the rule sources that changed (all of them when `full`), then merge per key."""
        dirty, self._dirty = self._dirty, set()
        self._pools = {}
        for pid, state in self.budgets.items():
            if full or ("budget", pid) in dirty:
                state.roll(now)
                self._sources[("budget", pid)] = list(self._budget_decisions(state, now))
        known = {k[1] for k in self._sources if k[0] == "lease"} | set(self.leases)
        touched = {k[1] for k in dirty if k[0] == "lease"}
        due = touched | {sid for sid in known if self._lease_due(sid, now)} if full else touched
        for session_id in sorted(due, key=lambda sid: (*self._grant_order(sid), sid)):  # critical first; the fullest first; then by id (not set order: the same numbers in every process)
            self._sources[("lease", session_id)] = list(self._lease_decisions(now, session_id))
        if full or ("gpu",) in dirty:
            self._sources[("gpu",)] = list(self._gpu_decisions(now))
        budgeted = {s.policy.tenant_id for s in self.budgets.values() if s.policy.scope == "tenant"}
        for tenant in self._tenants_seen if full else [k[1] for k in dirty if k[0] == "live"]:
            self._sources[("live", tenant)] = [] if tenant in budgeted else [self._liveness(now, tenant)]
        merged: dict[str, ThrottleDecision] = {}
        for decisions in self._sources.values():
            for d in decisions:
                merged[d.key] = _stricter(merged[d.key], d) if d.key in merged else d
        return merged

    def _decision(self, now: datetime, **fields) -> ThrottleDecision:
        previous = self._published.get(decision_key(fields["scope"], fields["scope_id"], fields.get("priority")))
        decision = ThrottleDecision(decision_id=new_id(), issued_at=now, expires_at=now + self.config.decision_ttl, **fields)
        if previous and previous[0] == _signature(decision):
            return decision.model_copy(update={"decision_id": previous[1].decision_id})
        return decision

    def _liveness(self, now: datetime, tenant: str) -> ThrottleDecision:
        """An `allow` for a tenant seen without a budget, so fail-closed guards know we are alive."""
        return self._decision(now, tenant_id=tenant, scope="tenant", scope_id=tenant, action="allow",
                              reason="no budget applies; allocator is live")

    def _budget_decisions(self, state: BudgetState, now: datetime) -> Iterable[ThrottleDecision]:
        p, cfg = state.policy, self.config
        remaining = state.remaining
        left = max(Decimal("1"), Decimal((state.end - now).total_seconds()))
        allowed_rate = self._allowed_rate(state, now, remaining, left)
        rate, events_rate = state.rate(now, cfg.rate_window)
        forecast = _forecast(now, remaining, rate)
        pace = rate / allowed_rate if allowed_rate > 0 else (Decimal("Infinity") if rate > 0 else ZERO)
        headroom = p.amount * cfg.headroom_pct / 100
        leased = p.hard and p.unit == "usd" and bool(self._under(state))
        if leased:   # its leases pace it and keep what critical/high need: no static headroom, no rate throttle
            headroom = min(headroom, self._pool(state, now).protected)
        near = forecast is not None and forecast - now <= cfg.forecast_horizon
        # along a pacing curve "hot" is spending faster than the curve allows now; on the straight line it is the
        # same thing: exhaustion forecast before the period ends
        curved = plan_share(self.pacing.get(p.policy_id), state.start, state.end, now) is not None
        hot = (pace > 1 if curved else forecast is not None and forecast < state.end) and not leased
        starter = self._starter(state, now) if p.hard and p.unit == "usd" else None
        used_pct = state.spent * 100 / p.amount
        for priority in PRIORITIES:
            action, why = self._class_action(p, priority, remaining, headroom, hot, near)
            if action == "deny" and not p.hard:
                action = "throttle"
            limits, model = DecisionLimits(), None
            if action == "throttle":
                limits = self._throttle_limits(state, priority, events_rate, pace)
            source = None
            if action == "downgrade":
                model, source, note = self._downgrade_model(p)
                action = "downgrade" if model else "throttle"
                why += f"; {note}" if note else ""
                if action == "throttle":
                    limits = self._throttle_limits(state, priority, events_rate, pace)
            reason = (f"{p.scope} {p.scope_id}: {why}; {used_pct:.1f}% of {p.amount} {p.unit} used, "
                      f"pace {_ratio(pace)} of allowed") + (f", exhaustion forecast {forecast:%Y-%m-%dT%H:%M:%SZ}" if forecast else "")
            yield self._decision(
                now, tenant_id=p.tenant_id, scope=p.scope, scope_id=p.scope_id, priority=priority, action=action,
                limits=limits, max_model=model, downgraded_from=source, reason=reason[:2048], policy_id=p.policy_id,
                budget_remaining_usd=usd(remaining) if p.unit == "usd" else None,
                forecast_exhaustion_ts=forecast, reset_at=state.end, session_lease_usd=starter)

    def _class_action(self, p: BudgetPolicy, priority: Priority, remaining: Decimal, headroom: Decimal,
                      hot: bool, near: bool) -> tuple[Action, str]:
        exceed = p.actions.get(priority, "throttle")
        if remaining <= 0:
            return exceed, f"budget exhausted, {priority} gets {exceed}"
        if priority in PROTECTED:
            return "allow", f"headroom reserved for {priority}"
        if remaining < headroom:
            return exceed if SEVERITY[exceed] > 0 else "throttle", "in the headroom reserved for critical/high"
        if hot and (priority in ("low", "batch") or near):
            return "throttle", "spending faster than the budget allows" + (" (exhaustion near)" if near else "")
        return "allow", "within pace"

    def _throttle_limits(self, state: BudgetState, priority: Priority, events_rate: Decimal, pace: Decimal) -> DecisionLimits:
        """Requests/min per guard that would bring the scope back to its allowed pace, less for lower classes."""
        share = {"critical": Decimal(1), "high": Decimal(1), "normal": Decimal("0.5"), "low": Decimal("0.25"), "batch": Decimal("0.1")}[priority]
        per_min = events_rate * 60 * share
        if pace > 1 and pace.is_finite():
            per_min /= pace
        sessions = max(1, sum(1 for lease in self.leases.values() if is_within(lease.session_id, state.policy.scope_id)
                              and not self._idle(lease, self.clock())))
        return DecisionLimits(requests_per_min=max(1, int(per_min / sessions)))

    # ---- SLO-aware downgrade and pacing curves (allocator/slo.py) --------------------------------
    def load_model_stats(self, table: StatsTable) -> None:
        """The measured (scope, model) figures SLO downgrades check; the service refreshes them from the ledger."""
        self.model_stats = dict(table)
        self._last_full = None

    def set_pacing(self, policy_id: str, curve: Curve | None) -> None:
        """A budget's pacing curve for its current period (None: the straight line)."""
        if curve is None:
            self.pacing.pop(policy_id, None)
        else:
            self.pacing[policy_id] = curve
        self._last_full = None

    def _downgrade_model(self, p: BudgetPolicy) -> tuple[str | None, str | None, str]:
        """(cheaper model, the model it replaces, why). Without an SLO: the tier's next model down; with
        one: a cheaper model whose measured figures for this scope meet it (pick_downgrade), else none."""
        if not self.downgrade_for:
            return None, None, ""
        model = self.primary_model(p.scope, p.scope_id) if self.primary_model else self._measured_primary(p.scope_id)
        if not model:
            return None, None, ""
        if p.slo is None:
            target = self.downgrade_for(model)
            return target, model if target else None, ""
        stats: Callable[[str], ModelStats | None] = lambda m: self.model_stats.get((p.scope_id, m))  # noqa: E731
        target, note = pick_downgrade(p.slo, model, tier_below(model, self.downgrade_for), stats)
        return target, model if target else None, note

    def _measured_primary(self, scope_id: str) -> str | None:
        """The model the scope spent most on in the measured stats (when no primary-model lookup is injected)."""
        mine = [(st.cost_usd, m) for (sid, m), st in self.model_stats.items() if sid == scope_id]
        return max(mine)[1] if mine else None

    def _allowed_rate(self, state: BudgetState, now: datetime, remaining: Decimal, left: Decimal) -> Decimal:
        """The spend rate the plan allows now: what is left spread over the rest of the period, along the budget's
        pacing curve over the recent rate window (the straight line without one: remaining / time left). A quiet
        hour of the curve still allows a quarter of the straight line: the curve says when spend is usual, it
        does not forbid it elsewhere."""
        straight = max(ZERO, remaining) / left
        curve = self.pacing.get(state.policy.policy_id)
        lo, hi = max(state.start, now - self.config.rate_window), now
        if hi <= lo:
            hi = min(state.end, now + self.config.rate_window)
        s_lo, s_hi = plan_share(curve, state.start, state.end, lo), plan_share(curve, state.start, state.end, hi)
        s_now = plan_share(curve, state.start, state.end, now)
        if s_lo is None or s_hi is None or s_now is None or s_now >= 1 or hi <= lo:
            return straight
        along = max(ZERO, remaining) * (s_hi - s_lo) / (1 - s_now) / Decimal((hi - lo).total_seconds())
        return max(along, straight / 4)

    # ---- alerts -------------------------------------------------------------------------
    def _check_alerts(self, state: BudgetState, now: datetime) -> None:
        p = state.policy
        used_pct = state.spent * 100 / p.amount
        for threshold in sorted(p.alert_thresholds_pct):
            if used_pct >= threshold and threshold not in state.fired:
                state.fired.add(threshold)
                severity = "critical" if threshold >= 100 else "warning" if threshold >= 80 else "info"
                self._alerts.append(Anomaly(
                    anomaly_id=new_id(), ts=now, kind="budget_threshold", severity=severity, tenant_id=p.tenant_id,
                    scope=p.scope, scope_id=p.scope_id, window_start=state.start, window_end=state.end,
                    evidence={"policy_id": p.policy_id, "threshold_pct": str(threshold), "spent": str(state.spent),
                              "amount": str(p.amount), "unit": p.unit, "period_start": state.start.isoformat()},
                    message=f"{p.scope} {p.scope_id} used {used_pct:.1f}% of its {p.period} budget {p.policy_id} "
                            f"({state.spent} of {p.amount} {p.unit}); crossed {threshold}%"))

    # ---- spend leases -------------------------------------------------------------------
    def _hard_ancestors(self, scope_id: str) -> list[BudgetState]:
        return [s for _, sid in lineage(scope_id) for s in self._by_level.get(level_key(sid), ())
                if s.policy.hard and s.policy.unit == "usd"]

    def _lease_for(self, session_id: str, now: datetime) -> Lease | None:
        # one lease per session, whether its guard's announcement (a path id) or a spend job's bare id came first
        session_id = self._lease_ids.setdefault(level_key(session_id), session_id)
        hard = self._hard_ancestors(session_id)
        if not hard:
            self.leases.pop(session_id, None)
            return None
        for s in hard:
            s.roll(now)
        epoch, epoch_end = max(s.start for s in hard), min(s.end for s in hard)
        lease = self.leases.get(session_id)
        if lease is None or lease.epoch != epoch:
            lease = Lease(session_id, epoch, epoch_end, spent=self._windows_sum(session_id, epoch), first_seen=now)
            self.leases[session_id] = lease
        return lease

    def _idle(self, lease: Lease | None, now: datetime) -> bool:
        return lease is None or lease.last_seen is None or now - lease.last_seen > self.config.lease_idle

    def _under(self, state: BudgetState) -> list[Lease]:
        return [lease for lease in self.leases.values() if is_within(lease.session_id, state.policy.scope_id)]

    def _pool(self, state: BudgetState, now: datetime) -> Pool:
        """What one hard budget may still grant, computed once per render (O(sessions)).

        Grants made during the render are taken off the cached value, which stays
        conservative (the starter reserve is not shrunk with them).
        """
        pool = self._pools.get(state.policy.policy_id)
        if pool is None:
            pool = self._pools[state.policy.policy_id] = self._compute_pool(state, now)
        return pool

    def _commit(self, hard: list[BudgetState], amount: Decimal) -> None:
        for s in hard:
            if (pool := self._pools.get(s.policy.policy_id)) is not None:
                pool.any -= amount
                pool.paced -= amount
                pool.period -= amount

    def _compute_pool(self, state: BudgetState, now: datetime) -> Pool:
        amount, leases = state.policy.amount, self._under(state)
        spent = max(state.spent, sum((lease.spent for lease in leases), ZERO))
        committed = spent + sum((lease.outstanding for lease in leases), ZERO)
        uncommitted = max(ZERO, amount - committed)
        reserve = uncommitted * self.config.starter_pct / 100
        cost, events = sum((c for _, c, _ in state.recent), ZERO), sum(e for _, _, e in state.recent)
        call = cost / events if events else ZERO
        # critical/high keep free the calls they are expected to make in the time left (at their rate
        # so far, plus 2.33 sigma: 99 %), and two calls more for a dear one
        prot = [lease for lease in leases if lease.priority in PROTECTED]
        prot_spent, prot_events = sum((lease.spent for lease in prot), ZERO), sum(lease.events for lease in prot)
        prot_call = prot_spent / prot_events if prot_events else call
        elapsed = Decimal(max(60.0, (now - state.start).total_seconds()))
        left = Decimal(max(0.0, (state.end - now).total_seconds()))
        expected = prot_events / elapsed * left
        protected = (expected + Decimal("2.33") * expected.sqrt() + 2) * prot_call if prot else ZERO
        lower_cap = amount - protected
        # the plan: the budget spread evenly over the period, one look-ahead from now
        period = Decimal((state.end - state.start).total_seconds())
        ahead = Decimal(min(period, (now - state.start + self.config.pacing_lookahead).total_seconds()))
        plan = amount * ahead / period if period > 0 else amount
        curved = plan_share(self.pacing.get(state.policy.policy_id), state.start, state.end, now + self.config.pacing_lookahead)
        if curved is not None:   # the plan follows the budget's pacing curve (allocator/slo.py)
            plan = amount * curved
        live = [lease for lease in leases if not self._idle(lease, now)]
        # commitments run ahead of spend by about a call per live session (at most one more look-ahead)
        working = min(sum((self._call_cost(lease, call) for lease in live if lease.priority not in PROTECTED), ZERO),
                      amount * Decimal(self.config.pacing_lookahead.total_seconds()) / period if period > 0 else amount)
        return Pool(any=uncommitted - reserve, paced=min(plan + working, lower_cap) - committed - reserve,
                    period=lower_cap - committed - reserve, reserve=reserve, protected=protected, call=call,
                    live=len(live), held=sum((lease.outstanding for lease in leases if lease.priority not in PROTECTED), ZERO),
                    returnable=sum((lease.outstanding for lease in leases if lease.need <= lease.limit or self._idle(lease, now)), ZERO),
                    shared=bool(prot))

    def _starter(self, state: BudgetState, now: datetime) -> Decimal:
        """What an unseen session may spend: the reserve split over max(slots, live sessions).

        No floor: when that covers no call, the guard announces itself and waits for a lease.
        """
        pool = self._pool(state, now)
        self._max_starter(state, now)   # prune
        starter = usd(pool.reserve / max(self.config.lease_slots, pool.live))
        state.starters.append((now + 2 * self.config.decision_ttl, starter))
        return starter

    def _hold_out(self, lease: Lease, hard: list[BudgetState], pools: list[Pool], now: datetime) -> bool:
        """The last of a budget: a lower-class call that would leave the period an unusably small
        rest (below the cheapest call seen, above an eighth of it) waits for a dearer one while
        there is time, so the budget ends used rather than stranded."""
        shortfall = lease.need - lease.limit
        for s, p in zip(hard, pools):
            rest = p.period + p.held - shortfall - lease.outstanding   # what lower classes could spend after this call
            if (s.smallest_need is not None and s.smallest_need / 8 < rest < s.smallest_need
                    and s.end - now > self.config.pacing_lookahead):
                return True
        return False

    @staticmethod
    def _out_of_reach(lease: Lease, pools: list[Pool]) -> bool:
        """Its waiting call fits neither what is uncommitted nor that plus what may still come back (the rest
        of a session not itself waiting lapses once it goes idle; a waiting one keeps its scrap): no top-up
        can come this period, so it is denied now rather than its guard waiting out lease_timeout for one."""
        return lease.need > lease.limit and lease.need - lease.limit > min(p.any + p.returnable for p in pools)

    @staticmethod
    def _call_cost(lease: Lease, default: Decimal) -> Decimal:
        """Its mean call so far, else the call it waits to fit, else the budget's mean call."""
        if lease.events:
            return lease.spent / lease.events
        return lease.need - lease.spent if lease.need > lease.spent else default

    def _grant_order(self, session_id: str) -> tuple[int, Decimal, Decimal]:
        lease = self.leases.get(session_id)
        if lease is None:
            return len(PRIORITIES), ZERO, ZERO
        # the largest waiting call that fits first (little waste at the end), then the fullest lease
        # (scraps go to one session, not spread thin)
        return PRIORITIES.index(lease.priority), -max(ZERO, lease.need - lease.limit), -lease.outstanding

    def _max_starter(self, state: BudgetState, now: datetime) -> Decimal:
        """The largest starter a guard may still be drawing on (published within two TTLs)."""
        while state.starters and state.starters[0][0] < now:
            state.starters.popleft()
        return max((v for _, v in state.starters), default=ZERO)

    def _lease_due(self, session_id: str, now: datetime) -> bool:
        """Worth re-evaluating on a full pass: gone, idle, past its period, or running low."""
        lease = self.leases.get(session_id)
        return (lease is None or self._idle(lease, now) or now >= lease.epoch_end or lease.last_grant == 0 or lease.limit < lease.need
                or lease.outstanding < lease.last_grant / 2 or self._published.get(decision_key("session", session_id, None)) is None)

    def _lease_decisions(self, now: datetime, session_id: str) -> Iterable[ThrottleDecision]:
        lease = self._lease_for(session_id, now)
        if lease is None:
            return
        if self._idle(lease, now):
            # An idle session's lease is not renewed: it lives until the copy guards hold expires
            # (re-rendering must not extend it, or its commitment would never be released).
            published = self._published.get(decision_key("session", session_id, None))
            if published is None or now >= published[1].expires_at:
                lease.limit, lease.live_until = lease.spent, None   # lapsed: release what it did not spend
                return
            lease.live_until = published[1].expires_at
            yield published[1]
            return
        decision = self._grant(lease, now)
        lease.live_until = decision.expires_at
        yield decision

    def _grant(self, lease: Lease, now: datetime) -> ThrottleDecision:
        """Top the session's ceiling up from the tightest ancestor's pool for its class.

        A ceiling is never lowered (a guard may already spend against it); a session that
        had no live lease is first charged the largest starter it could have drawn. A
        session the plan cannot top up now keeps its ceiling and waits; it is denied when
        nothing is left for its class for the rest of the period, or (module docstring) when
        what is left is out of reach of the call it waits for.
        """
        hard = self._hard_ancestors(lease.session_id)
        pools = [self._pool(s, now) for s in hard]
        if lease.live_until is None:
            uncommitted = min(p.any + p.reserve for p in pools)   # never book past the budget
            starter = max(ZERO, min(max(self._max_starter(s, now) for s in hard), uncommitted))
            charged = max(lease.limit, lease.spent + starter)
            self._commit(hard, charged - lease.limit)
            lease.limit = charged
        protected = lease.priority in PROTECTED
        call_cost = self._call_cost(lease, max(p.call for p in pools))
        # two calls ahead; critical/high one (they may draw on the reserve any time)
        min_grant = max((1 if protected else 2) * call_cost, min(s.policy.amount for s in hard) / 10**6)
        if lease.last_grant == 0 or lease.outstanding < max(lease.last_grant / 2, min_grant) or lease.limit < lease.need:
            waiting = lease.need > lease.limit
            # critical/high top up ahead of need only from beyond their reserve: it stays free for the call that waits
            now_left = min((p.any if waiting else p.any - p.protected) if protected else p.paced for p in pools)
            # sized from the paced pool for every class, so critical/high do not take the pace from the rest
            fair = max(ZERO, min(p.paced for p in pools)) / max(max(p.live for p in pools), self.config.lease_slots)
            age = max(self.config.lease_refill, now - (lease.first_seen or now))
            refill = lease.spent * Decimal(self.config.lease_refill / age)   # its rate x the refill time
            grant = usd(min(max(fair, min_grant, lease.need - lease.limit, refill), now_left))
            if lease.need - lease.limit > now_left or (not protected and self._hold_out(lease, hard, pools, now)):
                grant = ZERO   # its waiting call cannot fit (or fits badly): leave what is there to one that does
            if grant > 0:
                lease.limit += grant
                lease.last_grant = grant
                self._commit(hard, grant)
        binding = min(hard, key=lambda s: self._pool(s, now).any)
        period_left = min(p.any if protected else p.period for p in pools)
        # out of calls, and the period's rest cannot make up the call a lower class waits for: denied, so it
        # gives its rest back where `release` takes it (a scrap left uncommitted kept it at 'allow' on a rest a
        # cheaper session waited for: the demo's hooli ended 86-88 % used in a third of the runs)
        scrap = not protected and not any(p.shared for p in pools) and period_left < lease.need - lease.limit
        exhausted = lease.outstanding < max(call_cost, min_grant / 2) and (period_left <= 0 or scrap)
        unreachable = protected and not exhausted and self._out_of_reach(lease, pools)
        return self._decision(
            now, tenant_id=tenant_of(lease.session_id), scope="session", scope_id=lease.session_id,
            action="deny" if exhausted or unreachable else "allow", policy_id=binding.policy.policy_id,
            reason=(f"hard budget {binding.policy.policy_id} is fully committed" + ("" if protected else " or kept for critical/high")
                    if exhausted else f"hard budget {binding.policy.policy_id}: what is left this period cannot fit "
                    "the call this session waits for" if unreachable else f"spend lease under hard budget {binding.policy.policy_id}"),
            spend_limit_usd=usd(lease.limit), spent_usd=usd(lease.spent), budget_remaining_usd=usd(lease.outstanding),
            reset_at=lease.epoch_end)

    # ---- GPU capacity -------------------------------------------------------------------
    def _gpu_decisions(self, now: datetime) -> Iterable[ThrottleDecision]:
        if self.gpu.capacity == 0:
            return
        nominal, usage = self._gpu_quotas(), self.gpu.usage()
        waiters = {t for t, _, _ in self.gpu_waits.waits.values()}
        pending = {t: self._pending_gpus(t, now) for t in set(nominal) | set(usage) | waiters}
        reclaims, reclaimed = self._idle_reclaims(now, usage, pending)
        yield from reclaims
        if not nominal:
            return
        usage = self.gpu.usage(skip=reclaimed)   # being given back: not reclaimed twice
        idle = self.gpu.idle(now, self.config.gpu_idle_for, skip=reclaimed)
        demand = {t: usage.get(t, ZERO) - idle.get(t, ZERO) + pending[t] for t in pending}
        shares = fair_shares(self.gpu.capacity, nominal, self.config.gpu_weights or nominal, demand)
        contended = sum(usage.values(), ZERO) + sum(pending.values(), ZERO) > self.gpu.capacity  # someone waits
        for tenant, used in usage.items():
            if used <= 0:
                continue
            quota = nominal.get(tenant, ZERO)
            share = max(shares.get(tenant, ZERO), min(quota, used - idle.get(tenant, ZERO)))
            if contended and used > share:
                give_back = used - share
                reason = (f"tenant {tenant}: reclaim {give_back:.2f} GPUs (holds {used:.2f}, fair share {share:.2f}, "
                          f"quota {quota:.2f}" + (f", {idle[tenant]:.2f} idle" if idle.get(tenant) else "") + "); batch first")
                yield self._decision(now, tenant_id=tenant, scope="tenant", scope_id=tenant, priority="batch", action="preempt",
                                     limits=DecisionLimits(max_concurrent=int(share)), reason=reason)
            elif contended and used >= share and pending[tenant] > 0:
                # at its share while others wait: lifting the preempt here would hand it the next free GPU
                # again and preempt it a sample later (found by the simulator's gpu-backlogged scenario)
                yield self._decision(now, tenant_id=tenant, scope="tenant", scope_id=tenant, priority="batch", action="queue",
                                     limits=DecisionLimits(max_concurrent=int(share)),
                                     reason=f"tenant {tenant}: at its fair share {share:.2f} GPUs while others wait; new batch work waits")
            elif used > quota:
                yield self._decision(now, tenant_id=tenant, scope="tenant", scope_id=tenant, priority="batch", action="allow",
                                     reason=f"tenant {tenant}: borrowing {used - quota:.2f} idle GPUs above quota {quota:.2f}")

    def _idle_reclaims(self, now: datetime, usage: dict[str, Decimal],
                       pending: dict[str, Decimal]) -> tuple[list[ThrottleDecision], set[str]]:
        """Idle -> busy: a holder (session, else agent) whose GPUs have all been idle for
        `gpu_reclaim_idle_for` while other tenants wait for more GPUs than are free gets `preempt`
        on its own scope, longest idle first, until the waiting demand is covered. Only idle
        holders: busy work is never stopped here, inside a quota or not (an idle GPU inside a
        tenant's guaranteed share is reclaimed: it is not using it); the borrowing rules below
        still decide the rest. Returns the decisions and the holders told to give their GPUs back."""
        after = self.config.gpu_reclaim_idle_for
        free = max(ZERO, self.gpu.capacity - sum(usage.values(), ZERO))
        holders: dict[str, list] = {}
        for h in self.gpu.holdings.values():
            if h.holder:
                holders.setdefault(h.holder, []).append(h)
        idle = sorted((min(h.idle_since for h in hs), holder, hs) for holder, hs in holders.items()
                      if all(h.idle_since is not None and now - h.idle_since >= after for h in hs))
        out: list[ThrottleDecision] = []
        given, released = ZERO, set()
        for since, holder, hs in idle:
            tenant, gpus = hs[0].tenant_id, sum((h.gpus for h in hs), ZERO)
            others = {t: p for t, p in pending.items() if t != tenant and p > 0}
            waiting = sum(others.values(), ZERO) - free - given
            if waiting <= 0:
                continue
            given += gpus
            released.add(holder)
            out.append(self._decision(
                now, tenant_id=tenant, scope=scope_of(holder), scope_id=holder, action="preempt",
                limits=DecisionLimits(max_concurrent=0),
                reason=(f"idle GPU reclaim: {holder} holds {gpus:.2f} GPUs idle since {since:%Y-%m-%dT%H:%M:%SZ} "
                        f"(threshold {after.total_seconds():.0f} s) while {', '.join(sorted(others))} wait for "
                        f"{waiting:.2f} GPUs; release them")))
        return out, released

    def _gpu_quotas(self) -> dict[str, Decimal]:
        """Nominal GPUs per tenant = its tenant GPU-hour budget spread over the period."""
        quotas: dict[str, Decimal] = {}
        for s in self.budgets.values():
            if s.policy.unit == "gpu_hours" and s.policy.scope == "tenant":
                hours = Decimal((s.end - s.start).total_seconds()) / 3600
                quotas[s.policy.tenant_id] = quotas.get(s.policy.tenant_id, ZERO) + s.policy.amount / hours
        return quotas

    # ---- bookkeeping --------------------------------------------------------------------
    def _budgets_on(self, scope_id: str) -> list[BudgetState]:
        return self._by_level.get(level_key(scope_id), [])

    def _windows_sum(self, scope_id: str, since: datetime) -> Decimal:
        return sum((c for c, _, end in self._windows.get(level_key(scope_id), {}).values() if end > since), ZERO)

    def _spend_in_memory(self, policy: BudgetPolicy, since: datetime) -> Decimal:
        return sum((in_unit(policy.unit, v[0], v[1]) for v in self._windows.get(level_key(policy.scope_id), {}).values() if v[2] > since), ZERO)

    def _forget_old_windows(self, now: datetime) -> None:
        horizon = now - self.config.window_memory
        for scope_id, windows in list(self._windows.items()):
            for start in [s for s, (_, _, end) in windows.items() if end < horizon]:
                del windows[start]
            if not windows:
                del self._windows[scope_id]


def _signature(d: ThrottleDecision) -> tuple:
    """What makes a decision different for a guard (remaining budget alone does not)."""
    return (d.action, d.limits, d.max_model, d.policy_id, d.reset_at, d.spend_limit_usd, _coarse(d.session_lease_usd),
            d.action == "deny" and d.reason)


def _coarse(x: Decimal | None) -> Decimal | None:
    """Two significant digits: a starter allowance that drifts a little is not a new decision."""
    return None if x is None or x == 0 else Decimal(f"{x:.1e}")


def _stricter(a: ThrottleDecision, b: ThrottleDecision) -> ThrottleDecision:
    """Two rules for one key: the more severe action wins; leases keep the smaller allowance."""
    first, second = (a, b) if SEVERITY[a.action] >= SEVERITY[b.action] else (b, a)
    lease = [x for x in (a.session_lease_usd, b.session_lease_usd) if x is not None]
    same = first.action == second.action
    return first.model_copy(update={
        "session_lease_usd": min(lease) if lease else None,
        "reason": f"{first.reason}; {second.reason}"[:2048] if same else first.reason,
        "limits": _min_limits(first.limits, second.limits) if first.action == second.action else first.limits})


def _min_limits(a: DecisionLimits, b: DecisionLimits) -> DecisionLimits:
    pick = lambda x, y: y if x is None else x if y is None else min(x, y)  # noqa: E731
    return DecisionLimits(tokens_per_min=pick(a.tokens_per_min, b.tokens_per_min),
                          requests_per_min=pick(a.requests_per_min, b.requests_per_min),
                          max_concurrent=pick(a.max_concurrent, b.max_concurrent))


def _holder(sample: GpuSample) -> str:
    """The scope a process row's GPU is held by: its session, else its agent ('' when coarser)."""
    if sample.level != "process" or not sample.tenant_id:
        return ""
    scope, scope_id = list(scope_ids(sample.tenant_id, sample.team, sample.project, sample.agent_id, sample.session_id).items())[-1]
    return scope_id if scope in ("session", "agent") else ""


def _nanos(x: Decimal) -> int:
    """Nano-USD rounded up, as a guard compiles a ceiling (guard.to_nanos)."""
    return int((x * 10**9).to_integral_value(rounding=ROUND_CEILING))


def _forecast(now: datetime, remaining: Decimal, rate: Decimal) -> datetime | None:
    """When the budget runs out at the recent rate (now if it already has; None if not within 10 years)."""
    if remaining <= 0:
        return now
    if rate <= 0 or remaining / rate > 10 * 365 * 86400:
        return None
    return now + timedelta(seconds=float(remaining / rate))  # a time, not money


def _ratio(pace: Decimal) -> str:
    return "∞" if not pace.is_finite() else f"{pace:.2f}x"
