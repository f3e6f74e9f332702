"""The decision engine as pure logic, with a controllable clock (no Kafka)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import given, settings as hsettings, strategies as st

from meterline.allocator.budgets import apply_policy_record
from meterline.allocator.engine import Engine, EngineConfig
from meterline.allocator.gpu import fair_shares
from meterline.allocator.periods import period_bounds
from meterline.allocator.simulate import spend_update
from meterline.schemas.events import PRIORITIES, BudgetPolicy, GpuSample, new_id

D = Decimal
UTC = timezone.utc
START = datetime(2026, 6, 1, tzinfo=UTC)   # a month budget's period start


class Clock:
    def __init__(self, at: datetime):
        self.now = at

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw) -> None:
        self.now += timedelta(**kw)


def policy(scope_id: str = "acme", amount: str = "100", **kw) -> BudgetPolicy:
    scope = ("tenant", "team", "project", "agent", "session")[scope_id.count("/")]
    return BudgetPolicy(policy_id=kw.pop("policy_id", f"p-{scope_id}"), tenant_id="acme", scope=scope, scope_id=scope_id,
                        amount=D(amount), created_at=START, **kw)


def engine(clock: Clock, *policies: BudgetPolicy, **kw) -> Engine:
    e = Engine(EngineConfig(**kw.pop("config", {})), clock=clock, **kw)
    for p in policies:
        e.apply_policy(p)
    return e


def spend(e: Engine, clock: Clock, scope_id: str, cost: str, seconds: float = 60, events: int = 1) -> None:
    """One window of spend; the contract's `events` is period-to-date, so keep a running count."""
    counts = e.__dict__.setdefault("_test_events", {})
    counts[scope_id] = counts.get(scope_id, 0) + events
    end = clock.now
    e.apply_spend(spend_update(scope_id, end - timedelta(seconds=seconds), end, D(cost), counts[scope_id]))


def actions(e: Engine, scope_id: str = "acme") -> dict[str, str]:
    e.decide()
    return {d.priority: d.action for _, (_, d) in e._published.items() if d.scope_id == scope_id and d.priority}


def latest(e: Engine, key: str):
    return e._published[key][1]


# ---- priorities, pacing, forecast ------------------------------------------------------

def test_under_budget_pressure_low_and_batch_are_throttled_while_critical_runs():
    clock = Clock(START + timedelta(days=15))             # half the month left
    e = engine(clock, policy(amount="100"))
    assert set(actions(e).values()) == {"allow"}
    for _ in range(5):                                     # $0.01/min ≈ 2.2x the allowed $100 / 15 days
        clock.advance(minutes=1)
        spend(e, clock, "acme", "0.01", events=100)
    got = actions(e)
    assert got["critical"] == got["high"] == got["normal"] == "allow"
    assert got["low"] == got["batch"] == "throttle"
    assert 1 < latest(e, "tenant:acme:batch").limits.requests_per_min < latest(e, "tenant:acme:low").limits.requests_per_min
    clock.advance(minutes=1)
    spend(e, clock, "acme", "91")                          # into the 10 % headroom kept for critical/high
    got = actions(e)
    assert got["critical"] == got["high"] == "allow"
    assert got["normal"] == "throttle" and got["low"] == got["batch"] == "deny"


def test_pacing_follows_the_recent_rate_with_a_controllable_clock():
    clock = Clock(START + timedelta(days=10))
    e = engine(clock, policy(amount="300", actions={p: "deny" for p in PRIORITIES}))
    for _ in range(10):                                    # $1/min; allowed ≈ $300 / 21 days ≈ $0.01/min
        clock.advance(minutes=1)
        spend(e, clock, "acme", "1")
    assert actions(e)["low"] == "throttle"
    d = latest(e, "tenant:acme:low")
    expected = clock.now + timedelta(minutes=290)          # $290 left at $1/min
    assert abs(d.forecast_exhaustion_ts - expected) < timedelta(minutes=1)
    assert d.budget_remaining_usd == D("290")
    clock.advance(minutes=10)                              # quiet: the recent rate falls out of the window
    assert set(actions(e).values()) == {"allow"}


def test_forecast_acts_on_normal_before_the_cap():
    clock = Clock(START + timedelta(days=1))
    e = engine(clock, policy(amount="1000"), config={"forecast_horizon": timedelta(hours=1)})
    clock.advance(minutes=5)
    spend(e, clock, "acme", "400", seconds=300)            # $80/min: $600 left lasts 7.5 min
    got = actions(e)
    assert got["normal"] == "throttle", "normal is throttled while 60 % of the budget is still there"
    assert latest(e, "tenant:acme:normal").forecast_exhaustion_ts < clock.now + timedelta(hours=1)
    assert got["critical"] == "allow"


def test_soft_budgets_never_deny():
    clock = Clock(START + timedelta(days=1))
    e = engine(clock, policy(amount="10", hard=False, actions={p: "deny" for p in PRIORITIES}))
    spend(e, clock, "acme", "20")
    assert set(actions(e).values()) == {"throttle"}


def test_downgrade_names_a_cheaper_model_from_the_injected_catalog():
    clock = Clock(START + timedelta(days=1))
    e = engine(clock, policy(amount="10", actions={"critical": "allow", "high": "downgrade", "normal": "downgrade",
                                                  "low": "deny", "batch": "deny"}),
               downgrade_for={"gpt-4o": "gpt-4o-mini"}.get, primary_model=lambda scope, sid: "gpt-4o")
    spend(e, clock, "acme", "11")
    assert actions(e)["high"] == "downgrade"
    assert latest(e, "tenant:acme:high").max_model == "gpt-4o-mini"
    e.primary_model = lambda scope, sid: None              # nothing to step down to: throttle instead
    clock.advance(seconds=1)                               # looked up again at the next full evaluation
    assert actions(e)["high"] == "throttle"


# ---- alerts ------------------------------------------------------------------------------

def test_alerts_fire_once_per_threshold_per_period():
    clock = Clock(datetime(2026, 6, 10, 12, tzinfo=UTC))
    e = engine(clock, policy(amount="100", period="day", alert_thresholds_pct=[50, 80, 100]))
    spend(e, clock, "acme", "55")
    first = e.decide().alerts
    assert [a.evidence["threshold_pct"] for a in first] == ["50"]
    assert first[0].kind == "budget_threshold" and first[0].evidence["policy_id"] == "p-acme"
    clock.advance(minutes=1)
    spend(e, clock, "acme", "1")
    assert e.decide().alerts == []                          # 56 %: nothing new
    clock.advance(minutes=1)
    spend(e, clock, "acme", "50")
    assert [a.evidence["threshold_pct"] for a in e.decide().alerts] == ["80", "100"]
    clock.advance(days=1)                                   # next day: a new period, alerts re-arm
    spend(e, clock, "acme", "60")
    assert [a.evidence["threshold_pct"] for a in e.decide().alerts] == ["50"]


def test_a_re_sent_window_counts_once():
    clock = Clock(START + timedelta(days=1))
    e = engine(clock, policy(amount="100"))
    end = clock.now
    for cost in ("3", "5", "5"):                             # the same minute re-sent as it grows
        e.apply_spend(spend_update("acme", end - timedelta(minutes=1), end, D(cost)))
    assert e.budgets["p-acme"].spent == D("5")


# ---- periods -----------------------------------------------------------------------------

def test_periods_are_computed_in_the_budgets_zone():
    berlin = policy(period="day", timezone="Europe/Berlin")
    start, end = period_bounds(berlin, datetime(2026, 3, 29, 12, tzinfo=UTC))   # DST starts: a 23 h day
    assert (start, end - start) == (datetime(2026, 3, 28, 23, tzinfo=UTC), timedelta(hours=23))
    monthly = policy(period="month", period_anchor=datetime(2026, 1, 31, 9, tzinfo=UTC))
    assert period_bounds(monthly, datetime(2026, 3, 1, tzinfo=UTC)) == (datetime(2026, 2, 28, 9, tzinfo=UTC),
                                                                      datetime(2026, 3, 31, 9, tzinfo=UTC))
    weekly = policy(period="week", period_anchor=datetime(2026, 6, 3, tzinfo=UTC))      # Wednesdays
    assert period_bounds(weekly, datetime(2026, 6, 15, tzinfo=UTC))[0] == datetime(2026, 6, 10, tzinfo=UTC)
    custom = policy(period="custom", period_anchor=START, period_seconds=3600)
    assert period_bounds(custom, START + timedelta(minutes=150)) == (START + timedelta(hours=2), START + timedelta(hours=3))


# ---- hierarchy and leases -----------------------------------------------------------------

def test_a_team_budget_inside_a_tenant_budget_binds_its_sessions():
    clock = Clock(START + timedelta(days=1))
    e = engine(clock, policy("acme", "1000"), policy("acme/research", "10"))
    sessions = [f"acme/research/chat/bot/s{i}" for i in range(5)] + ["acme/ops/x/bot/s9"]
    for _ in range(30):
        for sid in sessions:
            spend(e, clock, sid, "0.01", seconds=1)
        e.decide()
        clock.advance(seconds=1)
    research = [e.leases[s].limit for s in sessions[:5]]
    assert sum(research) <= D("10"), "leases under the team never add up past the team budget"
    # outside the team it leases from the tenant's pool (paced: a day into the month, not all of it)
    assert e.leases["acme/ops/x/bot/s9"].limit > max(research), "a session outside the team leases from the tenant"
    spend(e, clock, "acme/research", "10.5")
    got = actions(e, "acme/research")
    assert got["low"] == "deny" and got["critical"] == "allow"
    assert actions(e, "acme")["low"] == "allow", "the tenant above is fine"


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 500)), min_size=1, max_size=80))
def test_committed_leases_never_exceed_a_hard_budget(calls):
    clock = Clock(START + timedelta(days=1))
    e = engine(clock, policy("acme", "20"))
    for session, cents in calls:
        lease = e.leases.get(f"acme/t/p/a/s{session}")
        cost = D(cents) / 100
        if lease is None or lease.spent + cost <= lease.limit or cost <= D("0.01"):   # obey the lease (or a starter call)
            spend(e, clock, f"acme/t/p/a/s{session}", str(min(cost, D("0.01")) if lease is None else cost), seconds=1)
        e.decide()
        clock.advance(seconds=1)
        assert sum(lease.limit for lease in e.leases.values()) <= D("20")


def test_spend_from_a_job_with_bare_ids_reaches_path_budgets():
    """A spend job that qualifies ids by tenant only ('research', 's-42') still feeds the budgets."""
    clock = Clock(START + timedelta(days=1))
    e = engine(clock, policy("acme", "100"), policy("acme/research", "10"))
    from meterline.schemas.events import SpendUpdate
    for scope, sid in (("team", "research"), ("session", "s-42"), ("tenant", "acme")):
        e.apply_spend(SpendUpdate(update_id=new_id(), ts=clock.now, tenant_id="acme", scope=scope, scope_id=sid,
                                  window_start=clock.now - timedelta(minutes=1), window_end=clock.now,
                                  window_cost_usd=D("2"), period_start=START, period_cost_usd=D("2"), events=1))
    assert e.budgets["p-acme/research"].spent == D("2") and e.budgets["p-acme"].spent == D("2")
    e.decide()
    assert "session:acme////s-42:*" in e._published   # the guard also looks its session up under this id


# ---- reconciliation --------------------------------------------------------------------

def test_reconciliation_corrects_the_stream_from_the_ledger():
    clock = Clock(START + timedelta(days=3))
    ledger = {"value": D("70")}
    e = engine(clock, policy(amount="100"), ledger_spend=lambda scope, sid, since: ledger["value"])
    spend(e, clock, "acme", "5")                          # a recent window, maybe not in the ledger yet
    e.reconcile()
    assert e.budgets["p-acme"].spent == D("75"), "ledger + recent windows (double counting errs toward throttling)"
    clock.advance(hours=1)
    ledger["value"] = D("40")                              # the stream had over-counted after a crash
    e.reconcile()
    assert e.budgets["p-acme"].spent == D("40")


# ---- GPU capacity ----------------------------------------------------------------------

def test_fair_shares_lend_idle_capacity_and_give_quota_back():
    nominal = {"a": D(4), "b": D(4)}
    assert fair_shares(D(8), nominal, nominal, {"a": D(8), "b": D(0)})["a"] == D(8)          # borrows all idle GPUs
    shares = fair_shares(D(8), nominal, nominal, {"a": D(8), "b": D(3)})
    assert shares == {"a": D(5), "b": D(3)}
    shares = fair_shares(D(8), nominal, {"a": D(3), "b": D(1)}, {"a": D(8), "b": D(8)})
    assert shares == {"a": D(4), "b": D(4)}, "quotas are guaranteed whatever the weights"
    shares = fair_shares(D(10), {"a": D(2), "b": D(2)}, {"a": D(3), "b": D(1)}, {"a": D(10), "b": D(10)})
    assert shares["a"] - D(2) == 3 * (shares["b"] - D(2)), "spare capacity is shared by weight"


def gpu(e: Engine, clock: Clock, level: str, uuid: str, tenant: str = "", util: int = 90) -> None:
    e.apply_gpu(GpuSample(sample_id=new_id(), ts=clock.now, node="n1", level=level, gpu_index=0, gpu_uuid=uuid,
                          interval_ms=1000, utilization_pct=util, tenant_id=tenant, attributed=bool(tenant)))


def test_gpu_borrowing_is_reclaimed_batch_first_never_in_quota():
    clock = Clock(datetime(2026, 6, 10, 12, tzinfo=UTC))
    month_hours = D(30 * 24)
    pending = {"b": D(0)}
    e = engine(clock, policy("acme", str(4 * month_hours), unit="gpu_hours", policy_id="gpu-a"),
               BudgetPolicy(policy_id="gpu-b", tenant_id="b", scope="tenant", scope_id="b", unit="gpu_hours",
                            amount=4 * month_hours, created_at=START),
               gpu_pending=lambda t: pending.get(t, D(0)))
    for i in range(8):
        gpu(e, clock, "gpu", f"g{i}")
        gpu(e, clock, "process", f"g{i}", tenant="acme" if i < 7 else "b")
    e.decide()
    assert latest(e, "tenant:acme:batch").action == "allow"            # borrowing 3 idle GPUs
    assert "borrowing" in latest(e, "tenant:acme:batch").reason
    pending["b"] = D(3)                                                 # b wants its quota back
    clock.advance(seconds=1)
    e.decide()
    d = latest(e, "tenant:acme:batch")
    assert d.action == "preempt" and d.limits.max_concurrent == 4       # back to its quota, not below
    assert latest(e, "tenant:acme:critical").action == "allow", "in-quota, higher-class work is never preempted"
    assert "tenant:b:batch" not in e._published or latest(e, "tenant:b:batch").action != "preempt"


def test_idle_gpus_are_reclaimed_when_someone_waits():
    clock = Clock(datetime(2026, 6, 10, 12, tzinfo=UTC))
    month_hours = D(30 * 24)
    e = engine(clock, policy("acme", str(6 * month_hours), unit="gpu_hours", policy_id="gpu-a"),
               BudgetPolicy(policy_id="gpu-b", tenant_id="b", scope="tenant", scope_id="b", unit="gpu_hours",
                            amount=2 * month_hours, created_at=START),
               gpu_pending=lambda t: D(2) if t == "b" else D(0), config={"gpu_idle_for": timedelta(minutes=5)})
    for minute in range(7):
        for i in range(8):
            gpu(e, clock, "gpu", f"g{i}")
            gpu(e, clock, "process", f"g{i}", tenant="acme", util=0 if i >= 6 else 90)
        clock.advance(minutes=1)
    e.decide()
    d = latest(e, "tenant:acme:batch")
    assert d.action == "preempt" and "idle" in d.reason and d.limits.max_concurrent == 6


def test_a_vcpu_hour_budget_counts_cpu_seconds_and_a_gpu_hour_budget_gpu_seconds():
    """Each unit counts its own seconds from the same spend updates; neither counts dollars."""
    clock = Clock(START + timedelta(days=1))
    e = engine(clock, policy("acme", "1", unit="vcpu_hours", policy_id="cpu"), policy("acme", "1", unit="gpu_hours", policy_id="gpu"))
    for minute, (cpu, gpu_s) in enumerate([("1800", "360"), ("3600", "720")]):  # period-to-date, as the stream sends them
        end = START + timedelta(days=1, minutes=minute + 1)
        e.apply_spend(spend_update("acme", end - timedelta(minutes=1), end, D("5"), minute + 1).model_copy(
            update={"cpu_seconds": D(cpu), "gpu_seconds": D(gpu_s)}))
    assert e.budgets["cpu"].spent == 1 and e.budgets["gpu"].spent == D("0.2")  # 3600 CPU-s, 720 GPU-s
    assert actions(e)["batch"] == "deny"  # the vCPU-hours are used up


# ---- idle -> busy: an idle holder's GPUs go to a tenant that waits ---------------------------

def held(e: Engine, clock: Clock, uuid: str, tenant: str, session: str, util: int) -> None:
    e.apply_gpu(GpuSample(sample_id=new_id(), ts=clock.now, node="n1", level="gpu", gpu_index=0, gpu_uuid=uuid, interval_ms=1000))
    e.apply_gpu(GpuSample(sample_id=new_id(), ts=clock.now, node="n1", level="process", gpu_index=0, gpu_uuid=uuid,
                          interval_ms=1000, utilization_pct=util, tenant_id=tenant, team="ml", project="p", agent_id="nb",
                          session_id=session, attributed=True))


def idle_pool(minutes: int, idle_util: int, waiting: str = "2") -> Engine:
    """4 GPUs, quotas 2 + 2: acme's session s-idle holds two (idle_util %), s-busy two at 90 %; b waits for `waiting`."""
    clock = Clock(datetime(2026, 6, 10, 12, tzinfo=UTC))
    hours = D(30 * 24)
    e = engine(clock, policy("acme", str(2 * hours), unit="gpu_hours", policy_id="gpu-a"),
               BudgetPolicy(policy_id="gpu-b", tenant_id="b", scope="tenant", scope_id="b", unit="gpu_hours",
                            amount=2 * hours, created_at=START),
               gpu_pending=lambda t: D(waiting) if t == "b" else D(0), config={"gpu_reclaim_idle_for": timedelta(minutes=5)})
    for _ in range(minutes + 1):
        for i, (session, util) in enumerate((("s-idle", idle_util), ("s-idle", idle_util), ("s-busy", 90), ("s-busy", 90))):
            held(e, clock, f"g{i}", "acme", session, util)
        clock.advance(minutes=1)
    clock.advance(minutes=-1)
    e.decide()
    return e


def test_an_idle_holder_is_preempted_on_its_own_scope_when_another_tenant_waits():
    e = idle_pool(minutes=6, idle_util=0)
    d = latest(e, "session:acme/ml/p/nb/s-idle:*")
    assert d.action == "preempt" and d.tenant_id == "acme" and d.scope == "session"
    assert "idle GPU reclaim" in d.reason and "b wait" in d.reason
    assert "session:acme/ml/p/nb/s-busy:*" not in e._published, "busy work is never stopped"
    # inside acme's quota (it holds 4 of 4, quota 2): only the idle pair goes, no tenant-wide batch preempt on top
    assert "tenant:acme:batch" not in e._published or latest(e, "tenant:acme:batch").action != "preempt"


def test_a_busy_holder_is_not_reclaimed():
    e = idle_pool(minutes=6, idle_util=80)
    assert not [k for k in e._published if k.startswith("session:")]


def test_idle_below_the_threshold_is_not_reclaimed():
    e = idle_pool(minutes=4, idle_util=0)
    assert not [k for k in e._published if k.startswith("session:")]


def test_idle_gpus_are_not_reclaimed_when_nobody_waits():
    e = idle_pool(minutes=6, idle_util=0, waiting="0")
    assert not [k for k in e._published if k.startswith("session:")]


# ---- bad input -------------------------------------------------------------------------

@given(st.binary(max_size=300))
def test_unreadable_budget_records_are_skipped(raw):
    policies: dict = {}
    assert apply_policy_record(policies, b"k", raw) is None or raw.strip().startswith(b"{")


def test_a_small_hard_budget_still_leases_calls_while_it_lasts():
    """$0.60 split over 20 slots does not cover two $0.02 calls: the live sessions still get them
    (late in the month, when the pacing plan allows nearly all of it)."""
    clock = Clock(START + timedelta(days=29))
    e = engine(clock, policy("acme", "0.60", actions={p: "deny" for p in PRIORITIES}))
    sessions = ["acme/t/p/a/s1", "acme/t/p/a/s2"]
    for sid in sessions:
        spend(e, clock, sid, "0.02", seconds=1)
    e.decide()
    for sid in sessions:
        lease = latest(e, f"session:{sid}:*")
        assert lease.action == "allow" and lease.spend_limit_usd - lease.spent_usd >= D("0.02"), lease
    assert sum(lease.limit for lease in e.leases.values()) <= D("0.60")


def test_leases_follow_the_pacing_plan_and_critical_is_served_first():
    """Lower classes are granted up to the plan (one look-ahead on); critical past it. A session
    the plan cannot serve yet waits (allow at its ceiling), it is not denied."""
    clock = Clock(START + timedelta(minutes=10))
    e = engine(clock, policy("acme", "36", period="custom", period_anchor=START, period_seconds=3600,
                             actions={p: "deny" for p in PRIORITIES}))
    normal, critical = "acme/t/p/a/n1", "acme/t/p/a/c1"
    e.announce("acme", normal, "normal", D("5"))        # each waits for a $5 call; the plan allows ~$6.6 by now
    e.announce("acme", critical, "critical", D("5"))
    e.decide()
    assert e.leases[critical].limit >= D("5"), "critical first"
    assert e.leases[normal].limit < D("0.1"), "normal waits: charged only the starter it may have drawn"
    assert latest(e, f"session:{normal}:*").action == "allow"
    clock.advance(minutes=10)                           # the plan has moved on: now it fits
    e.announce("acme", normal, "normal", D("5"))        # its guard keeps asking while it waits
    e.decide()
    assert e.leases[normal].limit >= D("5")
    assert sum(lease.limit for lease in e.leases.values()) <= D("36") * 21 / 60 + D("0.6"), "never past plan + look-ahead"


def test_an_announced_gpu_wait_ends_when_its_session_is_seen_on_a_gpu_or_lapses():
    clock = Clock(datetime(2026, 6, 10, 12, tzinfo=UTC))
    e = engine(clock)
    e.announce_gpu("b", "b/ml/p/nb/job-1", D(2))   # a guard's path id
    e.announce_gpu("b", "b/ml/p/nb/job-2", D(1))
    assert e._pending_gpus("b", clock.now) == D(3) and e._pending_gpus("acme", clock.now) == 0
    held(e, clock, "g0", "b", "job-1", 90)          # the collector's row names the bare session: the same session
    assert e._pending_gpus("b", clock.now) == D(1)
    clock.advance(seconds=31)                        # not renewed: it lapses
    assert e._pending_gpus("b", clock.now) == 0


def _hour_budget(amount: str) -> Engine:
    clock = Clock(START + timedelta(minutes=10))
    e = engine(clock, policy("acme", amount, period="custom", period_anchor=START, period_seconds=3600, hard=True,
                             actions={p: "deny" for p in PRIORITIES}))
    e.__dict__["_test_clock"] = clock
    return e


def _tick(e: Engine, seconds: int, *announcing: tuple[str, str]) -> list[str]:
    """`seconds` one-second passes of the service loop, the waiting guards announcing; c2's lease actions seen."""
    seen = []
    for _ in range(seconds):
        e._test_clock.advance(seconds=1)
        for sid, need in announcing:
            e.announce("acme", sid, "critical", D(need))
        e.decide()
        e.heartbeat()
        seen.append(latest(e, "session:acme/t/p/a/c2:*").action if "session:acme/t/p/a/c2:*" in e._published else "")
    return seen



def test_a_critical_call_that_nothing_left_can_fit_is_denied_at_once():
    """The uncommitted rest (~$0.30) is under the waiting call ($0.50) and the budget's other lease is spent:
    nothing can come for it this period. It used to be `allow` at its ceiling, so the guard waited its
    whole lease_timeout (the twenty-agents test: 61 s) before it raised."""
    e = _hour_budget("1")
    e.announce("acme", "acme/t/p/a/c1", "critical", D("0.70"))
    e.decide()
    spend(e, e._test_clock, "acme/t/p/a/c1", str(e.leases["acme/t/p/a/c1"].limit), seconds=1)
    e.announce("acme", "acme/t/p/a/c2", "critical", D("0.50"))
    e.decide()
    lease = latest(e, "session:acme/t/p/a/c2:*")
    assert lease.action == "deny" and lease.policy_id == "p-acme" and lease.reset_at == START + timedelta(hours=1)
    assert e.leases["acme/t/p/a/c2"].limit < D("0.50")


def test_a_critical_call_waits_while_another_sessions_unspent_lease_can_still_come_back():
    """The same rest, but the other session holds $0.70 it has not spent and waits for nothing: once it goes
    idle its lease lapses and the money is uncommitted again. The waiting call is not denied meanwhile;
    it is granted when that happens."""
    e = _hour_budget("1")
    e.announce("acme", "acme/t/p/a/c1", "critical", D("0.70"))
    e.decide()
    seen = _tick(e, 100, ("acme/t/p/a/c2", "0.50"))        # c1 silent: idle after 60 s, lapsed after the TTL
    assert "deny" not in seen and seen[0] == "allow", seen
    assert e.leases["acme/t/p/a/c1"].outstanding == 0, "c1's lease lapsed"
    assert e.leases["acme/t/p/a/c2"].limit >= D("0.50"), "granted from the lapsed lease"
