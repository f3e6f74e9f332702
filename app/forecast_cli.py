"""`meterline forecast` and `meterline forecast backtest` (the method: app/forecast.py)."""
from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import typer

from meterline.console import console, fail

forecast_app = typer.Typer(
    help=("Period-end spend per tenant / team / project / agent / model with 80 % and 95 % prediction intervals, "
          "from the ledger's hourly rollups (ETS with daily/weekly seasonality and a damped trend; see "
          "`meterline forecast backtest`). Forecasts are statistical estimates, quantised to 1e-6 USD.\n\n"
          "Example:  meterline forecast --by team --period month --json"),
    invoke_without_command=True,
)
Fmt = Annotated[str, typer.Option("--format", "-f", help="table (people), json or csv (machines; money as exact decimal strings).")]
Tenant = Annotated[Optional[str], typer.Option("--tenant", help="Only this tenant.")]
AsJson = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
_HOURS = re.compile(r"^(\d+)\s*([hdw])$")


def hours(text: str, option: str) -> int:
    """'24h', '2d', '1w' -> hours."""
    m = _HOURS.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        fail(f"{option} must be a number of hours, days or weeks (24h, 2d, 1w), not {text!r}")
    return int(m.group(1)) * {"h": 1, "d": 24, "w": 168}[m.group(2)]


def _check(fmt: str, tenant: str | None, as_json: bool = False) -> str:
    """The format to print in, after --json; one-line errors for what cannot be run."""
    if as_json and fmt not in ("table", "json"):
        fail(f"--json and --format {fmt} disagree; give one of them")
    fmt = "json" if as_json else fmt
    if fmt not in ("table", "json", "csv"):
        fail(f"--format must be table, json or csv, not {fmt!r}")
    if tenant is not None and not tenant.strip():
        fail("--tenant is empty; leave it out to forecast every tenant")
    return fmt


def _print(out: Any, fmt: str) -> None:
    if fmt == "table":
        console.print(out)
    else:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")


@forecast_app.callback()
def forecast(
    ctx: typer.Context,
    by: Annotated[str, typer.Option("--by", help="tenant | team | project | agent | model")] = "tenant",
    period: Annotated[str, typer.Option("--period", help="month | week | day (UTC calendar periods).")] = "month",
    tenant: Tenant = None, fmt: Fmt = "table", as_json: AsJson = False,
) -> None:
    """Per key: spent so far this period, forecast period-end spend, 80 % and 95 % interval bounds.
    Keys below the tenant are scope ids (acme/research)."""
    if ctx.invoked_subcommand:
        return
    from .cli import _ledger
    from .forecast import forecast_report
    from .report import ReportParams, render

    fmt = _check(fmt, tenant, as_json)
    ledger = _ledger()
    try:
        result = forecast_report(ledger, by, period, tenant or "")
    except ValueError as err:
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - ClickHouse errors: the first line says what is wrong
        fail(f"the ledger refused the query: {str(err).splitlines()[0][:300]} (has `meterline migrate` run?)")
    finally:
        ledger.close()
    start, end = (datetime.fromisoformat(result.meta[k]) for k in ("period_start", "period_end"))
    if fmt == "table" and not result.rows:
        console.print(f"forecast: no spend in the last 28 days or this {period} (check that the sink runs: `meterline up`)")
        return
    params = ReportParams(since=start, until=end, by=by, tenant=tenant or "")
    out = render("forecast", params, result, fmt)  # type: ignore[arg-type]
    if fmt == "table":
        out.caption = f"now {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {result.meta['note']}"
    _print(out, fmt)


@forecast_app.command("backtest")
def backtest_command(
    horizon: Annotated[str, typer.Option("--horizon", help="What is forecast: the spend of the next 24h, 7d, 1w…")] = "24h",
    origins: Annotated[int, typer.Option("--origins", help="Rolling origins per series.")] = 30,
    step: Annotated[str, typer.Option("--step", help="Hours between origins (not a multiple of 24: every time of day).")] = "7h",
    by: Annotated[str, typer.Option("--by", help="The ledger's series: tenant | team | project | agent | model")] = "tenant",
    tenant: Tenant = None,
    synthetic: Annotated[Optional[int], typer.Option(
        "--synthetic", metavar="SEED", help="Backtest a seeded synthetic trace (8 weeks, daily and weekly cycle, trend, "
                                            "noise) instead of the ledger.")] = None,
    fmt: Fmt = "table", as_json: AsJson = False,
) -> None:
    """MAPE of the horizon's spend and coverage of the 80 % / 95 % intervals on rolling origins, for the
    forecaster (ets) and a seasonal naive baseline measured in the same run (mape_ratio = method / baseline)."""
    from .forecast import HISTORY_HOURS, backtest, ledger_series, synthetic_trace

    fmt = _check(fmt, tenant, as_json)
    h, s = hours(horizon, "--horizon"), hours(step, "--step")
    if not 0 < origins <= 10_000:
        fail("--origins must be between 1 and 10000")
    if synthetic is not None:
        series: Any = {f"synthetic-{synthetic}": synthetic_trace(seed=synthetic)}
    else:
        from .cli import _ledger

        ledger = _ledger()
        try:
            series = ledger_series(ledger, by, tenant or "", datetime.now(timezone.utc),
                                   HISTORY_HOURS + h + (origins - 1) * s)
        except ValueError as err:
            fail(str(err))
        finally:
            ledger.close()
        if not series:
            fail("backtest: the ledger has no spend to backtest (try --synthetic 1)")
    rows = backtest(series, h, origins, s)
    if not rows[0]["origins"]:
        fail(f"backtest: no series is long enough for a {h}h horizon after 48 hours of history")
    _print(render_backtest(rows, fmt), fmt)


def render_backtest(rows: list[dict[str, Any]], fmt: str) -> Any:
    import json

    if fmt == "json":
        return json.dumps({"report": "forecast backtest", "rows": rows})
    columns = list(rows[0])
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    from rich.table import Table

    table = Table(title=f"forecast backtest · {rows[0]['origins']} origins · next {rows[0]['horizon_hours']}h's spend",
                  header_style="bold")
    headers = {"method": "method", "mape_pct": "MAPE %", "coverage80_pct": "cov 80 %", "coverage95_pct": "cov 95 %",
               "width80_pct": "width 80 %", "seconds": "s", "mape_ratio": "MAPE ratio"}
    columns = list(headers)  # origins and horizon are in the title; json/csv carry every field
    for c in columns:
        table.add_column(headers.get(c, c), justify="left" if c == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(("—" if r[c] is None else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])) for c in columns))
    return table


def register(app: typer.Typer) -> None:
    app.add_typer(forecast_app, name="forecast")
