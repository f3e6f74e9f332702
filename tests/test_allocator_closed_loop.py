"""Issue 14: one closed loop through the real broker confirms the simulator's figures.

The same small scenario runs in the simulator (virtual time) and for real (allocator service on
Kafka, Guards on a DecisionFeed, spend through SpendReporter), with the simulator's lags set to the
live run's: spend every 0.5 s (the reporter's interval), service tick 0.05 s, heartbeat 2 s.

Tolerance: the hard-budget overshoot must be ≤ 0.5 % in both (the leases' guarantee does not depend
on timing). Utilisation must agree within 10 points: across seeds 21-26 the simulator alone spreads
over 9 points (57.9-67.0 %), so timing noise of that size is what the two runs cannot tell apart.
"""
from __future__ import annotations

import pytest

from meterline.allocator.simulator import parse_scenario, run_live, simulate

pytestmark = pytest.mark.kafka
TOLERANCE_POINTS = 10


def closed_loop(seed: int = 21):
    """30 s, 10 sessions (8 normal at 30 calls/min, 2 critical at 12), $0.01-0.03 a call, demand ~2.9x a $1 hard budget."""
    return parse_scenario({
        "name": "closed-loop", "seed": seed, "duration_s": 30, "budget": {"amount": "1", "period_s": 30},
        "lag": {"session_publish_s": 0.5, "scope_publish_s": 0.5, "tick_s": 0.05, "heartbeat_s": 2.0, "kafka_s": 0.02},
        "agents": [{"name": "chat", "sessions": 8, "priority": "normal", "rate_per_min": 30, "cost_min": "0.01",
                    "cost_max": "0.03", "patience_s": 2},
                   {"name": "pager", "sessions": 2, "priority": "critical", "rate_per_min": 12, "cost_min": "0.01",
                    "cost_max": "0.03", "patience_s": 2}]})


def test_the_real_loop_confirms_the_simulators_overshoot_and_utilisation(settings):
    simulated = simulate(closed_loop())
    live = run_live(closed_loop(), settings)
    print(f"\nsimulated {simulated['utilisation_pct']} % used, {simulated['overshoot_pct']} % over; "
          f"live {live['utilisation_pct']} % used, {live['overshoot_pct']} % over ({live['requests']} calls)")
    assert simulated["demand_ratio"] > 2, "the budget is under pressure"
    assert live["requests"] > 0.8 * sum(simulated["requests"].values()), "the live agents issued the scenario's calls"
    assert simulated["overshoot_pct"] <= 0.5 and live["overshoot_pct"] <= 0.5, (simulated, live)
    assert abs(simulated["utilisation_pct"] - live["utilisation_pct"]) <= TOLERANCE_POINTS, (simulated, live)
    assert live["utilisation_pct"] >= 40, "the live budget was used, not starved"
