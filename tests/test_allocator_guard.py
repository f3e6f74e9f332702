"""The allocator and the agent guard through the real broker: leases, denies, fail-open/closed."""
from __future__ import annotations

import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest

from meterline.allocator.budgets import publish_policy, read_policies, delete_policy
from meterline.allocator.engine import Engine, EngineConfig
from meterline.allocator.guard import AllocatorUnavailable, BudgetExceeded, DecisionFeed, Guard, Throttled
from meterline.allocator.service import run_in_thread
from meterline.allocator.simulate import SpendReporter
from meterline.schemas.events import PRIORITIES, BudgetPolicy, DecisionLimits, ThrottleDecision, new_id, utcnow
from collectors_kafka import wait_for


pytestmark = pytest.mark.kafka


@pytest.fixture
def allocator(settings):
    service, stop, thread = run_in_thread(settings, Engine(EngineConfig()), tick=0.02)
    assert service.ready.wait(30)
    yield service
    stop.set()
    thread.join()


@pytest.fixture
def feed(settings):
    f = DecisionFeed(settings, tenants={"acme"}).start()
    assert f.wait_ready(30)
    yield f
    f.close()


def hard_budget(amount: str, **kw) -> BudgetPolicy:
    return BudgetPolicy(policy_id="acme-hard", tenant_id="acme", scope="tenant", scope_id="acme", amount=Decimal(amount),
                        hard=True, actions={p: "deny" for p in PRIORITIES}, **kw)


@pytest.mark.parametrize("bare_ids", [False, True], ids=["path-ids", "bare-ids"])
def test_twenty_concurrent_agents_overshoot_a_hard_budget_by_at_most_one_percent(settings, allocator, feed, bare_ids):
    budget, cost = Decimal("50"), Decimal("0.01")
    publish_policy(settings, hard_budget(str(budget)))
    wait_for(lambda: feed.decisions.get("tenant:acme:normal"), "the tenant decision reached the guard")
    reporter = SpendReporter(settings, interval=0.02, bare_ids=bare_ids).start()
    spent = [Decimal(0)] * 20
    outcomes: list[str] = [""] * 20

    def agent(i: int) -> None:
        # critical: pacing would (rightly) throttle a month's budget spent in a second; only the lease stops them
        guard = Guard(feed, "acme", team="research", session_id=f"s{i}", priority="critical", lease_timeout=60)
        while True:
            try:
                guard.check("gpt-4o", cost_usd=cost)
            except BudgetExceeded as err:
                outcomes[i] = f"{err.policy_id}: {err}"
                return
            spent[i] += cost                       # the call happened: real money
            reporter.add(guard.scopes["session"], cost)
            guard.record(cost, reserved_usd=cost)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reporter.stop()
    total = sum(spent)
    assert total <= budget * Decimal("1.01"), f"overshoot: spent {total} of {budget}"
    assert total >= budget * Decimal("0.9"), f"the leases starved the agents: spent only {total} of {budget}"
    assert {o.split(":")[0] for o in outcomes} == {"acme-hard"}, "every agent was stopped by the named hard budget"
    # by the allocator's deny once nothing was left for them, not by waiting out lease_timeout (61 s each run)
    assert all(o.startswith("acme-hard: deny: ") for o in outcomes), outcomes
    assert sum(1 for s in spent if s > 0) == 20, "every agent got to spend"


def test_deny_names_the_budget_and_its_reset(settings, allocator, feed):
    publish_policy(settings, hard_budget("1"))
    reporter = SpendReporter(settings)
    reporter.add("acme", Decimal("1.5"))
    reporter.flush()
    guard = Guard(feed, "acme", session_id="s1", priority="critical")
    decision = wait_for(lambda: (d := feed.decisions.get("tenant:acme:critical")) and d.action == "deny" and d, "deny")
    with pytest.raises(BudgetExceeded) as info:
        guard.check("gpt-4o")
    assert info.value.policy_id == "acme-hard"
    assert info.value.reset_at == decision.decision.reset_at and info.value.reset_at > utcnow()


def test_budget_cli_store_round_trip(settings):
    publish_policy(settings, hard_budget("5"))
    assert read_policies(settings)["acme-hard"].amount == Decimal("5")
    delete_policy(settings, "acme-hard")
    assert "acme-hard" not in read_policies(settings)


def _publish(settings, decision: ThrottleDecision) -> None:
    from confluent_kafka import Producer

    producer = Producer(settings.kafka_config())
    producer.produce(settings.topic("control"), key=decision.key.encode(), value=decision.to_json())
    assert producer.flush(60) == 0


def _decision(action: str = "allow", ttl: float = 60, **kw) -> ThrottleDecision:
    now = utcnow()
    return ThrottleDecision(decision_id=new_id(), tenant_id="acme", scope="tenant", scope_id="acme", action=action,
                            reason="test", issued_at=now, expires_at=now + timedelta(seconds=ttl), **kw)


def test_expired_decisions_fall_back_to_fail_open_or_fail_closed(settings, feed):
    clock = [time.time()]
    opened = Guard(feed, "acme", session_id="s1", fail_mode="open", clock=lambda: clock[0])
    closed = Guard(feed, "acme", session_id="s1", fail_mode="closed", clock=lambda: clock[0])
    with pytest.raises(AllocatorUnavailable):
        closed.check("m")                          # nothing heard from the allocator yet
    _publish(settings, _decision("throttle", ttl=60, limits=DecisionLimits(requests_per_min=1)))
    wait_for(lambda: "tenant:acme:*" in feed.decisions, "decision arrived")
    assert closed.check("m") == "m"                # a token
    with pytest.raises(Throttled):
        closed.check("m", wait=False)              # bucket empty, caller will not wait
    clock[0] += 120                                # the allocator went silent; the decision expired
    assert opened.check("m") == "m"
    with pytest.raises(AllocatorUnavailable):
        closed.check("m")


def test_guard_downgrades_and_queues(settings, feed):
    guard = Guard(feed, "acme", team="t", session_id="s1", queue_timeout=0.05)
    _publish(settings, _decision("downgrade", max_model="gpt-4o-mini"))
    wait_for(lambda: "tenant:acme:*" in feed.decisions, "decision arrived")
    assert guard.check("gpt-4o") == "gpt-4o-mini"
    _publish(settings, _decision("queue"))
    wait_for(lambda: feed.decisions["tenant:acme:*"].action == "queue", "queue arrived")
    with pytest.raises(Throttled, match="queued"):
        guard.check("gpt-4o")
    released: list[str | None] = []
    waiter = threading.Thread(target=lambda: released.append(Guard(feed, "acme", session_id="s2", queue_timeout=60).check("x")))
    waiter.start()
    _publish(settings, _decision("allow"))
    waiter.join()
    assert released == ["x"]


def test_guard_check_costs_microseconds(feed, settings):
    _publish(settings, _decision("allow"))
    wait_for(lambda: "tenant:acme:*" in feed.decisions, "decision arrived")
    guard = Guard(feed, "acme", team="t", project="p", agent_id="a", session_id="s")
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        guard.check("gpt-4o")
    per_call = (time.perf_counter() - start) / n
    assert per_call < 50e-6, f"a guard check took {per_call * 1e6:.1f} µs"


def _anomalies(settings) -> list:
    from confluent_kafka import Consumer

    from meterline.allocator._kafka import assign_from_beginning
    from meterline.schemas.events import Anomaly, decode

    consumer = Consumer(settings.kafka_config(**{"group.id": f"t-{new_id()}", "enable.auto.commit": False}))
    ends = assign_from_beginning(consumer, settings.topic("anomalies"))
    out, positions = [], {p: 0 for p in ends}
    while any(positions[p] < e for p, e in ends.items()):
        msg = consumer.poll(10)
        assert msg is not None, "the anomalies topic stalled"
        positions[msg.partition()] = msg.offset() + 1
        out.append(decode(Anomaly, msg.value()))
    consumer.close()
    return out


def test_priorities_and_team_inside_tenant_through_the_broker(settings, allocator, feed):
    publish_policy(settings, BudgetPolicy(policy_id="acme-month", tenant_id="acme", scope="tenant", scope_id="acme",
                                          amount=Decimal(1000)))
    publish_policy(settings, BudgetPolicy(policy_id="research-month", tenant_id="acme", scope="team",
                                          scope_id="acme/research", amount=Decimal(100)))
    wait_for(lambda: "team:acme/research:low" in feed.decisions, "team decisions")
    reporter = SpendReporter(settings)
    reporter.add("acme/research", Decimal("95"))           # the team is in the headroom kept for critical/high
    reporter.flush()
    # one decision per priority, keyed apart (so on different partitions, in no set order): wait for both
    wait_for(lambda: all(feed.decisions[f"team:acme/research:{p}"].action == "deny" for p in ("low", "batch")),
               "team under pressure")
    research = {p: Guard(feed, "acme", team="research", session_id=f"r-{p}", priority=p) for p in PRIORITIES}
    assert research["critical"].check("m") == "m" and research["high"].check("m") == "m"
    for p in ("low", "batch"):
        with pytest.raises(BudgetExceeded, match="research-month"):
            research[p].check("m")
    assert Guard(feed, "acme", team="ops", session_id="o1", priority="batch").check("m") == "m", "other teams are fine"
    reporter.add("acme/research", Decimal("1"))
    reporter.flush()
    wait_for(lambda: [a for a in _anomalies(settings) if a.evidence.get("threshold_pct") == "80"], "the 80 % alert")
    alerts = [(a.evidence["policy_id"], a.evidence["threshold_pct"]) for a in _anomalies(settings)]
    assert sorted(alerts) == [("research-month", "50"), ("research-month", "80")], "each threshold once"


def test_heartbeat_keeps_decisions_alive_for_fail_closed_guards(settings, feed):
    service, stop, thread = run_in_thread(settings, Engine(EngineConfig(decision_ttl=timedelta(seconds=1))),
                                          tick=0.02, heartbeat_every=0.1)
    try:
        assert service.ready.wait(30)
        publish_policy(settings, hard_budget("100"))
        first = wait_for(lambda: feed.decisions.get("tenant:acme:normal"), "first decision").decision
        guard = Guard(feed, "acme", session_id="s1", fail_mode="closed")
        renewed = wait_for(lambda: (d := feed.decisions["tenant:acme:normal"].decision).issued_at >= first.expires_at and d,
                             "a renewal issued after the first decision's expiry")
        assert renewed.decision_id == first.decision_id, "a heartbeat renews the same decision"
        assert guard.check("m") == "m", "while the allocator is healthy, fail-closed guards keep working"
    finally:
        stop.set()
        thread.join()


def test_a_new_session_announces_itself_through_the_broker_and_is_leased_before_it_spends(settings, allocator, feed):
    """No free first call: the guard announces its session and class on the spend topic (a zero-cost
    SpendUpdate), the allocator leases it, and only then does the call go ahead."""
    publish_policy(settings, hard_budget("10"))
    wait_for(lambda: (d := feed.decisions.get("tenant:acme:critical")) and d.starter is not None, "starter decision arrived")
    guard = Guard(feed, "acme", session_id="new-session", priority="critical")
    key = f"session:{guard.scopes['session']}:*"
    assert key not in feed.decisions
    assert guard.check("gpt-4o", cost_usd=Decimal("0.05")) == "gpt-4o"      # waited for its lease, then through
    lease = feed.decisions[key]
    assert lease.decision.action == "allow" and lease.limit >= 5 * 10**7 and lease.spent == 0
    assert allocator.counts["announcements"] >= 1 and allocator.counts["spend"] == 0


def test_a_restarted_allocator_does_not_alert_a_threshold_again_in_the_same_period(settings):
    """Fired thresholds lived in memory: every restart of `meterline up` re-sent the 50/80/100 % alerts of every
    budget already past them (seen in the demo's data dir: umbrella's three alerts again, critical included)."""
    publish_policy(settings, BudgetPolicy(policy_id="acme-month", tenant_id="acme", scope="tenant", scope_id="acme",
                                          amount=Decimal(100)))
    reporter = SpendReporter(settings)
    for step, (spend, threshold) in enumerate(((Decimal(60), "50"), (Decimal(25), "80"))):
        service, stop, thread = run_in_thread(settings, Engine(EngineConfig()), tick=0.02)
        try:
            assert service.ready.wait(30)
            reporter.add("acme", spend)
            reporter.flush()
            wait_for(lambda: [a for a in _anomalies(settings) if a.evidence.get("threshold_pct") == threshold],
                     f"the {threshold} % alert (run {step + 1})")
        finally:
            stop.set()
            thread.join()
    alerts = sorted(a.evidence["threshold_pct"] for a in _anomalies(settings))
    assert alerts == ["50", "80"], "each threshold once, across the restart"
