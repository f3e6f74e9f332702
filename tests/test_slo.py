"""SLO-aware downgrade, `report slo` and forecast-shaped pacing (issue 15), on a real chDB ledger.

The ledger is filled with known calls (tests/inprocess.py `filled_ledger`); the allocator's ledger feeds
(allocator/slo.py) load measured stats and pacing curves from it through the service's refresh, and the real
engine decides with the real catalog's tiers. Ground truth (success rates, nearest-rank p95, savings at
OpenAI's list prices) is computed here from the rows this file wrote, not by the code under test.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from meterline.allocator.engine import Engine
from meterline.allocator.service import AllocatorService
from meterline.allocator.simulate import spend_update
from meterline.allocator.slo import ModelStats, ledger_feeds
from meterline.schemas.events import BudgetPolicy, InvalidEvent, PricedEvent, Slo, ThrottleDecision, build, decode, new_id
from meterline.sql.rows import budget_policy_row, contract_row, with_offsets
from meterline.streams.pricing import load_catalog

from inprocess import cli_on, filled_ledger

D = Decimal
UTC = timezone.utc
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=2)                     # the calls of the downgrade scenarios
TEAM = "acme/research/chat"
SLO = {"p95_latency_ms": 2000, "success_rate_pct": "97", "cost_per_success_usd": "0.001", "min_calls": 20}
# OpenAI's list prices per million tokens (openai.com/api/pricing): what a gpt-4o call would have cost
GPT_4O = (D("2.50"), D("10.00"))
DAY = datetime(2026, 6, 10, tzinfo=UTC)           # the pacing scenario's budget day (history: the three days before)


class Clock:
    def __init__(self, at: datetime):
        self.now = at

    def __call__(self) -> datetime:
        return self.now


def call(agent: str, model: str, i: int, *, ok: bool = True, latency: int = 800, cost: str = "0.00045",
         ts: datetime | None = None, priority: str = "high", tokens: tuple[int, int] = (1000, 500), tenant: str = "acme",
         team: str = "research", project: str = "chat") -> PricedEvent:
    return PricedEvent(event_id=new_id(), ts=ts or T0 + timedelta(seconds=i), tenant_id=tenant, team=team, project=project,
                       agent_id=agent, session_id=f"{agent}-s", kind="llm_call", provider="openai", model=model,
                       input_tokens=tokens[0], output_tokens=tokens[1], latency_ms=latency, status="ok" if ok else "error",
                       priority=priority, cost_usd=D(cost), list_cost_usd=D(cost), cost_source="catalog", catalog_version="v",
                       priced_at=NOW)


def agent_calls() -> dict[str, list[PricedEvent]]:
    """Per agent: 40 gpt-4o calls (the model it is on) and its measured cheaper models."""
    big = lambda a: [call(a, "gpt-4o", i, cost="0.0075") for i in range(40)]  # noqa: E731
    mini = lambda a, n, **kw: [call(a, "gpt-4o-mini", 100 + i, **{k: (v(i) if callable(v) else v) for k, v in kw.items()})  # noqa: E731
                                for i in range(n)]
    return {
        # gpt-5-mini (next down) fails its calls; gpt-4o-mini (further down) meets the SLO: 39/40 ok, p95 ≤ 2 s
        "bot-ok": big("bot-ok") + [call("bot-ok", "gpt-5-mini", 300 + i, ok=i % 5 != 0) for i in range(30)]
                  + mini("bot-ok", 40, ok=lambda i: i != 7, latency=lambda i: 300 + 40 * i),
        "bot-fail": big("bot-fail") + mini("bot-fail", 40, ok=lambda i: i % 10 != 0),            # 90 % ok < 97 %
        "bot-slow": big("bot-slow") + mini("bot-slow", 40, latency=lambda i: 2500 if i < 3 else 500),  # p95 2.5 s
        "bot-few": big("bot-few") + mini("bot-few", 10),                                       # 10 calls < 20
    }


def slo_policy(agent: str, **kw) -> BudgetPolicy:
    return build(BudgetPolicy, policy_id=f"p-{agent}", tenant_id="acme", scope="agent", scope_id=f"{TEAM}/{agent}",
                 amount=D(1), period="day", actions={"critical": "allow", "high": "downgrade", "normal": "throttle",
                                                      "low": "deny", "batch": "deny"}, slo=kw.pop("slo", SLO), **kw)


# ---- downgrade scenarios and the report's calls: one ledger --------------------------------------

D0 = NOW - timedelta(minutes=30)   # a downgrade decision for bot-ok (high), re-published once (heartbeat)


def decision_copies() -> list[ThrottleDecision]:
    first = ThrottleDecision(decision_id=new_id(), tenant_id="acme", scope="agent", scope_id=f"{TEAM}/bot-ok",
                             priority="high", action="downgrade", max_model="gpt-4o-mini", downgraded_from="gpt-4o",
                             reason="r", policy_id="p-bot-ok", issued_at=D0, expires_at=D0 + timedelta(seconds=30))
    again = first.model_copy(update={"issued_at": D0 + timedelta(seconds=15), "expires_at": D0 + timedelta(seconds=45)})
    return [first, again]


def under_decision() -> list[PricedEvent]:
    """Calls around the decision: three on its model, class and time (one covered by both copies); a
    normal-class call, a gpt-4o call and one after the last copy expired are not downgraded calls."""
    at = lambda s, **kw: call("bot-ok", kw.pop("model", "gpt-4o-mini"), 0, ts=D0 + timedelta(seconds=s), **kw)  # noqa: E731
    return [at(5, tokens=(2000, 300), cost="0.00048"), at(20, tokens=(1200, 800), cost="0.00066"),
            at(40, tokens=(500, 100), cost="0.000135"), at(10, priority="normal"), at(12, model="gpt-4o", cost="0.0075"),
            at(50)]


def seasonal_history() -> list[PricedEvent]:
    """Three days before DAY: $3 an hour, $31 in the 14:00 hour ($100 a day), tenant `seasonal`."""
    out = []
    for day in range(1, 4):
        for hour in range(24):
            ts = DAY - timedelta(days=day) + timedelta(hours=hour, minutes=10)
            out.append(call("a", "gpt-4o", 0, ts=ts, cost="31" if hour == 14 else "3", tenant="seasonal", team="",
                            project=""))
    return out


pytestmark = pytest.mark.xdist_group("slo")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    events = [e for calls in agent_calls().values() for e in calls] + under_decision() + seasonal_history()
    policies = [slo_policy(a) for a in agent_calls()]
    tables = {"priced_events": [with_offsets(contract_row(e), "priced", 0, i) for i, e in enumerate(events)],
              "throttle_decisions": [with_offsets(contract_row(d), "control", 0, i) for i, d in enumerate(decision_copies())],
              "budget_policies": [with_offsets(budget_policy_row(p), "budgets", 0, i) for i, p in enumerate(policies)]}
    with filled_ledger(tmp_path_factory.mktemp("slo"), tables) as settings:
        yield settings


def exhausted_engine(settings, agent: str, primary_model=None, **policy_kw) -> Engine:
    """The real engine on the real catalog's tiers, its agent budget over, stats loaded by the service's refresh
    (the model it is on: the one it spent most on in those stats, unless `primary_model` says)."""
    clock = Clock(NOW)
    e = Engine(clock=clock, downgrade_for=load_catalog().downgrade_for, primary_model=primary_model)
    p = slo_policy(agent, **policy_kw)
    e.apply_policy(p)
    e.apply_spend(spend_update(p.scope_id, NOW - timedelta(minutes=1), NOW, D(2), 1, period_start=NOW))
    stats, pacing = ledger_feeds(settings)
    AllocatorService(settings, e, model_stats=stats, pacing=pacing).refresh_from_ledger()
    return e


def high_decision(e: Engine, agent: str) -> ThrottleDecision:
    e.decide()
    return e._published[f"agent:{TEAM}/{agent}:high"][1]


def test_downgrade_picks_the_cheaper_model_that_meets_the_slo(ledger):
    d = high_decision(exhausted_engine(ledger, "bot-ok"), "bot-ok")
    # gpt-5-mini is the tier's next model down, but it fails 20 % of this agent's calls
    assert (d.action, d.max_model, d.downgraded_from) == ("downgrade", "gpt-4o-mini", "gpt-4o")
    assert "gpt-5-mini: success 80.00% < 97%" in d.reason


def test_without_an_slo_the_downgrade_is_the_next_model_down(ledger):
    d = high_decision(exhausted_engine(ledger, "bot-fail", primary_model=lambda *_: "gpt-4o", slo=None), "bot-fail")
    assert (d.action, d.max_model) == ("downgrade", "gpt-5-mini")


@pytest.mark.parametrize("agent, why", [("bot-fail", "gpt-4o-mini: success 90.00% < 97%"),
                                        ("bot-slow", "gpt-4o-mini: p95 2500 ms > 2000 ms"),
                                        ("bot-few", "gpt-4o-mini: 10 calls measured, 20 needed")])
def test_a_cheaper_model_that_misses_the_slo_or_is_unmeasured_means_throttle(ledger, agent, why):
    d = high_decision(exhausted_engine(ledger, agent), agent)
    assert d.action == "throttle" and d.max_model is None and d.limits.requests_per_min
    assert why in d.reason


def test_min_calls_is_configurable(ledger):
    d = high_decision(exhausted_engine(ledger, "bot-few", slo={**SLO, "min_calls": 10}), "bot-few")
    assert (d.action, d.max_model) == ("downgrade", "gpt-4o-mini")


def p95(values: list[int]) -> int:
    """Nearest rank: the ceil(0.95 n)-th smallest."""
    return sorted(values)[math.ceil(0.95 * len(values)) - 1]


def test_measured_stats_match_the_rows(ledger):
    stats, _ = ledger_feeds(ledger)
    table = stats([slo_policy(a) for a in agent_calls()])
    for agent, calls in agent_calls().items():
        for model in {c.model for c in calls}:
            mine = [c for c in calls + (under_decision() if agent == "bot-ok" else []) if c.model == model]
            got = table[(f"{TEAM}/{agent}", model)]
            assert got == ModelStats(len(mine), sum(c.status == "ok" for c in mine), len(mine),
                                     p95([c.latency_ms for c in mine]), sum((c.cost_usd for c in mine), D(0)))


def test_a_failing_ledger_keeps_the_allocator_running(ledger):
    e = Engine(clock=Clock(NOW), downgrade_for=load_catalog().downgrade_for)
    e.apply_policy(slo_policy("bot-ok"))

    def broken(_policies):
        raise RuntimeError("ledger down")

    service = AllocatorService(ledger, e, model_stats=broken)
    service.refresh_from_ledger()
    assert service.counts["refresh_errors"] == 1 and e.model_stats == {}


# ---- meterline report slo --------------------------------------------------------------------------


def test_report_slo_figures_match_ground_truth(ledger, monkeypatch):
    with cli_on(ledger, monkeypatch, "report") as invoke:
        doc = json.loads(invoke("slo", "--since", "1d", "--json"))
        table = invoke("slo", "--since", "1d")
    rows = {r["scope_id"].rsplit("/", 1)[1]: r for r in doc["rows"]}
    assert set(rows) == set(agent_calls())
    for agent, calls in agent_calls().items():
        calls = calls + (under_decision() if agent == "bot-ok" else [])
        ok = [c for c in calls if c.status == "ok"]
        row = rows[agent]
        assert row["calls"] == len(calls)
        assert D(row["success_pct"]) == (D(len(ok)) * 100 / len(calls)).quantize(D("0.000001"))
        assert row["p95_latency_ms"] == p95([c.latency_ms for c in calls])
        assert D(row["cost_per_success_usd"]) == (sum((c.cost_usd for c in calls), D(0)) / len(ok)).quantize(D("1e-12"))
        assert row["success_met"] == ("yes" if D(len(ok)) * 100 / len(calls) >= 97 else "no")
        assert row["latency_met"] == ("yes" if p95([c.latency_ms for c in calls]) <= 2000 else "no")
        assert row["cost_met"] == ("yes" if sum((c.cost_usd for c in calls), D(0)) / len(ok) <= D("0.001") else "no")
    # the downgrade: the three calls on its model, class and time, priced at gpt-4o's list price
    counted = under_decision()[:3]
    at_4o = sum((D(c.input_tokens) * GPT_4O[0] / 10**6 + D(c.output_tokens) * GPT_4O[1] / 10**6 for c in counted), D(0))
    cost = sum((c.cost_usd for c in counted), D(0))
    assert rows["bot-ok"]["downgraded_calls"] == 3
    assert (D(rows["bot-ok"]["at_original_price_usd"]), D(rows["bot-ok"]["saved_usd"])) == (at_4o, at_4o - cost)
    assert rows["bot-fail"]["downgraded_calls"] == 0 and D(rows["bot-fail"]["saved_usd"]) == 0
    (down,) = doc["downgrades"]
    assert (down["from_model"], down["to_model"], down["calls"], D(down["saved_usd"])) == ("gpt-4o", "gpt-4o-mini", 3, at_4o - cost)
    assert "what each downgrade saved" in table and "gpt-4o → gpt-4o-mini" in table


# ---- pacing along the forecast's curve ----------------------------------------------------------------


def test_a_daily_seasonal_budget_is_not_throttled_at_its_busy_hour(ledger):
    """$100 a day, usually $31 of it in the 14:00 hour. At 14:30, spending at 90 % of that hour's usual rate,
    the straight line (a day's budget spread evenly) throttles low and batch; the curve from the ledger does not."""
    now = DAY + timedelta(hours=14, minutes=30)
    clock = Clock(now)
    e = Engine(clock=clock)
    p = build(BudgetPolicy, policy_id="seasonal-day", tenant_id="seasonal", scope="tenant", scope_id="seasonal",
              amount=D(100), period="day", created_at=DAY)
    e.apply_policy(p)
    busy = D(31) * D("0.9") / 60   # per minute
    e.apply_spend(spend_update("seasonal", DAY, now - timedelta(minutes=5), 42 + 25 * busy, 100, period_start=DAY))
    for m in range(4, -1, -1):
        e.apply_spend(spend_update("seasonal", now - timedelta(minutes=m + 1), now - timedelta(minutes=m), busy, 101 + 4 - m,
                                   period_start=DAY))
    _, pacing = ledger_feeds(ledger)
    AllocatorService(ledger, e, pacing=pacing).refresh_from_ledger()
    curve = e.pacing["seasonal-day"][2]
    # the curve is the history's shape: $3 an hour to 14:00 (42 %), then the busy hour's $31 (73 % by 15:00)
    assert [share for h, share in curve if h.hour in (13, 14)] == [D("0.42"), D("0.73")]
    low = lambda: (e.decide(), e._published["tenant:seasonal:low"][1])[1]  # noqa: E731
    assert low().action == "allow", low().reason
    e.set_pacing("seasonal-day", None)           # the straight line: the same spend is "too fast"
    clock.now += timedelta(seconds=1)
    assert low().action == "throttle"


def test_too_little_history_leaves_the_straight_line(ledger):
    _, pacing = ledger_feeds(ledger)
    p = build(BudgetPolicy, policy_id="x", tenant_id="seasonal", scope="tenant", scope_id="seasonal", amount=D(1), period="day")
    assert pacing(p, DAY - timedelta(days=2), DAY - timedelta(days=1)) is None   # one day of history before it


# ---- the contract's SLO fields --------------------------------------------------------------------------


def test_slo_round_trips_and_is_stored_flat():
    p = slo_policy("bot-ok")
    assert decode(BudgetPolicy, p.to_json()) == p
    row = budget_policy_row(p)
    assert (row["slo_p95_latency_ms"], row["slo_success_rate_pct"], row["slo_min_calls"]) == (2000, D("97"), 20)
    assert budget_policy_row(slo_policy("x", slo=None))["slo_cost_per_success_usd"] is None


@pytest.mark.parametrize("slo, field", [
    ({}, "at least one"), ({"min_calls": 5}, "at least one"), ({"p95_latency_ms": 0}, "p95_latency_ms"),
    ({"p95_latency_ms": "2000"}, "p95_latency_ms"), ({"success_rate_pct": "100.5"}, "success_rate_pct"),
    ({"success_rate_pct": 99.5}, "success_rate_pct"), ({"success_rate_pct": "0"}, "success_rate_pct"),
    ({"cost_per_success_usd": "-1"}, "cost_per_success_usd"), ({"p95_latency_ms": 10, "min_calls": 0}, "min_calls"),
    ({"p95_latency_ms": 10, "latency": 5}, "latency")])
def test_bad_slo_fields_are_refused_by_name(slo, field):
    with pytest.raises(InvalidEvent, match=field):
        build(BudgetPolicy, policy_id="p", tenant_id="a", scope="tenant", scope_id="a", amount=D(1), slo=slo)


@hsettings(max_examples=60, deadline=None)
@given(p95=st.one_of(st.none(), st.integers(1, 86_400_000)),
       ok=st.one_of(st.none(), st.decimals(min_value=D("0.000001"), max_value=D(100), places=6)),
       cost=st.one_of(st.none(), st.decimals(min_value=D("1e-12"), max_value=D(1000), places=12)),
       n=st.integers(1, 1_000_000))
def test_any_valid_slo_survives_json(p95, ok, cost, n):
    fields = {"p95_latency_ms": p95, "success_rate_pct": ok, "cost_per_success_usd": cost, "min_calls": n}
    if p95 is None and ok is None and cost is None:
        with pytest.raises(InvalidEvent):
            build(Slo, **fields)
        return
    slo = build(Slo, **fields)
    assert decode(Slo, slo.to_json()) == slo


def test_budget_set_refuses_a_bad_slo_in_one_line():
    """An invalid --slo-* value is one line naming it, before Kafka is asked anything."""
    from typer.testing import CliRunner

    from meterline.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["budget", "set", "--tenant", "acme", "--amount", "5", "--slo-success-pct", "abc"])
    assert bad.exit_code != 0 and "--slo-success-pct 'abc' is not a decimal" in bad.output
    bad = runner.invoke(app, ["budget", "set", "--tenant", "acme", "--amount", "5", "--slo-success-pct", "101"])
    assert bad.exit_code != 0 and "success_rate_pct" in bad.output and "Traceback" not in bad.output


def test_budget_set_slo_reaches_the_allocator_and_the_ledger(settings):
    """`budget set --slo-*` on the real broker: the allocator's reader gets the SLO, the real sink stores it
    (migration 0014) and `report slo` shows its targets."""
    import subprocess

    from meterline.allocator.budgets import read_policies

    from test_sql_sink import METERLINE, _env, sink_until_idle

    done = subprocess.run([*METERLINE, "budget", "set", "--tenant", "acme", "--team", "research", "--project", "chat",
                           "--agent", "bot", "--amount", "5", "--period", "day", "--action", "high=downgrade",
                           "--slo-p95-ms", "1500", "--slo-success-pct", "99.5", "--slo-cost-per-success", "0.002",
                           "--slo-min-calls", "30", "--json"], env=_env(settings), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (policy,) = read_policies(settings).values()
    assert policy.slo == Slo(p95_latency_ms=1500, success_rate_pct=D("99.5"), cost_per_success_usd=D("0.002"), min_calls=30)
    sink_until_idle(settings)
    report = subprocess.run([*METERLINE, "report", "slo", "--json"], env=_env(settings), capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    (row,) = json.loads(report.stdout)["rows"]
    assert (row["scope_id"], row["slo_p95_latency_ms"], row["slo_success_pct"], row["slo_cost_per_success_usd"],
            row["calls"], row["success_met"]) == ("acme/research/chat/bot", 1500, "99.5", "0.002", 0, "n/a")


def test_the_lease_plan_follows_the_curve_too():
    """Under a hard budget whose sessions hold leases, lower classes are granted up to the plan one look-ahead ahead:
    along the curve at the busy hour that plan is the curve's share, not the elapsed share of the day."""
    from meterline.allocator.slo import Curve

    now = DAY + timedelta(hours=14, minutes=30)
    p = build(BudgetPolicy, policy_id="day", tenant_id="seasonal", scope="tenant", scope_id="seasonal", amount=D(100),
              period="day", created_at=DAY)
    shares = [D(3 * (h + 1) + (28 if h >= 14 else 0)) / 100 for h in range(24)]   # $3 an hour, $31 at 14:00
    curve: Curve = (DAY, DAY + timedelta(days=1), tuple((DAY + timedelta(hours=h), s) for h, s in enumerate(shares)))
    paced = {}
    for name, c in (("straight", None), ("curve", curve)):
        e = Engine(clock=Clock(now))
        e.apply_policy(p)
        e.set_pacing("day", c)
        paced[name] = e._compute_pool(e.budgets["day"], now).paced
    ahead = now + timedelta(seconds=60)                                   # the look-ahead
    by_curve = D("0.42") + D("0.31") * D((ahead - (DAY + timedelta(hours=14))).total_seconds()) / 3600
    by_line = D((ahead - DAY).total_seconds()) / 86400
    assert paced["curve"] - paced["straight"] == 100 * (by_curve - by_line)


def test_budget_set_says_when_its_scope_skips_a_level():
    """`--tenant acme --agent bot` is scope acme///bot: an agent reporting a team or a project is not in it, so
    budget set says which levels the scope leaves out (it still stores the budget: such agents exist)."""
    from typer.testing import CliRunner

    from meterline.cli import app

    env = {"METERLINE_KAFKA_BOOTSTRAP": "127.0.0.1:9"}  # nothing answers: the note comes before Kafka is asked
    runner = CliRunner()
    skipped = runner.invoke(app, ["budget", "set", "--tenant", "acme", "--agent", "bot", "--amount", "5"], env=env)
    assert "scope acme///bot holds only calls reported without team and project" in skipped.output
    assert "for calls that report them add --team and --project" in skipped.output
    session = runner.invoke(app, ["budget", "set", "--tenant", "acme", "--team", "t", "--session", "s1", "--amount", "5"], env=env)
    assert "without project and agent" in session.output
    full = runner.invoke(app, ["budget", "set", "--tenant", "acme", "--team", "t", "--project", "p", "--agent", "bot",
                               "--amount", "5"], env=env)
    assert "note:" not in full.output
