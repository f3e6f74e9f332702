"""Chargeback reports over the ledger: the SQL lives in sql/queries/*.sql.

Every filter is a ClickHouse query parameter (`{name:Type}`, bound by the server),
including the grouping level, so nothing a user types is ever pasted into SQL. Reports run the same on a direct store and through `up`'s API.
On a cluster the ledger that runs a query reads the `_all` Distributed tables
(`DirectLedger`, `ledger.render_reads`), so the SQL files name plain tables.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal
from zoneinfo import ZoneInfo

from .gpu_idle import POLICIES, idle_lines, matching
from .store import Result

QUERIES_DIR = Path(__file__).resolve().parents[1] / "sql" / "queries"
# --by levels: the tenant path's depth (keys below the tenant are qualified scope ids: 'acme/research'), or model
DIMENSIONS = {"tenant": 1, "team": 2, "project": 3, "agent": 4, "session": 5, "model": 0, "namespace": 0, "pod": 0}
# Kubernetes keys (GPU process rows from `collect dcgm`, compute rows from `collect node`); what has no pod is
# the key '' (tables show it as "(none)", json and csv keep '')
K8S_DIMENSIONS = ("namespace", "pod")
# The tenant of GPU time no session owns: the stream worker's spend uses this name
# (streams/worker.py), so reports do too and the two reconcile tenant by tenant.
UNATTRIBUTED = "unattributed"
Format = Literal["table", "json", "csv"]
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def query_dir() -> Path:
    """sql/queries in a source checkout; the installed package's copy otherwise."""
    if QUERIES_DIR.is_dir():
        return QUERIES_DIR
    import meterline.sql

    return Path(meterline.sql.__file__).with_name("queries")


@lru_cache(maxsize=None)
def load_query(name: str) -> str:
    return (query_dir() / f"{name}.sql").read_text()


# ---- parameters -----------------------------------------------------------------------------


def parse_when(text: str | datetime | None, now: datetime) -> datetime | None:
    """'now', '7d' / '12h' / '30m' ago, an ISO date or datetime (naive means UTC)."""
    if text is None or text == "":
        return None
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=timezone.utc)
    text = text.strip()
    if text == "now":
        return now
    if m := _RELATIVE.match(text):
        return now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use an ISO date (2025-06-01), a datetime, 'now', or '7d' / '12h' / '30m' ago") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass
class ReportParams:
    """What every report accepts. since/until default to this month so far."""

    since: datetime
    until: datetime
    by: str = "tenant"
    tenant: str = ""
    team: str = ""
    project: str = ""
    limit: int = 20
    gpu_idle: str = "proportional"  # how GPU time no process used is charged (app/gpu_idle.py)

    @classmethod
    def parse(cls, since: Any = None, until: Any = None, by: str | None = None, tenant: str | None = None,
              team: str | None = None, project: str | None = None, limit: Any = None,
              now: datetime | None = None, gpu_idle: str | None = None) -> ReportParams:
        now = now or datetime.now(timezone.utc)
        end = parse_when(until, now) or now + timedelta(seconds=1)  # `now` included
        start = parse_when(since, now) or end.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        if start >= end:
            raise ValueError(f"--since ({start.isoformat()}) must be before --until ({end.isoformat()})")
        by = by or "tenant"
        if by not in DIMENSIONS:
            raise ValueError(f"--by must be one of {', '.join(DIMENSIONS)}, not {by!r}")
        limit = int(limit) if limit not in (None, "") else 20
        if not 0 < limit <= 100_000:
            raise ValueError("--limit must be between 1 and 100000")
        for name, value in (("tenant", tenant), ("team", team), ("project", project)):
            if value is not None and not value.strip():  # '' would read as "all": a typo must not widen the report
                raise ValueError(f"--{name} is empty; leave it out to report every {name}")
        if gpu_idle in (None, ""):
            from meterline.settings import get_settings

            gpu_idle = get_settings().gpu_idle_policy
        if gpu_idle not in POLICIES:
            raise ValueError(f"--gpu-idle must be one of {', '.join(POLICIES)}, not {gpu_idle!r}")
        return cls(start, end, by, tenant or "", team or "", project or "", limit, gpu_idle)

    def query_parameters(self) -> dict[str, Any]:
        return {"since": self.since, "until": self.until, "tenant": self.tenant, "team": self.team,
                "project": self.project, "by": self.by, "depth": DIMENSIONS[self.by], "limit": self.limit,
                "unattributed": UNATTRIBUTED}

    def as_query(self) -> dict[str, str]:
        """The same parameters as strings, for `up`'s /api/report."""
        filters = {name: value for name, value in (("tenant", self.tenant), ("team", self.team), ("project", self.project))
                   if value}
        return {"since": self.since.isoformat(), "until": self.until.isoformat(), "by": self.by, **filters,
                "limit": str(self.limit), "gpu_idle": self.gpu_idle}


# ---- the reports ----------------------------------------------------------------------------


class Querier:
    """Anything with .query(sql, parameters) -> Result (DirectLedger, RemoteLedger)."""

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Result: ...


def _sql_report(name: str, keys: tuple[str, ...]) -> Callable[[Querier, ReportParams], Result]:
    def run(ledger: Querier, params: ReportParams) -> Result:
        all_params = params.query_parameters()
        return ledger.query(load_query(name), {k: all_params[k] for k in keys})

    return run


FILTERS = ("since", "until", "tenant", "team", "project")

REPORTS: dict[str, tuple[str, Callable[[Querier, ReportParams], Result]]] = {
    "chargeback": ("Spend per tenant / team / project / agent / session / model (--by), idle GPU time in.",
                   _sql_report("chargeback", ("by", "depth", *FILTERS, "unattributed"))),
    "top-sessions": ("The most expensive agent sessions.", _sql_report("top_sessions", (*FILTERS, "limit"))),
    "cost-per-action": ("Cost per successful action, per agent (failed calls and GPU time included).",
                        _sql_report("cost_per_action", FILTERS)),
    "gpu": ("GPU-hours and their cost against utilisation, per device.", _sql_report("gpu_utilisation", ("since", "until"))),
    "totals": ("Ledger grand totals: what every chargeback adds up to.", _sql_report("ledger_totals", ("since", "until"))),
    "strategies": ("The latest stored `simulate strategies --store` run: the strategy table.",
                   _sql_report("strategy_results", ("since", "until"))),
}


def run_report(ledger: Querier, name: str, params: ReportParams) -> Result:
    if name == "burn-down":
        return burn_down(ledger, params)
    if name == "drivers":  # why spend moved vs the previous period (app/drivers.py)
        from .drivers import drivers_report

        return drivers_report(ledger, params)
    if name == "slo":  # SLO attainment and what downgrades saved (app/slo_report.py)
        from .slo_report import slo_report

        return slo_report(ledger, params)
    if name not in REPORTS:
        raise KeyError(f"no report {name!r}; reports: {', '.join(REPORT_NAMES)}")
    result = REPORTS[name][1](ledger, params)
    if name in IDLE_MERGES:
        lines = idle_lines(ledger, params.since, params.until, params.gpu_idle)
        result = IDLE_MERGES[name](result, params, lines)
        result.meta["gpu_idle"] = params.gpu_idle
    if name == "chargeback":
        result.columns[0] = params.by  # the grouping column is named after the dimension
    return result


# ---- idle GPU time in the reports (app/gpu_idle.py) ------------------------------------------

MONEY = "Decimal(38, 18)"


def _chargeback_with_idle(result: Result, params: ReportParams, lines: list[dict[str, Any]]) -> Result:
    """Each idle line added to the chargeback line of its key (a new line if none), as gpu_idle_* columns."""
    at = result.columns.index("total_cost_usd")
    columns = result.columns[:at] + ["gpu_idle_seconds", "gpu_idle_cost_usd"] + result.columns[at:]
    types = result.types[:at] + [MONEY, MONEY] + result.types[at:]
    rows = {row[0]: [*row[:at], Decimal(0), Decimal(0), *row[at:]] for row in result.rows}
    for line in matching(lines, params.tenant, params.team, params.project):
        key = idle_key(line, params.by)
        row = rows.setdefault(key, [key] + [0 if t.startswith(("UInt", "Int")) else Decimal(0) for t in types[1:]])
        row[at] += line["gpu_seconds"]
        row[at + 1] += line["cost_usd"]
        row[at + 2] += line["cost_usd"]
    ordered = sorted(rows.values(), key=lambda r: (-r[at + 2], r[0]))
    return Result(columns, types, [tuple(r) for r in ordered])


def idle_key(line: dict[str, Any], by: str) -> str:
    """An idle line's chargeback key: its GPU's model line, or its scope id at the --by level."""
    if by == "model":
        return f"gpu:{line['gpu_name']}"
    if by in K8S_DIMENSIONS:
        return ""  # idle time belongs to a device, not to a pod
    return "/".join([line["tenant_id"], line["team"], line["project"], "", ""][: DIMENSIONS[by]])


def _totals_with_idle(result: Result, params: ReportParams, lines: list[dict[str, Any]]) -> Result:
    """gpu_idle_cost_usd and total_cost_usd (usage + process GPU + idle GPU + CPU + memory): what every chargeback
    adds up to."""
    idle = sum((line["cost_usd"] for line in lines), Decimal(0))
    row = dict(zip(result.columns, result.rows[0]))
    total = sum((row[c] or Decimal(0) for c in ("usage_cost_usd", "gpu_cost_usd", "cpu_cost_usd", "memory_cost_usd")), idle)
    return Result(result.columns + ["gpu_idle_cost_usd", "total_cost_usd"], result.types + [MONEY, MONEY],
                  [(*result.rows[0], idle, total)])


def _gpu_with_idle(result: Result, params: ReportParams, lines: list[dict[str, Any]]) -> Result:
    """Per device: what processes were charged, and the idle rest with whom it was charged to."""
    idle: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    charged_to: dict[tuple[str, str], set[str]] = defaultdict(set)
    for line in lines:
        idle[(line["node"], line["gpu_uuid"])] += line["cost_usd"]
        charged_to[(line["node"], line["gpu_uuid"])].add(line["tenant_id"])
    at = result.columns.index("cost_usd") + 1
    rows = []
    for row in result.rows:
        device = (row[0], row[1])
        rows.append((*row[:at], row[at - 1] - idle[device], idle[device], ", ".join(sorted(charged_to[device])), *row[at:]))
    return Result(result.columns[:at] + ["process_cost_usd", "unused_cost_usd", "unused_charged_to"] + result.columns[at:],
                  result.types[:at] + [MONEY, MONEY, "String"] + result.types[at:], rows)


IDLE_MERGES: dict[str, Callable[[Result, ReportParams, list[dict[str, Any]]], Result]] = {
    "chargeback": _chargeback_with_idle, "totals": _totals_with_idle, "gpu": _gpu_with_idle}


REPORT_NAMES = (*REPORTS, "burn-down", "drivers", "slo")
TENANT_REPORTS = ("chargeback", "top-sessions", "cost-per-action", "burn-down", "drivers", "slo")  # those that filter by tenant


# ---- budget burn-down -----------------------------------------------------------------------


def period_bounds(period: str, tz: str, now: datetime, anchor: datetime | None = None,
                  period_seconds: int | None = None) -> tuple[datetime, datetime]:
    """The budget period containing `now`: day / week (Monday) / month in the policy's zone, or custom."""
    if period == "custom" and anchor and period_seconds:
        n = int((now - anchor).total_seconds() // period_seconds)
        start = anchor + timedelta(seconds=n * period_seconds)
        return start, start + timedelta(seconds=period_seconds)
    local = now.astimezone(ZoneInfo(tz))
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = midnight, midnight + timedelta(days=1)
    elif period == "week":
        start = midnight - timedelta(days=local.weekday())
        end = start + timedelta(days=7)
    else:  # month
        start = midnight.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    # wall-clock midnight in the zone, then UTC (DST days are 23 or 25 hours long)
    zone = ZoneInfo(tz)
    return (start.replace(tzinfo=None).replace(tzinfo=zone).astimezone(timezone.utc),
            end.replace(tzinfo=None).replace(tzinfo=zone).astimezone(timezone.utc))


BURN_DOWN_TYPES = ["String", "String", "String", "String", "String", "Decimal(38, 18)", "DateTime64(3, 'UTC')",
                   "DateTime64(3, 'UTC')", "Decimal(38, 18)", "Decimal(38, 18)", "Decimal(38, 2)", "Decimal(38, 2)",
                   "Nullable(DateTime64(3, 'UTC'))", "String"] + ["Nullable(Decimal(38, 6))"] * 3
BURN_DOWN_COLUMNS = ["policy_id", "tenant_id", "scope", "scope_id", "unit", "amount", "period_start", "period_end",
                     "spent", "remaining", "used_pct", "elapsed_pct", "forecast_exhaustion", "burn",
                     "forecast_spend", "forecast_lo80", "forecast_hi80"]


UNIT_FIELDS = {"usd": 1, "gpu_hours": 2, "vcpu_hours": 3}  # scope_spend (seconds of hour units) / scope_hourly columns
HOURS_PLACES = Decimal("1e-18")  # as the ledger's Decimal(38, 18)


def burn_down(ledger: Querier, params: ReportParams, now: datetime | None = None) -> Result:
    """Per budget: spent and remaining this period, against the straight pacing line.

    `burn` is a sparkline of remaining budget over the period so far (for people);
    forecast_exhaustion extrapolates the period's average spend rate; forecast_spend and its 80 %
    interval (forecast_lo80/hi80) are the period-end spend forecast from the hourly rollups (app/forecast.py).
    """
    now = now or datetime.now(timezone.utc)
    policies = ledger.query(load_query("budget_policies"), {"tenant": params.tenant}).dicts()
    rows = []
    for p in policies:
        start, end = period_bounds(p["period"], p["timezone"] or "UTC", now, p["period_anchor"], p["period_seconds"])
        bucket = max(60, int((end - start).total_seconds() // 24))
        spend = ledger.query(load_query("scope_spend"), {
            **scope_filter(p["scope"], p["scope_id"], p["tenant_id"]), "since": start,
            "until": min(end, now + timedelta(seconds=1)), "bucket_seconds": bucket}).rows
        field = UNIT_FIELDS.get(p["unit"], 1)
        spent = sum((Decimal(r[field]) for r in spend), Decimal(0))
        if field > 1:  # an hour budget: seconds summed exactly, divided once
            spend = [(*r[:field], Decimal(r[field]) / 3600, *r[field + 1:]) for r in spend]
            spent = (spent / 3600).quantize(HOURS_PLACES)
        amount = Decimal(p["amount"])
        elapsed = max((now - start).total_seconds(), 1.0)
        forecast = None
        if spent >= amount:
            forecast = now
        elif spent > 0:
            rate = spent / Decimal(elapsed)
            eta = now + timedelta(seconds=float((amount - spent) / rate))
            forecast = eta if eta < end else None
        rows.append((p["policy_id"], p["tenant_id"], p["scope"], p["scope_id"], p["unit"], amount, start, end, spent,
                     amount - spent, _pct(spent, amount), _pct(Decimal(elapsed), Decimal((end - start).total_seconds())),
                     forecast, _sparkline(spend, field, amount), *_forecast_band(ledger, p, spent, now, end, field)))
    return Result(BURN_DOWN_COLUMNS, BURN_DOWN_TYPES, rows)


def _forecast_band(ledger: Querier, policy: dict[str, Any], spent: Decimal, now: datetime, end: datetime,
                   field: int) -> tuple[Decimal | None, Decimal | None, Decimal | None]:
    """Period-end spend and its 80 % interval for one budget (None for session budgets: no rollup has sessions)."""
    from .forecast import HISTORY_HOURS, hour_of, period_end_forecast

    if policy["scope"] == "session":
        return None, None, None
    scope = scope_filter(policy["scope"], policy["scope_id"], policy["tenant_id"])
    hourly = ledger.query(load_query("scope_hourly"), {
        **{k: v for k, v in scope.items() if k != "session"},
        "since": hour_of(now) - timedelta(hours=HISTORY_HOURS), "until": now + timedelta(seconds=1)}).rows
    values, _, _ = period_end_forecast({r[0]: r[field] for r in hourly}, spent, now, end)
    return values["mean"], values["lo80"], values["hi80"]


SCOPE_DEPTH = {"tenant": 0, "team": 1, "project": 2, "agent": 3, "session": 4}


def scope_filter(scope: str, scope_id: str, tenant_id: str = "") -> dict[str, Any]:
    """scope_spend.sql parameters for a budget scope id: the allocator's tenant path
    ('acme/research/chat'); an id without '/' below tenant level is read as tenant_id/<id>."""
    depth = SCOPE_DEPTH[scope]
    path = scope_id if depth == 0 or "/" in scope_id or not tenant_id else f"{tenant_id}/{scope_id}"
    parts = (path.split("/") + [""] * 5)[:5]
    return {"tenant": parts[0], "team": parts[1], "project": parts[2], "agent": parts[3], "session": parts[4], "depth": depth}


def _pct(part: Decimal, whole: Decimal) -> Decimal:
    return (part * 100 / whole).quantize(Decimal("0.01"), ROUND_HALF_EVEN) if whole else Decimal(0)


def _sparkline(buckets: list[tuple], field: int, amount: Decimal) -> str:
    blocks = " ▁▂▃▄▅▆▇█"
    remaining, out = amount, []
    for row in buckets:
        remaining -= Decimal(row[field])
        level = max(Decimal(0), min(Decimal(1), remaining / amount)) if amount else Decimal(0)
        out.append(blocks[int(level * (len(blocks) - 1))])
    return "".join(out)


# ---- output ---------------------------------------------------------------------------------


def exact(value: Any) -> Any:
    """Money and quantities as exact plain decimal strings ('12.5', never '1.25E+1')."""
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return "0" if text in ("-0", "") else text
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def to_json_doc(name: str, params: ReportParams, result: Result) -> dict[str, Any]:
    return {"report": name, "since": params.since.isoformat(), "until": params.until.isoformat(), **result.meta,
            "rows": [{k: exact(v) for k, v in row.items()} for row in result.dicts()]}


def to_csv(result: Result) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if v is None else csv_text(v) if isinstance(v, str) else exact(v) for v in row])
    return buf.getvalue()


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """User text for a CSV cell: a spreadsheet runs a cell that starts like a formula (a tenant named
    `=HYPERLINK(...)`), so such text gets a leading apostrophe (OWASP's CSV-injection rule). Numbers
    are never text here, so a negative amount keeps its sign."""
    return "'" + value if value.startswith(FORMULA_START) else value


def display(value: Any, column: str) -> str:
    """Human rendering for tables: money to 4 places (json/csv stay exact)."""
    if value is None:
        return "—"
    if isinstance(value, Decimal):
        if column.endswith("_usd") or column in ("amount", "spent", "remaining") or column.startswith("forecast_"):
            return f"{value.quantize(Decimal('0.0001'), ROUND_HALF_EVEN):,}"
        return exact(value) if column.endswith("pct") else f"{value.quantize(Decimal('0.0001'), ROUND_HALF_EVEN):,}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value) if value != "" else "(none)"


def render(name: str, params: ReportParams, result: Result, fmt: Format) -> str | Any:
    """csv/json -> text; table -> a rich Table."""
    if fmt == "json":
        return json.dumps(to_json_doc(name, params, result))
    if fmt == "csv":
        return to_csv(result)
    from rich.table import Table

    title = f"{name} · {params.since:%Y-%m-%d %H:%M} → {params.until:%Y-%m-%d %H:%M} UTC"
    if "gpu_idle" in result.meta:
        title += f" · idle GPU time: {result.meta['gpu_idle']}"
    table = Table(title=title, header_style="bold")
    compact = TABLE_COLUMNS.get(name)
    shown = [i for i, col in enumerate(result.columns)
             if i == 0 or (not _all_zero(result, i) and (compact is None or col in compact))]
    cells = [[display(row[i], result.columns[i]) for i in shown] for row in result.rows]
    for k, i in enumerate(shown):
        numeric = bool(result.rows) and isinstance(result.rows[0][i], (int, Decimal, float))
        widest = max((len(c[k]) for c in cells), default=0)
        # numbers never fold; names keep at least 12 characters, longer ones fold
        table.add_column(_header(result.columns[i]), justify="right" if numeric else "left", overflow="fold",
                         min_width=widest if numeric else min(12, widest))
    from rich.text import Text

    for row in cells:
        table.add_row(*(Text(c) for c in row))  # user text (tenant names): shown, never read as markup
    totals = _totals_row(result)
    if totals:
        table.add_section()
        table.add_row(*(totals[i] for i in shown), style="bold")
    return table


# People get the columns that matter on an 80-column terminal; json/csv carry every column.
TABLE_COLUMNS = {
    "chargeback": ("events", "input_tokens", "output_tokens", "usage_cost_usd", "gpu_cost_usd", "gpu_idle_cost_usd",
                   "cpu_cost_usd", "memory_cost_usd", "total_cost_usd"),
    "top-sessions": ("tenant_id", "agent_id", "session_id", "events", "total_cost_usd"),
    "cost-per-action": ("tenant_id", "agent_id", "actions", "successful_actions", "total_cost_usd", "cost_per_success_usd"),
    "gpu": ("node", "gpu_name", "gpu_hours", "cost_usd", "avg_utilization_pct", "unused_cost_usd", "unused_charged_to"),
    "burn-down": ("scope_id", "amount", "spent", "used_pct", "elapsed_pct", "burn", "forecast_spend", "forecast_lo80",
                  "forecast_hi80"),
    "slo": ("scope_id", "calls", "success_pct", "slo_success_pct", "success_met", "p95_latency_ms", "slo_p95_latency_ms",
            "latency_met", "cost_per_success_usd", "slo_cost_per_success_usd", "cost_met", "downgraded_calls", "saved_usd"),
    "forecast": ("spent_usd", "forecast_usd", "lo80_usd", "hi80_usd", "lo95_usd", "hi95_usd", "method"),
}


def _header(column: str) -> str:
    """Short headers for narrow terminals (json/csv keep the real column names)."""
    return (column.replace("memory_", "mem_").replace("_cost_usd", " $").replace("_usd", " $").replace("_tokens", " tok")
            .replace("cache_read", "cache rd").replace("cache_write", "cache wr").replace("_", " "))


def _all_zero(result: Result, i: int) -> bool:
    """Columns with nothing in them (no GPU, no cache writes…) are left out of the table view."""
    return bool(result.rows) and all(r[i] in (0, None, "") for r in result.rows)


def _totals_row(result: Result) -> list[str] | None:
    money = [i for i, c in enumerate(result.columns) if c.endswith("cost_usd")]
    if not result.rows or not money:
        return None
    out = ["" for _ in result.columns]
    out[0] = "TOTAL"
    for i in money:
        out[i] = display(sum((r[i] or Decimal(0) for r in result.rows), Decimal(0)), result.columns[i])
    return out
