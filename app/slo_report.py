"""`meterline report slo`: per budget with an SLO, attainment, cost per successful call and what downgrades saved.

Over [since, until), per budget scope with an SLO (BudgetPolicy.slo, migration 0014), from its LLM calls (what
a downgrade changes; `report cost-per-action` has the all-in figure with GPU and tool calls):
  success     ok calls / calls, against slo.success_rate_pct
  latency     nearest-rank p95 of the calls that reported one (latency_ms > 0), against slo.p95_latency_ms
  cost        LLM cost / ok calls, against slo.cost_per_success_usd
  met         yes / no per objective; '—' without that objective; 'n/a' without a call to measure
Downgrades: every call made under one of the scope's downgrade decisions on the model it named
(sql/queries/slo_downgraded_calls.sql) is priced again at the model it stood in for (the decision's
`downgraded_from`) with the project's pricer (streams/pricing.py `list_price`, today's catalog, the call's own
time, tokens, tier and batch flag): saved = that price - what the call cost, exact. A call the pricer cannot
price at the original model is counted in `unpriced_calls` and left out of the saving. `meta.downgrades`
(JSON) has the figures per decision.
"""
from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from .store import Result

ZERO = Decimal(0)
MONEY = "Decimal(38, 18)"
SLO_COLUMNS = ["policy_id", "scope_id", "calls", "success_pct", "slo_success_pct", "success_met", "p95_latency_ms",
               "slo_p95_latency_ms", "latency_met", "cost_per_success_usd", "slo_cost_per_success_usd", "cost_met",
               "downgraded_calls", "unpriced_calls", "downgraded_cost_usd", "at_original_price_usd", "saved_usd"]
SLO_TYPES = ["String", "String", "UInt64", "Nullable(Decimal(38, 6))", "Nullable(Decimal(9, 6))", "String",
             "Nullable(UInt64)", "Nullable(UInt64)", "String", "Nullable(Decimal(38, 18))", f"Nullable({MONEY})", "String",
             "UInt64", "UInt64", MONEY, MONEY, MONEY]
SIX, PICO = Decimal("0.000001"), Decimal("1e-12")
NO_CALLS = {"calls": 0, "ok_calls": 0, "latency_calls": 0, "p95_latency_ms": 0, "cost_usd": "0"}
SHEET = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
         "cache_write_1h_tokens", "input_audio_tokens", "input_image_tokens", "output_audio_tokens",
         "output_image_tokens", "web_searches")


def _met(value: Any, target: Any, good: bool) -> str:
    if target is None:
        return "—"
    if value is None:
        return "n/a"
    return "yes" if good else "no"


def slo_report(ledger: Any, params: Any, catalog: Any = None) -> Result:
    """The `slo` report (a Result; meta.downgrades per decision)."""
    from .report import load_query, scope_filter

    if catalog is None:
        from meterline.streams.pricing import load_catalog

        catalog = load_catalog()
    policies = ledger.query(load_query("slo_policies"), {"tenant": params.tenant}).dicts()
    rows, downgrades = [], []
    for p in policies:
        scope = scope_filter(p["scope"], p["scope_id"], p["tenant_id"])
        window = {**scope, "since": params.since, "until": params.until}
        per_model = ledger.query(load_query("slo_model_stats"), window).dicts()
        m = next((r for r in per_model if r["model"] == ""), NO_CALLS)  # the ROLLUP row: the whole scope
        calls, ok, lat_n = int(m["calls"]), int(m["ok_calls"]), int(m["latency_calls"])
        success = (Decimal(ok) * 100 / calls).quantize(SIX) if calls else None
        p95 = int(m["p95_latency_ms"]) if lat_n else None
        cps = (Decimal(m["cost_usd"]) / ok).quantize(PICO) if ok else None  # a ratio: to the ledger's 12 places
        t_ok, t_p95, t_cost = p["slo_success_rate_pct"], p["slo_p95_latency_ms"], p["slo_cost_per_success_usd"]
        calls_down = ledger.query(load_query("slo_downgraded_calls"), {**window, "scope_id": p["scope_id"]}).dicts()
        per_decision, totals = _price_downgrades(catalog, p["tenant_id"], calls_down)
        for decision_id, d in per_decision.items():
            downgrades.append({"policy_id": p["policy_id"], "scope_id": p["scope_id"], "decision_id": decision_id,
                               **{k: _text(v) for k, v in d.items()}})
        rows.append((p["policy_id"], p["scope_id"], calls, success, t_ok, _met(success, t_ok, success is not None and t_ok is not None and success >= Decimal(t_ok)),
                     p95, t_p95, _met(p95, t_p95, p95 is not None and t_p95 is not None and p95 <= t_p95),
                     cps, t_cost, _met(cps, t_cost, cps is not None and t_cost is not None and cps <= Decimal(t_cost)),
                     totals["calls"], totals["unpriced_calls"], totals["cost_usd"], totals["at_original_usd"], totals["saved_usd"]))
    return Result(list(SLO_COLUMNS), list(SLO_TYPES), rows, {"downgrades": downgrades,
                  "note": "LLM calls only; downgraded calls priced again at the model they stood in for (today's catalog)"})


def _price_downgrades(catalog: Any, tenant: str, calls: list[dict[str, Any]]) -> tuple[dict[str, dict], dict[str, Any]]:
    """Per decision and in total: calls, what they cost, their price at the original model, the saving."""
    from meterline.schemas.events import UsageEvent

    empty = lambda: {"from_model": "", "to_model": "", "calls": 0, "unpriced_calls": 0, "cost_usd": ZERO,  # noqa: E731
                     "at_original_usd": ZERO, "saved_usd": ZERO}
    per: dict[str, dict[str, Any]] = defaultdict(empty)
    total = empty()
    for c in calls:
        d = per[c["decision_id"]]
        d["from_model"], d["to_model"] = c["downgraded_from"], c["model"]
        event = UsageEvent(event_id=c["event_id"], ts=c["ts"], tenant_id=tenant, kind="llm_call", provider=c["provider"],
                           model=c["downgraded_from"], service_tier=c["service_tier"], batch=bool(c["batch"]),
                           **{k: int(c[k]) for k in SHEET})
        listed = catalog.list_price(event)
        for bucket in (d, total):
            bucket["calls"] += 1
            if listed is None:
                bucket["unpriced_calls"] += 1
                continue
            cost = Decimal(c["cost_usd"])
            bucket["cost_usd"] += cost
            bucket["at_original_usd"] += listed[1]
            bucket["saved_usd"] += listed[1] - cost
    return dict(per), total


def _text(value: Any) -> Any:
    from .report import exact

    return exact(value)
