"""`meterline report …`, `meterline up`, `meterline demo` (and `meterline sql` if no one else adds it)."""
from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from meterline.console import console, emit_json, fail
from meterline.settings import get_settings

report_app = typer.Typer(
    help=(
        "Chargeback reports from the ledger. Periods: --since/--until take an ISO date or datetime (UTC), 'now', "
        "or '7d' / '12h' / '30m' ago; the default is this month so far. Works while `meterline up` runs "
        "(through its API) and when nothing runs (opening the store directly).\n\n"
        "Example:  meterline report chargeback --by team --since 7d --format csv > spend.csv"
    ),
    no_args_is_help=True,
)

Since = Annotated[Optional[str], typer.Option("--since", help="Start (inclusive): 2025-06-01, 2025-06-01T12:00, 7d, 12h.")]
Until = Annotated[Optional[str], typer.Option("--until", help="End (exclusive); default now.")]
Tenant = Annotated[Optional[str], typer.Option("--tenant", help="Only this tenant.")]
Team = Annotated[Optional[str], typer.Option("--team", help="Only this team.")]
Project = Annotated[Optional[str], typer.Option("--project", help="Only this project.")]
GpuIdle = Annotated[Optional[str], typer.Option(
    "--gpu-idle", help="Who is charged GPU time no process used: owner (its holder, `meterline gpu assign`), proportional "
                       "(that hour's users by share) or separate (an `idle` line). Default: METERLINE_GPU_IDLE_POLICY.")]
Fmt = Annotated[str, typer.Option("--format", "-f", help="table (people), json or csv (machines; money as exact decimal strings).")]


def _params(**kwargs: Any):
    from .report import ReportParams

    try:
        return ReportParams.parse(**kwargs)
    except ValueError as err:
        fail(str(err))


def _ledger():
    from meterline.errors import UserError

    from .store import open_ledger

    settings = get_settings()
    _refuse_other_ledger(settings)
    try:
        return open_ledger(settings)
    except UserError:  # already one line that says what to do
        raise
    except Exception as err:  # noqa: BLE001 - one clear line instead of a driver traceback
        fail(_open_error(settings, err))


def _refuse_other_ledger(settings: Any) -> None:
    """While `up` runs for this data dir, readers with an embedded DSN go through its API, so they read
    the ledger *up* serves (its up.json says which). Settings that name another one are a mistake."""
    import json

    from meterline.errors import UserError

    from .store import _answers, runfile, running_up

    if not settings.dsn.startswith("chdb:") or (url := running_up(settings)) is None:
        return
    try:
        served = json.loads(runfile(settings).read_text()).get("dsn")
    except (OSError, ValueError, AttributeError):
        return
    if served and _ledger_path(served) != _ledger_path(settings.dsn) and _answers(url):
        raise UserError(f"`meterline up` ({url}) serves the ledger {served} for {settings.data_dir}, but your settings "
                        f"name {settings.dsn}: use up's METERLINE_CLICKHOUSE_DSN, or stop up to read the other one")


def _ledger_path(dsn: str) -> str:
    """chdb:///a/b/ and chdb:///a/b are one store."""
    import os.path

    scheme, _, rest = dsn.partition("://")
    return f"{scheme.lower()}://{os.path.normpath(rest) if rest.startswith('/') else rest.rstrip('/')}"


def _open_error(settings: Any, err: Exception) -> str:
    text = str(err)
    if "EmbeddedServer" in text or "Unable to open the chdb engine" in text:
        return (f"the embedded store {settings.dsn} is held by another process (a `meterline sink` or `up` without an API?). "
                "Query through `meterline up` (it serves reports), or stop that process and retry.")
    return f"could not open the ledger at {settings.dsn}: {text}"


def run_named_report(name: str, params: Any):
    """The report's Result, direct or through `up`."""
    from .report import run_report
    from .store import LedgerError, RemoteLedger

    ledger = _ledger()
    try:
        if isinstance(ledger, RemoteLedger):
            return ledger.report(name, params.as_query())
        return run_report(ledger, name, params)
    except (LedgerError, ValueError, KeyError) as err:
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - ClickHouse errors: the first line says what is wrong
        fail(f"the ledger refused the query: {str(err).splitlines()[0][:300]} (has `meterline migrate` run?)")
    finally:
        ledger.close()


def _emit(name: str, params: Any, fmt: str) -> None:
    from .report import render

    if fmt not in ("table", "json", "csv"):
        fail(f"--format must be table, json or csv, not {fmt!r}")
    result = run_named_report(name, params)
    if fmt == "table" and not result.rows:
        console.print(f"{name}: no rows between {params.since:%Y-%m-%d %H:%M} and {params.until:%Y-%m-%d %H:%M} UTC "
                      "(widen --since, or check that the sink runs: `meterline up`)")
        return
    out = render(name, params, result, fmt)  # type: ignore[arg-type]
    if fmt == "table":
        console.print(out)
    else:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")


@report_app.command("chargeback")
def chargeback(
    by: Annotated[str, typer.Option("--by", help="tenant | team | project | agent | session | model | namespace | pod "
                                                      "(Kubernetes: GPU and CPU rows of pods; the rest is '(none)')")] = "tenant",
    since: Since = None, until: Until = None, tenant: Tenant = None, team: Team = None, project: Project = None, fmt: Fmt = "table",
    gpu_idle: GpuIdle = None,
) -> None:
    """Spend per tenant / team / project / agent / session / model: tokens, usage cost, GPU cost (process and
    idle time), total. Keys below the tenant are scope ids (acme/research), so equal team names of two
    tenants stay apart."""
    _emit("chargeback", _params(by=by, since=since, until=until, tenant=tenant, team=team, project=project,
                                gpu_idle=gpu_idle), fmt)


@report_app.command("top-sessions")
def top_sessions(
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many sessions.")] = 20,
    since: Since = None, until: Until = None, tenant: Tenant = None, team: Team = None, project: Project = None, fmt: Fmt = "table",
) -> None:
    """The most expensive agent sessions (usage + attributed GPU cost)."""
    _emit("top-sessions", _params(limit=limit, since=since, until=until, tenant=tenant, team=team, project=project), fmt)


@report_app.command("cost-per-action")
def cost_per_action(since: Since = None, until: Until = None, tenant: Tenant = None, team: Team = None,
                    project: Project = None, fmt: Fmt = "table") -> None:
    """Cost per successful action, per agent: all spend (failed calls, GPU) over the calls that succeeded."""
    _emit("cost-per-action", _params(since=since, until=until, tenant=tenant, team=team, project=project), fmt)


@report_app.command("gpu")
def gpu(since: Since = None, until: Until = None, fmt: Fmt = "table", gpu_idle: GpuIdle = None) -> None:
    """GPU-hours and their cost against utilisation per device: idle_cost is money paid for idle cycles,
    unused_cost the time no process ran (charged by the idle policy to unused_charged_to)."""
    _emit("gpu", _params(since=since, until=until, gpu_idle=gpu_idle), fmt)


@report_app.command("strategies")
def strategies(since: Since = None, until: Until = None, fmt: Fmt = "table") -> None:
    """The latest stored `meterline simulate strategies --store` run in the period: the seed's strategy table."""
    _emit("strategies", _params(since=since, until=until), fmt)


@report_app.command("burn-down")
def burn_down(tenant: Tenant = None, fmt: Fmt = "table") -> None:
    """Every budget this period: spent, remaining, % used vs % of period elapsed, forecast exhaustion."""
    _emit("burn-down", _params(tenant=tenant), fmt)


@report_app.command("slo")
def slo(since: Since = None, until: Until = None, tenant: Tenant = None, fmt: Fmt = "table",
        as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False) -> None:
    """Per budget with an SLO (`meterline budget set --slo-p95-ms/--slo-success-pct/--slo-cost-per-success`):
    its LLM calls' success rate and nearest-rank p95 latency against the targets, cost per successful call,
    and what its downgrades saved: each call made on the cheaper model priced again at the model it stood in
    for, minus what it cost (exact). JSON adds the saving per downgrade decision (`downgrades`)."""
    from .report import render

    fmt = "json" if as_json else fmt
    if fmt not in ("table", "json", "csv"):
        fail(f"--format must be table, json or csv, not {fmt!r}")
    params = _params(since=since, until=until, tenant=tenant)
    result = run_named_report("slo", params)
    if fmt == "table" and not result.rows:
        console.print("slo: no budget has an SLO (add one: `meterline budget set ... --slo-p95-ms 2000 --slo-success-pct 99`)")
        return
    out = render("slo", params, result, fmt)  # type: ignore[arg-type]
    if fmt != "table":
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
        return
    console.print(out)
    if result.meta.get("downgrades"):
        from rich.table import Table
        from rich.text import Text

        table = Table(title="what each downgrade saved (calls priced again at the model they stood in for)", header_style="bold")
        for col in ("scope", "decision", "from → to", "calls", "cost $", "at original $", "saved $"):
            table.add_column(col, justify="left" if col in ("scope", "decision", "from → to") else "right")
        for d in result.meta["downgrades"]:
            money = [f"{Decimal(d[k]).quantize(Decimal('0.0001')):,}" for k in ("cost_usd", "at_original_usd", "saved_usd")]
            table.add_row(Text(d["scope_id"]), d["decision_id"][:8], Text(f"{d['from_model']} → {d['to_model']}"),
                          str(d["calls"]), *money)
        console.print(table)


@report_app.command("drivers")
def drivers(
    by: Annotated[str, typer.Option("--by", help="tenant | team | agent (teams and agents as tenant/name)")] = "tenant",
    period: Annotated[Optional[str], typer.Option("--period", help="Length of the current period, ending at --until or now: 7d, 24h, 2w (default 7d).")] = None,
    vs: Annotated[str, typer.Option("--vs", help="What to compare with: previous (the period of equal length before).")] = "previous",
    since: Since = None, until: Until = None, tenant: Tenant = None, team: Team = None, project: Project = None, fmt: Fmt = "table",
) -> None:
    """Why spend changed vs the previous period: call volume, model mix, tokens per call, cache hit rate,
    unit price, tool/API calls and GPU time, in USD, summing exactly to the change (Shapley, see app/drivers.py)."""
    from .drivers import period_params, render

    if vs != "previous":
        fail(f"--vs must be previous, not {vs!r}")
    if fmt not in ("table", "json", "csv"):
        fail(f"--format must be table, json or csv, not {fmt!r}")
    try:
        params = period_params(period, since=since, until=until, by=by, tenant=tenant, team=team, project=project)
    except ValueError as err:
        fail(str(err))
    result = run_named_report("drivers", params)
    if fmt == "table" and not result.rows:
        console.print("drivers: no spend in either period (widen --period, or check that the sink runs: `meterline up`)")
        return
    out = render(params, result, fmt)
    if fmt == "table":
        console.print(out)
    else:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")


@report_app.command("totals")
def totals(since: Since = None, until: Until = None, fmt: Fmt = "table", gpu_idle: GpuIdle = None) -> None:
    """Ledger grand totals (priced events, usage, process and idle GPU cost, decisions, anomalies) for a period."""
    _emit("totals", _params(since=since, until=until, gpu_idle=gpu_idle), fmt)


@report_app.command("focus")
def focus(
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv or parquet.")] = "csv",
    since: Since = None, until: Until = None, tenant: Tenant = None,
    billing_account: Annotated[str, typer.Option(help="FOCUS BillingAccountId / InvoiceIssuerName.")] = "meterline",
    focus_version: Annotated[str, typer.Option("--focus-version", help="FOCUS version: 1.3, or 1.2 for older tools.")] = "1.3",
    gpu_idle: GpuIdle = None,
) -> None:
    """FinOps FOCUS 1.3 (or 1.2) export: cached and uncached tokens as separate rows, GPU-hours (process time
    per session, idle time as allocated rows), x_ columns for sessions and agents."""
    from .focus import VERSIONS, export

    if fmt not in ("csv", "parquet"):
        fail(f"--format must be csv or parquet, not {fmt!r}")
    if focus_version not in VERSIONS:
        fail(f"--focus-version must be one of {', '.join(VERSIONS)}, not {focus_version!r}")
    params = _params(since=since, until=until, tenant=tenant, gpu_idle=gpu_idle)
    ledger = _ledger()
    try:
        rows = export(ledger, params, out, fmt, billing_account, focus_version)
    except Exception as err:  # noqa: BLE001
        fail(f"FOCUS export failed: {str(err).splitlines()[0][:300]}")
    finally:
        ledger.close()
    console.print(f"wrote {rows} FOCUS {focus_version} {fmt} rows to {out}")


def sql_command(
    query: Annotated[str, typer.Argument(help="One SELECT over the ledger (WITH, UNION, subqueries fine), run in a sandbox.")],
    fmt: Fmt = "table",
) -> None:
    """Run read-only SQL on the ledger (directly, or through `meterline up` while it runs)."""
    from meterline.sql.sandbox import failure

    from .report import ReportParams, render
    from .store import Result

    fmt = getattr(fmt, "value", fmt)
    ledger = _ledger()
    try:
        result: Result = ledger.user_query(query)
    except Exception as err:  # noqa: BLE001
        fail(f"query failed: {failure(err)}")
    finally:
        ledger.close()
    if fmt == "json":  # the same shape as the direct `meterline sql --format json`: a list of rows
        from .report import exact

        emit_json([{k: exact(v) for k, v in row.items()} for row in result.dicts()])
        return
    params = ReportParams.parse()
    out = render("sql", params, result, fmt)  # type: ignore[arg-type]
    if fmt == "table":
        out.title = None
        console.print(out)
    else:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")


def _through_up(original):
    """Another component's `sql` command, routed through `meterline up` while up holds the embedded store."""
    import functools

    @functools.wraps(original)
    def sql(*args: Any, **kwargs: Any) -> None:
        from .store import running_up

        settings = get_settings()
        if settings.dsn.startswith("chdb:") and running_up(settings):
            return sql_command(kwargs.get("query", args[0] if args else ""), kwargs.get("fmt", "table"))
        return original(*args, **kwargs)

    return sql


def register(app: typer.Typer) -> None:
    app.add_typer(report_app, name="report")
    from .forecast_cli import register as register_forecast

    register_forecast(app)  # `meterline forecast` (app/forecast.py)
    sql = next((c for c in app.registered_commands if c.name == "sql"), None)
    if sql is None:
        app.command("sql")(sql_command)
    elif sql.callback is not None:
        sql.callback = _through_up(sql.callback)
    from .up import up_command
    from .demo import demo_command

    app.command("up")(up_command)
    app.command("demo")(demo_command)


__all__ = ["register", "emit_json"]
