"""SLO-aware downgrade and forecast-shaped pacing: the pure rules and the ledger feeds behind them (issue 15).

The engine (engine.py) stays pure and fast: it never queries in its decision loop. The service
(service.py) refreshes two tables from the ledger every `refresh_every` seconds and hands them over:

  model stats   per (budget scope id, model): the scope's LLM calls over the last `window` (7 days),
                how many were `ok`, the nearest-rank p95 of their reported latency (latency_ms > 0),
                and what they cost (sql/queries/slo_model_stats.sql). Only scopes whose budget has an SLO.
  pacing curve  per USD budget: the cumulative share of the period's budget expected by the end of each
                hour, from the scope's hourly rollups (app/forecast.py `pacing_curve`), when two days or
                more of history exist; else none, and the engine keeps its straight line.

Downgrade rule (`pick_downgrade`): among the cheaper models of the tier (the catalog's `downgrade_for`,
followed down to the cheapest), those the scope has called at least `slo.min_calls` times whose measured
success rate and p95 latency meet the SLO; of those, the one with the lowest measured cost per successful
call (ties: the more capable), and only if that is below the current model's (when measured): a cheaper
price list is no saving when the calls fail. None qualifies -> the engine throttles instead. The SLO's
cost-per-success target is what `meterline report slo` measures against; it does not pick models.
"""
from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from typing import Any

from meterline.schemas.events import BudgetPolicy, Slo

log = logging.getLogger("meterline.allocator")
ZERO = Decimal(0)
MAX_TIER = 32   # a catalog tier longer than this (or a cycle) is cut here


@dataclass(frozen=True)
class ModelStats:
    """One scope's measured calls of one model."""

    calls: int
    ok: int
    latency_calls: int                # calls that reported a latency
    p95_latency_ms: int | None        # nearest-rank p95 of those
    cost_usd: Decimal

    @property
    def success_pct(self) -> Decimal:
        return Decimal(self.ok) * 100 / self.calls if self.calls else ZERO

    @property
    def cost_per_success(self) -> Decimal | None:
        return self.cost_usd / self.ok if self.ok else None


StatsTable = Mapping[tuple[str, str], ModelStats]      # (policy scope_id, model) -> stats
Curve = tuple[datetime, datetime, tuple[tuple[datetime, Decimal], ...]]   # period start, end, (hour, share by its end)


def tier_below(model: str, downgrade_for: Callable[[str], str | None]) -> list[str]:
    """Every cheaper model of `model`'s tier, most capable first."""
    out: list[str] = []
    current = model
    while len(out) < MAX_TIER and (nxt := downgrade_for(current)) and nxt not in out and nxt != model:
        out.append(nxt)
        current = nxt
    return out


def shortfall(slo: Slo, stats: ModelStats | None) -> str | None:
    """Why these measurements do not meet the SLO, or None when they do."""
    if stats is None or stats.calls < slo.min_calls:
        return f"{stats.calls if stats else 0} calls measured, {slo.min_calls} needed"
    if slo.success_rate_pct is not None and stats.success_pct < slo.success_rate_pct:
        return f"success {stats.success_pct:.2f}% < {slo.success_rate_pct}%"
    if slo.p95_latency_ms is not None:
        if stats.latency_calls < slo.min_calls or stats.p95_latency_ms is None:
            return f"{stats.latency_calls} latencies measured, {slo.min_calls} needed"
        if stats.p95_latency_ms > slo.p95_latency_ms:
            return f"p95 {stats.p95_latency_ms} ms > {slo.p95_latency_ms} ms"
    return None


def pick_downgrade(slo: Slo, model: str, cheaper: Iterable[str],
                   stats: Callable[[str], ModelStats | None]) -> tuple[str | None, str]:
    """(the model to step down to or None, why) for a scope now on `model` (see the module doc)."""
    current = stats(model)
    ceiling = current.cost_per_success if current else None
    best: tuple[Decimal, int, str] | None = None
    misses = []
    for rank, candidate in enumerate(cheaper):
        measured = stats(candidate)
        why = shortfall(slo, measured)
        if why is None and ceiling is not None and measured.cost_per_success is not None and measured.cost_per_success >= ceiling:
            why = f"${measured.cost_per_success:.6f} per success, not below {model}'s ${ceiling:.6f}"
        if why is not None:
            misses.append(f"{candidate}: {why}")
            continue
        key = (measured.cost_per_success if measured.cost_per_success is not None else Decimal("Infinity"), rank, candidate)
        best = key if best is None or key < best else best
    if best is None:
        return None, f"no cheaper model of {model}'s tier meets the SLO (" + ("; ".join(misses) or "none in the tier") + ")"
    chosen = stats(best[2])
    return best[2], (f"{best[2]} meets the SLO for this scope: {chosen.success_pct:.2f}% ok, p95 "
                     f"{chosen.p95_latency_ms if chosen.p95_latency_ms is not None else '?'} ms over {chosen.calls} calls"
                     + (f" (not {'; '.join(misses)})" if misses else ""))


def plan_share(curve: Curve | None, start: datetime, end: datetime, t: datetime) -> Decimal | None:
    """The share of the period's budget planned to be spent by `t` along the curve (linear within an hour),
    or None when no curve fits this period (the caller keeps its straight line)."""
    if curve is None or curve[0] != start or curve[1] != end:
        return None
    if t <= start:
        return ZERO
    if t >= end:
        return Decimal(1)
    points = curve[2]
    i = bisect_right(points, t, key=lambda point: point[0]) - 1   # the hour holding t (O(log n): a month is 744)
    if i < 0:
        return ZERO
    hour, share = points[i]
    before = points[i - 1][1] if i else ZERO
    lo, hour_end = max(start, hour), min(end, hour + timedelta(hours=1))
    if t >= hour_end:   # past the curve's last hour
        return share
    return before + (share - before) * Decimal((t - lo).total_seconds()) / Decimal((hour_end - lo).total_seconds())


# ---- the ledger feeds (service.py calls these on its own thread) ----------------------------------


def _query(name: str) -> str:
    return resources.files("meterline.sql").joinpath(f"queries/{name}.sql").read_text()


def ledger_feeds(settings, connect: Callable[[], Any] | None = None, window: timedelta = timedelta(days=7)):
    """(model_stats(policies) -> StatsTable, pacing(policy, start, end) -> Curve | None) over the ledger.

    `connect` gives the client to query with (default: one `sql.ledger.connect(settings)`, made on first use)."""
    from meterline.sql.ledger import connect as ledger_connect, render_reads

    from .ledger import scope_params

    cluster = settings.clickhouse_cluster
    stats_sql, hourly_sql = render_reads(_query("slo_model_stats"), cluster), render_reads(_query("scope_hourly"), cluster)
    holder: dict[str, Any] = {}

    def client():
        if connect is not None:
            return connect()
        holder.setdefault("client", ledger_connect(settings))
        return holder["client"]

    def model_stats(policies: Iterable[BudgetPolicy]) -> dict[tuple[str, str], ModelStats]:
        now = datetime.now(timezone.utc)
        table = {}
        for p in policies:
            rows = client().query(stats_sql, parameters={**scope_params(p.scope, p.scope_id), "since": now - window,
                                                         "until": now}).result_rows
            for model, calls, ok, latency_calls, p95, cost in rows:
                if not model:  # the scope's total (ROLLUP row): not a model to downgrade to
                    continue
                table[(p.scope_id, model)] = ModelStats(int(calls), int(ok), int(latency_calls),
                                                        int(p95) if latency_calls else None, Decimal(str(cost)))
        return table

    def pacing(policy: BudgetPolicy, start: datetime, end: datetime) -> Curve | None:
        from meterline.app.forecast import HISTORY_HOURS, hour_of, pacing_curve, season_of

        if policy.unit != "usd" or policy.scope == "session":   # the rollups have no session
            return None
        params = {k: v for k, v in scope_params(policy.scope, policy.scope_id).items() if k != "session"}
        since = hour_of(start) - timedelta(hours=HISTORY_HOURS)
        rows = client().query(hourly_sql, parameters={**params, "since": since, "until": start}).result_rows
        history = [(r[0] if r[0].tzinfo else r[0].replace(tzinfo=timezone.utc), r[1]) for r in rows if r[1]]
        if not history or season_of(int((history[-1][0] - history[0][0]).total_seconds() // 3600) + 1) is None:
            return None   # under two days of history: the straight line
        points = pacing_curve(history, start, end)
        # a share of the budget, not money: the float profile becomes a Decimal of 9 places
        return start, end, tuple((h, Decimal(f"{share:.9f}")) for h, share in points)

    return model_stats, pacing


def ledger_feeds_or_none(settings, **kwargs):
    """ledger_feeds, or (None, None) when the ledger cannot be used (no SLO downgrades, straight pacing)."""
    try:
        return ledger_feeds(settings, **kwargs)
    except Exception as err:  # noqa: BLE001
        log.warning("SLO stats and pacing curves off: %s", err)
        return None, None
