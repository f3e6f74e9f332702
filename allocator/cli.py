"""`meterline budget set|list|delete` and `meterline allocator`."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Optional

import typer

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]

budget_app = typer.Typer(
    help=("Budgets per tenant / team / project / agent / session, in USD or GPU-hours, per day, week, month or a "
          "custom period. They live on the compacted budgets topic; the allocator turns them into decisions.\n\n"
          "Example:  meterline budget set --tenant acme --team research --amount 500 --period month "
          "--timezone Europe/Berlin --alert 50 --alert 80 --alert 100 --action low=deny --action batch=deny"),
    no_args_is_help=True,
)

simulate_app = typer.Typer(
    help=("Deterministic simulations of the real allocator engine, spend leases and guards with a simulated "
          "fleet (no Kafka, seconds). Reports overshoot, utilisation, pacing error and priorities served."),
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    from .plan_cli import plan_app
    from .strategies_cli import strategies

    simulate_app.command("strategies")(strategies)
    app.add_typer(plan_app, name="plan")
    app.add_typer(budget_app, name="budget")
    app.add_typer(simulate_app, name="simulate")
    app.command("allocator")(allocator)


@simulate_app.command("run")
def simulate_run(scenario: Annotated[str, typer.Argument(help="A scenario TOML file (format: allocator/simulator.py).")],
                 seed: Annotated[Optional[int], typer.Option(help="Override the scenario's seed.")] = None,
                 as_json: JsonFlag = False) -> None:
    """Run one scenario file and print its figures."""
    from meterline.console import fail

    from .simulator import load_scenario, simulate

    try:
        sc = load_scenario(scenario)
    except (OSError, ValueError, TypeError, KeyError) as err:
        fail(f"could not read scenario {scenario}: {err}")
    if seed is not None:
        sc.seed = seed
    _print_reports([simulate(sc)], as_json)


@simulate_app.command("suite")
def simulate_suite(as_json: JsonFlag = False) -> None:
    """Run the built-in scenarios (allocator/scenarios/) and print a table of their figures."""
    from .simulator import builtin_scenarios, simulate

    _print_reports([simulate(sc) for sc in builtin_scenarios()], as_json)


def _print_reports(reports: list[dict], as_json: bool) -> None:
    from meterline.console import console, emit_json, table

    if as_json:
        emit_json(reports if len(reports) > 1 else reports[0])
        return
    rows = [{"scenario": r["scenario"], "budget $": r["budget_usd"], "demand/budget": r["demand_ratio"],
             "used %": r["utilisation_pct"], "overshoot %": r["overshoot_pct"], "pacing RMSE %": r["pacing_rmse_pct"],
             "critical served %": r["served_pct"].get("critical", "-"), "high served %": r["served_pct"].get("high", "-"),
             "exhaustion→last call s": r["exhaustion_to_last_call_s"]} for r in reports if r["requests"]]
    if rows:
        console.print(table(rows))
    gpu = [{"scenario": r["scenario"], "GPUs": r["gpu"]["gpus"], "GPU used %": r["gpu"]["utilisation_pct"],
            "Jain (GPU-h ÷ entitlement)": r["gpu"]["jain"], "preemptions": r["gpu"]["preemptions"],
            "in-quota preemptions": r["gpu"]["in_quota_preemptions"], "GPU-s lost": r["gpu"]["lost_gpu_s"],
            "idle reclaims": r["gpu"]["idle_reclaims"]}
           for r in reports if r.get("gpu")]
    if gpu:
        console.print(table(gpu))


@budget_app.command("set")
def budget_set(
    tenant: Annotated[str, typer.Option(help="Tenant id (always required).")],
    amount: Annotated[str, typer.Option(help="Budget per period, exact decimal (USD, GPU-hours or vCPU-hours).")],
    team: Annotated[str, typer.Option(help="Team, to budget a team (or something below it).")] = "",
    project: Annotated[str, typer.Option(help="Project.")] = "",
    agent: Annotated[str, typer.Option(help="Agent id.")] = "",
    session: Annotated[str, typer.Option(help="Session id.")] = "",
    unit: Annotated[str, typer.Option(help="usd, gpu_hours or vcpu_hours (CPU time of `collect node` samples). A tenant's "
                                           "GPU-hour budget is also its nominal GPU share.")] = "usd",
    period: Annotated[str, typer.Option(help="day, week, month or custom.")] = "month",
    anchor: Annotated[Optional[datetime], typer.Option(help="Reset anchor (ISO time): its local time of day, weekday or day of month; start of a custom period.")] = None,
    period_seconds: Annotated[Optional[int], typer.Option(help="Length of a custom period.")] = None,
    timezone: Annotated[str, typer.Option(help="IANA zone the period boundaries are computed in.")] = "UTC",
    soft: Annotated[bool, typer.Option("--soft", help="Alert and throttle, never deny, no spend leases.")] = False,
    alert: Annotated[Optional[list[int]], typer.Option(help="Alert threshold in % (repeat). Each fires once per period.")] = None,
    action: Annotated[Optional[list[str]], typer.Option(help="class=action when exceeded, e.g. low=deny (repeat). Classes: critical high normal low batch; actions: allow throttle queue downgrade deny preempt.")] = None,
    policy_id: Annotated[Optional[str], typer.Option("--id", help="Policy id (default: scope:path:unit:period).")] = None,
    slo_p95_ms: Annotated[Optional[int], typer.Option("--slo-p95-ms", help="SLO: p95 latency of the scope's LLM calls, at most this many ms. A `downgrade` then only picks a cheaper model whose measured p95 for this scope meets it (else throttles).")] = None,
    slo_success_pct: Annotated[Optional[str], typer.Option("--slo-success-pct", help="SLO: calls with status ok, at least this many %, exact decimal (e.g. 99.5). Checked like --slo-p95-ms.")] = None,
    slo_cost_per_success: Annotated[Optional[str], typer.Option("--slo-cost-per-success", help="SLO: target USD per successful call, exact decimal; `meterline report slo` measures it.")] = None,
    slo_min_calls: Annotated[Optional[int], typer.Option("--slo-min-calls", help="SLO: calls of a model this scope must have made before its measured figures count (default 20).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create or replace a budget (same id replaces). Prints the stored policy.

    With an SLO (any --slo-* option) a downgrade is SLO-aware: among the cheaper models of the tier, one whose
    measured success rate and p95 latency for this scope (from the ledger, at least --slo-min-calls calls) meet
    the SLO, else a throttle. Example:  meterline budget set --tenant acme --agent bot --amount 50 --period day
    --action high=downgrade --slo-p95-ms 2000 --slo-success-pct 99 --slo-cost-per-success 0.01
    """
    from meterline.console import console, emit_json, fail
    from meterline.schemas.events import BudgetPolicy, InvalidEvent, build
    from meterline.settings import get_settings

    from .budgets import publish_policy
    from meterline.schemas.scopes import scope_ids

    ids = scope_ids(tenant, team, project, agent, session)
    scope, scope_id = list(ids.items())[-1]
    if skipped := [name for name, value, below in (("--team", team, project or agent or session),
                                                   ("--project", project, agent or session),
                                                   ("--agent", agent, session)) if below and not value]:
        from rich.markup import escape

        from meterline.console import err_console

        err_console.print(f"[yellow]note:[/] scope {escape(scope_id)} holds only calls reported without "
                          f"{' and '.join(n.lstrip('-') for n in skipped)}; for calls that report them add "
                          f"{' and '.join(skipped)}", soft_wrap=True)
    try:
        exact = Decimal(amount)
    except InvalidOperation:
        fail(f"--amount {amount!r} is not a decimal number; write it like 500 or 12.50")
    try:
        actions = dict(BudgetPolicy.model_fields["actions"].default_factory())  # type: ignore[misc]
        actions.update(_pairs(action or []))
        fields = dict(policy_id=policy_id or f"{scope}:{scope_id}:{unit}:{period}", tenant_id=tenant, scope=scope,
                      scope_id=scope_id, unit=unit, amount=exact, period=period, period_anchor=anchor,
                      period_seconds=period_seconds, timezone=timezone, hard=not soft, actions=actions)
        if alert:
            fields["alert_thresholds_pct"] = alert
        slo = _slo_fields(slo_p95_ms, slo_success_pct, slo_cost_per_success, slo_min_calls)
        if slo is not None:
            fields["slo"] = slo
        policy = build(BudgetPolicy, **fields)
    except (InvalidEvent, ValueError) as err:
        fail(f"{err}. See `meterline budget set --help`.")
    from meterline.errors import require_kafka

    require_kafka(get_settings())
    try:
        publish_policy(get_settings(), policy)
    except Exception as err:  # noqa: BLE001
        fail(f"could not publish the budget to {get_settings().bootstrap}: {err}. Is Kafka running (`meterline kafka start`)?")
    if as_json:
        emit_json(policy.model_dump(mode="json"))
    else:
        console.print(f"[green]budget {policy.policy_id}[/]: {policy.amount} {policy.unit} per {policy.period} on {scope} {scope_id}"
                      f" ({'hard' if policy.hard else 'soft'}, {policy.timezone})")


@budget_app.command("list")
def budget_list(as_json: JsonFlag = False, tenant: Annotated[Optional[str], typer.Option(help="Only this tenant.")] = None) -> None:
    """Show every live budget (read from the budgets topic)."""
    from meterline.console import console, emit_json, fail, table
    from meterline.settings import get_settings

    from meterline.errors import require_kafka

    from .budgets import read_policies

    require_kafka(get_settings())
    try:
        policies = [p for p in read_policies(get_settings()).values() if tenant is None or p.tenant_id == tenant]
    except Exception as err:  # noqa: BLE001
        fail(f"could not read budgets from {get_settings().bootstrap}: {err}. Is Kafka running?")
    if as_json:
        emit_json([p.model_dump(mode="json") for p in policies])
        return
    rows = [{"id": p.policy_id, "scope": p.scope, "scope_id": p.scope_id, "amount": p.amount, "unit": p.unit,
             "period": p.period, "tz": p.timezone, "hard": "hard" if p.hard else "soft",
             "alerts %": ",".join(map(str, p.alert_thresholds_pct)),
             "on exceed": " ".join(f"{k}={v}" for k, v in p.actions.items()), "slo": _slo_text(p.slo)} for p in policies]
    console.print(table(rows) if rows else "no budgets yet: `meterline budget set --help`")


@budget_app.command("delete")
def budget_delete(policy_id: Annotated[str, typer.Argument(help="The policy id, as `budget list` shows it.")], as_json: JsonFlag = False) -> None:
    """Delete a budget (a tombstone on the budgets topic); its decisions are retired."""
    from meterline.console import console, emit_json, fail
    from meterline.settings import get_settings

    from meterline.errors import require_kafka

    from .budgets import delete_policy

    require_kafka(get_settings())
    try:
        delete_policy(get_settings(), policy_id)
    except Exception as err:  # noqa: BLE001
        fail(f"could not delete {policy_id}: {err}. Is Kafka running?")
    emit_json({"deleted": policy_id}) if as_json else console.print(f"deleted budget {policy_id}")


def allocator(
    heartbeat: Annotated[float, typer.Option(help="Seconds between re-publishing live decisions.")] = 2.0,
    ttl: Annotated[float, typer.Option(help="Seconds a decision stays valid without a heartbeat.")] = 30.0,
    reconcile: Annotated[float, typer.Option(help="Seconds between ledger reconciliations (0 = off).")] = 60.0,
    group: Annotated[Optional[str], typer.Option(help="Consumer group, to split tenants over several allocators.")] = None,
    gpu_reclaim_idle: Annotated[float, typer.Option(
        min=1, help="Seconds a GPU holder (session, else agent) must have been idle (< 5 % utilisation) before it is "
                    "told to release its GPUs (`preempt` on its scope) while another tenant waits for GPUs.")] = 300.0,
) -> None:
    """Run the allocator: budgets + spend + GPU samples in, throttle decisions and budget alerts out.

    Decisions go to the compacted control topic (key scope:id:class); agents' guards obey them.
    Who waits for GPUs comes from guards (`Guard.wait_for_gpus`); who holds them from GPU samples.
    Stop with Ctrl-C.
    """
    import signal
    import threading
    from datetime import timedelta

    from meterline.console import console
    from meterline.settings import get_settings

    from .engine import Engine, EngineConfig
    from .ledger import ledger_spend_or_none
    from .service import AllocatorService

    from meterline.errors import require_kafka

    settings = get_settings()
    require_kafka(settings)
    engine = Engine(EngineConfig(decision_ttl=timedelta(seconds=ttl), gpu_reclaim_idle_for=timedelta(seconds=gpu_reclaim_idle)),
                    ledger_spend=ledger_spend_or_none(settings) if reconcile else None,
                    downgrade_for=_downgrade_for())
    from .slo import ledger_feeds_or_none

    model_stats, pacing = ledger_feeds_or_none(settings) if reconcile else (None, None)
    service = AllocatorService(settings, engine, heartbeat_every=heartbeat, reconcile_every=reconcile or 1e9, group_id=group,
                               model_stats=model_stats, pacing=pacing, refresh_every=reconcile or 1e9)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"allocator on {settings.bootstrap}: {settings.topic('control')} ← decisions; Ctrl-C stops")
    service.run(stop)
    console.print(f"allocator stopped: {dict(service.counts)}")


def _downgrade_for():
    try:
        from meterline.streams.pricing import load_catalog

        return load_catalog().downgrade_for
    except Exception:  # noqa: BLE001 - no catalog: downgrade decisions fall back to throttle
        return None


def _slo_fields(p95_ms: int | None, success_pct: str | None, cost: str | None, min_calls: int | None) -> dict | None:
    """The --slo-* options as the contract's `slo` object (None: no SLO); the contract checks the values."""
    if p95_ms is None and success_pct is None and cost is None and min_calls is None:
        return None
    out: dict = {"p95_latency_ms": p95_ms}
    for name, text, flag in (("success_rate_pct", success_pct, "--slo-success-pct"),
                             ("cost_per_success_usd", cost, "--slo-cost-per-success")):
        if text is not None:
            try:
                out[name] = Decimal(text)
            except InvalidOperation:
                raise ValueError(f"{flag} {text!r} is not a decimal number; write it like 99.5 or 0.01") from None
    if min_calls is not None:
        out["min_calls"] = min_calls
    return out


def _slo_text(slo) -> str:
    if slo is None:
        return ""
    parts = [f"p95≤{slo.p95_latency_ms}ms" if slo.p95_latency_ms is not None else "",
             f"ok≥{slo.success_rate_pct}%" if slo.success_rate_pct is not None else "",
             f"≤${slo.cost_per_success_usd}/ok" if slo.cost_per_success_usd is not None else ""]
    return " ".join(x for x in parts if x) + f" (n≥{slo.min_calls})"


def _pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--action {item!r} must look like class=action, e.g. low=deny")
        out[key.strip()] = value.strip()
    return out
