"""What the SLO-aware downgrade saves against throttling, on a controllable ledger (issue 15 item 4).

    .venv/bin/python -m bench.slo            # no broker needed: an embedded chDB ledger in a temp dir

An agent on gpt-4o has a measured history (last 2 hours) on gpt-4o, gpt-5-mini and gpt-4o-mini; its day budget is
over and `high` is set to `downgrade` with an SLO (99 % of 97 % ok, p95 <= 2 s, 20 calls). The real engine, fed by the
service's ledger refresh, decides; then 1,000 calls of 1,000 input / 500 output tokens are made on the model it names
(outcomes drawn at that model's measured success rate, seeded) and `meterline report slo`'s code prices what the
downgrade saved. Throttling instead serves the same calls later at gpt-4o's price; the fixed next-model downgrade
(no SLO) would use gpt-5-mini. Writes bench/results/slo.md.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from inprocess import filled_ledger  # noqa: E402

from meterline.allocator.engine import Engine  # noqa: E402
from meterline.allocator.service import AllocatorService  # noqa: E402
from meterline.allocator.simulate import spend_update  # noqa: E402
from meterline.allocator.slo import ledger_feeds  # noqa: E402
from meterline.app.report import ReportParams, exact  # noqa: E402
from meterline.app.slo_report import slo_report  # noqa: E402
from meterline.app.store import DirectLedger  # noqa: E402
from meterline.schemas.events import BudgetPolicy, PricedEvent, UsageEvent, build, new_id  # noqa: E402
from meterline.sql import ledger as sql_ledger  # noqa: E402
from meterline.sql.rows import budget_policy_row, contract_row, insert_rows, with_offsets  # noqa: E402
from meterline.streams.pricing import load_catalog  # noqa: E402

D = Decimal
NOW = datetime.now(timezone.utc).replace(microsecond=0)
SCOPE = "acme/research/chat/bot"
MEASURED = {"gpt-4o": (200, Decimal("0.99"), 1200), "gpt-5-mini": (100, Decimal("0.80"), 900),
            "gpt-4o-mini": (100, Decimal("0.98"), 900)}   # calls, success rate, latency ms
CALLS, TOKENS = 1000, (1000, 500)
SLO = {"p95_latency_ms": 2000, "success_rate_pct": "97", "min_calls": 20}


def priced(catalog, model: str, ts: datetime, ok: bool, latency: int) -> PricedEvent:
    usage = UsageEvent(event_id=new_id(), ts=ts, tenant_id="acme", team="research", project="chat", agent_id="bot",
                       session_id="s", kind="llm_call", provider="openai", model=model, input_tokens=TOKENS[0],
                       output_tokens=TOKENS[1], latency_ms=latency, status="ok" if ok else "error", priority="high")
    return catalog.price_usage(usage)


def history(catalog, rng: random.Random) -> list[PricedEvent]:
    out = []
    for model, (n, rate, latency) in MEASURED.items():
        out += [priced(catalog, model, NOW - timedelta(hours=2) + timedelta(seconds=i), rng.random() < float(rate),
                       latency) for i in range(n)]
    return out


def main() -> None:
    catalog, rng = load_catalog(), random.Random(7)
    policy = build(BudgetPolicy, policy_id="bot-day", tenant_id="acme", scope="agent", scope_id=SCOPE, amount=D(1),
                   period="day", actions={"critical": "allow", "high": "downgrade", "normal": "throttle", "low": "deny",
                                          "batch": "deny"}, slo=SLO)
    with tempfile.TemporaryDirectory() as tmp, filled_ledger(Path(tmp), {
            "priced_events": [with_offsets(contract_row(e), "priced", 0, i) for i, e in enumerate(history(catalog, rng))],
            "budget_policies": [with_offsets(budget_policy_row(policy), "budgets", 0, 0)]}) as settings:
        decisions = {}
        for name, p in (("SLO-aware", policy), ("fixed next model", policy.model_copy(update={"slo": None}))):
            engine = Engine(clock=lambda: NOW, downgrade_for=catalog.downgrade_for, primary_model=lambda *_: "gpt-4o")
            engine.apply_policy(p)
            engine.apply_spend(spend_update(SCOPE, NOW - timedelta(minutes=1), NOW, D(2), 1, period_start=NOW))
            stats, _ = ledger_feeds(settings)
            began = time.perf_counter()
            AllocatorService(settings, engine, model_stats=stats).refresh_from_ledger()
            if p.slo is not None:
                refresh_ms = (time.perf_counter() - began) * 1000
            engine.decide()
            decisions[name] = engine._published[f"agent:{SCOPE}:high"][1]
        chosen = decisions["SLO-aware"]
        decision = chosen.model_copy(update={"issued_at": NOW - timedelta(minutes=30), "expires_at": NOW})
        n, rate, latency = CALLS, MEASURED[chosen.max_model][1], MEASURED[chosen.max_model][2]
        calls = [priced(catalog, chosen.max_model, NOW - timedelta(minutes=29) + timedelta(seconds=i), rng.random() < float(rate),
                        latency) for i in range(n)]
        client = sql_ledger.connect(settings)
        insert_rows(client, "priced_events", [with_offsets(contract_row(e), "priced", 1, i) for i, e in enumerate(calls)])
        insert_rows(client, "throttle_decisions", [with_offsets(contract_row(decision), "control", 0, 0)])
        params = ReportParams.parse(since=NOW - timedelta(minutes=30), until=NOW, gpu_idle="proportional")
        began = time.perf_counter()
        (row,) = slo_report(DirectLedger(settings, client), params).dicts()
        report_ms = (time.perf_counter() - began) * 1000
        client.close()
    per_call = {m: priced(catalog, m, NOW, True, 1).list_cost_usd for m in MEASURED}   # the catalog's price of one call
    fixed = decisions["fixed next model"].max_model
    ok = sum(c.status == "ok" for c in calls)
    lines = [
        "## SLO-aware downgrade vs throttling (issue 15 item 4)", "",
        f"Command: `.venv/bin/python -m bench.slo` ({datetime.now(timezone.utc):%Y-%m-%d}, embedded chDB). "
        f"{CALLS} calls of {TOKENS[0]} in / {TOKENS[1]} out tokens under an exhausted day budget, `high=downgrade`, "
        "SLO ≥ 97 % ok, p95 ≤ 2,000 ms, 20 calls measured. History (seeded draws): gpt-4o 200 calls at 99 % ok; "
        "gpt-5-mini 100 calls at 80 %; gpt-4o-mini 100 calls at 98 % (900 ms); the decision's reason says what was measured.", "",
        "| policy | model served | $ per call (catalog) | cost of the calls $ | ok % | meets the SLO | saved vs throttling $ |",
        "|---|---|---:|---:|---:|---|---:|",
        f"| throttle (served later at full price) | gpt-4o | {exact(per_call['gpt-4o'])} | {exact(per_call['gpt-4o'] * CALLS)} | 99 (history) | yes | 0 |",
        f"| fixed next model (no SLO) | {fixed} | {exact(per_call[fixed])} | {exact(per_call[fixed] * CALLS)} | "
        f"{int(MEASURED[fixed][1] * 100)} (history) | no | {exact((per_call['gpt-4o'] - per_call[fixed]) * CALLS)} |",
        f"| SLO-aware downgrade | {chosen.max_model} | {exact(per_call[chosen.max_model])} | {exact(row['downgraded_cost_usd'])} | "
        f"{ok * 100 / CALLS:.1f} (these calls) | yes | **{exact(row['saved_usd'])}** (`report slo`) |", "",
        f"`report slo` priced the {row['downgraded_calls']} downgraded calls at gpt-4o: ${exact(row['at_original_price_usd'])}, "
        f"saved ${exact(row['saved_usd'])} ({row['saved_usd'] * 100 / row['at_original_price_usd']:.1f} %). Cost per successful call: "
        f"gpt-4o ${per_call['gpt-4o'] / D('0.99'):.6f}, {fixed} ${per_call[fixed] / MEASURED[fixed][1]:.6f}, "
        f"{chosen.max_model} ${per_call[chosen.max_model] * CALLS / ok:.6f}. The refresh (one stats query) took "
        f"{refresh_ms:.0f} ms; the report {report_ms:.0f} ms.", "",
        f"Decision reason: {chosen.reason}", ""]
    out = Path(__file__).with_name("results") / "slo.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
