"""Spend forecasts with prediction intervals, from the ledger's hourly rollups (issue 15 item 1).

Method (`ets`): per key, the hourly spend of the last 28 days (`usage_hourly` + process-level `gpu_hourly`,
leading empty hours dropped) is fitted with statsmodels' ETS model (`ETSModel`: additive error, additive
damped trend, additive seasonality). The seasonal period is the week (168 hours: it holds the daily cycle
and the weekday/weekend difference) once two weeks of history exist, the day (24) from two days on, none
below that; under 10 hours of history the seasonal naive baseline is used. The period's remaining hours are
simulated from the fitted state (2,000 sample paths, Gaussian errors with the fitted variance, a fixed seed
so a report is reproducible), each hour clipped at 0 (spend never goes negative), and summed; the period-end
forecast is spent-so-far plus the mean of those sums, the 80 % and 95 % intervals are their 10/90 and
2.5/97.5 % quantiles. Why ETS and not a home-made profile: `meterline forecast backtest` measures it
against a seasonal naive baseline in the same run (BENCHMARKS.md) — lower MAPE, and interval coverage
near nominal, where the baseline's intervals are too wide or too narrow.

Baseline (`seasonal-naive`): each future hour repeats the same hour one season earlier; its intervals
assume independent errors with the variance of the seasonal differences, growing by one per season ahead.

Money: the ledger's Decimal values are converted to float for the model only; forecasts are statistical
estimates, returned as Decimal quantised to 1e-6 USD, and never written to the ledger. Spent-so-far stays
the ledger's exact sum. Keys are forecast independently (the keys' forecasts need not add up to a
tenant's). Periods are UTC calendar periods (the rollups' hours are UTC hours); GPU time no process used
(app/gpu_idle.py) is not in the rollups and not in the forecast.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

HISTORY_HOURS = 28 * 24
WEEK, DAY = 168, 24
SIMULATIONS = 2000
SEED = 20250601
MICRO = Decimal("0.000001")
METHODS = ("ets", "seasonal-naive")
Z80, Z95 = 1.2815515655446004, 1.959963984540054


@dataclass(frozen=True)
class Band:
    """A forecast of future spend (a sum over future hours): mean and interval bounds, floats."""

    mean: float
    lo80: float
    hi80: float
    lo95: float
    hi95: float
    method: str


def season_of(hours: int) -> int | None:
    """The seasonal period a history of this many hours supports: two full cycles are needed."""
    return WEEK if hours >= 2 * WEEK else DAY if hours >= 2 * DAY else None


def forecast_band(history: Sequence[float], weights: Sequence[float], method: str = "ets",
                  seasonal: bool = True) -> Band:
    """Future spend sum(weights[h] * y[T + h]) after `history` (hourly values y[0..T-1], oldest first).

    weights[h] is the share of future hour h inside the period (1, or less for a partial first or last
    hour). `seasonal=False` is a non-seasonal ETS: the tests show what seasonality is worth."""
    y = np.asarray(history, dtype=float)
    w = np.asarray(weights, dtype=float)
    if not len(w) or not w.any():
        return Band(0.0, 0.0, 0.0, 0.0, 0.0, method)
    if not len(y) or not y.any():
        return Band(0.0, 0.0, 0.0, 0.0, 0.0, method)
    if method == "seasonal-naive":
        return naive_band(y, w)
    if method != "ets":
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if len(y) < 10 or np.ptp(y) == 0:
        return naive_band(y, w)
    try:
        return _ets_band(y, w, season_of(len(y)) if seasonal else None)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError):  # a degenerate series: the baseline
        return naive_band(y, w)


def _ets_band(y: np.ndarray, w: np.ndarray, period: int | None) -> Band:
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on short or flat series
        model = ETSModel(y, error="add", trend="add", damped_trend=True, seasonal="add" if period else None,
                         seasonal_periods=period, initialization_method="heuristic")
        fit = model.fit(disp=False, maxiter=200)
        paths = np.asarray(fit.simulate(len(w), anchor="end", repetitions=SIMULATIONS,
                                        rng=np.random.default_rng(SEED))).reshape(len(w), -1)
    if not np.isfinite(paths).all():
        raise ValueError("the fitted model diverges")
    sums = (np.clip(paths, 0, None) * w[:, None]).sum(axis=0)
    lo80, hi80, lo95, hi95 = np.quantile(sums, [0.10, 0.90, 0.025, 0.975])
    return Band(float(sums.mean()), float(lo80), float(hi80), float(lo95), float(hi95), "ets")


def naive_band(y: np.ndarray, w: np.ndarray) -> Band:
    """Seasonal naive: hour T+h repeats hour T+h-P of the last season (the mean hour without a season)."""
    period = season_of(len(y))
    h = np.arange(len(w))
    if period is None:
        point = np.full(len(w), y.mean())
        sigma = float(y.std()) if len(y) > 1 else float(y.mean())
        seasons = np.ones(len(w))
    else:
        point = y[len(y) - period + (h % period)]
        diffs = y[period:] - y[:-period]
        sigma = float(diffs.std()) if len(diffs) > 1 else float(y.std())
        seasons = h // period + 1  # a seasonal random walk: the k-th season ahead carries k errors
    mean = float((w * point).sum())
    sd = sigma * math.sqrt(float((w * w * seasons).sum()))
    return Band(mean, max(0.0, mean - Z80 * sd), mean + Z80 * sd, max(0.0, mean - Z95 * sd), mean + Z95 * sd,
                "seasonal-naive")


# ---- from the ledger's hours to a period-end forecast ----------------------------------------


def hour_of(t: datetime) -> datetime:
    return t.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def history_series(hourly: Mapping[datetime, Any], now: datetime, hours: int = HISTORY_HOURS) -> np.ndarray:
    """Complete hours before now's hour, oldest first, missing hours 0, leading empty hours dropped."""
    current = hour_of(now)
    y = np.zeros(hours)
    for hour, value in hourly.items():
        k = int((current - hour_of(hour)).total_seconds() // 3600)
        if 1 <= k <= hours:
            y[hours - k] += float(value)
    nonzero = np.flatnonzero(y)
    return y[nonzero[0]:] if len(nonzero) else y[:0]


def horizon_weights(now: datetime, end: datetime) -> np.ndarray:
    """Per hour from now's hour to the period's end: the share of that hour still ahead and inside."""
    if now >= end:
        return np.zeros(0)
    first = hour_of(now)
    n = math.ceil((end - first).total_seconds() / 3600)
    out = np.empty(n)
    for k in range(n):
        lo, hi = max(now, first + timedelta(hours=k)), min(end, first + timedelta(hours=k + 1))
        out[k] = max(0.0, (hi - lo).total_seconds() / 3600)
    return out


def to_money(value: float | Decimal) -> Decimal:
    return Decimal(repr(float(value)) if not isinstance(value, Decimal) else value).quantize(MICRO, ROUND_HALF_EVEN)


def period_end_forecast(hourly: Mapping[datetime, Any], spent: Decimal, now: datetime, end: datetime,
               method: str = "ets") -> tuple[dict[str, Decimal], str, int]:
    """Period-end spend: spent (exact) plus the forecast of the rest, as Decimals quantised to 1e-6."""
    y = history_series(hourly, now)
    band = forecast_band(y, horizon_weights(now, end), method)
    values = {name: to_money(spent + to_money(getattr(band, name)))
              for name in ("mean", "lo80", "hi80", "lo95", "hi95")}
    return values, band.method, len(y)


# ---- `meterline forecast` --------------------------------------------------------------------

FORECAST_COLUMNS = ["spent_usd", "forecast_usd", "lo80_usd", "hi80_usd", "lo95_usd", "hi95_usd", "method",
                    "history_hours"]
FORECAST_TYPES = ["Decimal(38, 18)"] + ["Decimal(38, 6)"] * 5 + ["String", "UInt32"]
BY = {"tenant": 1, "team": 2, "project": 3, "agent": 4, "model": 0}
PERIODS = ("month", "week", "day")


def forecast_report(ledger: Any, by: str = "tenant", period: str = "month", tenant: str = "",
                    now: datetime | None = None, method: str = "ets"):
    """Per key: spent this period, forecast period-end spend, 80 % and 95 % intervals (a Result)."""
    from .report import UNATTRIBUTED, load_query, period_bounds
    from .store import Result

    if by not in BY:
        raise ValueError(f"--by must be one of {', '.join(BY)}, not {by!r}")
    if period not in PERIODS:
        raise ValueError(f"--period must be one of {', '.join(PERIODS)}, not {period!r}")
    now = now or datetime.now(timezone.utc)
    start, end = period_bounds(period, "UTC", now)
    since = min(start, hour_of(now) - timedelta(hours=HISTORY_HOURS))
    rows = ledger.query(load_query("forecast_hourly"), {
        "by": by, "depth": BY[by], "tenant": tenant, "since": since, "until": now + timedelta(seconds=1),
        "unattributed": UNATTRIBUTED}).rows
    per_key: dict[str, dict[datetime, Decimal]] = {}
    for key, hour, cost in rows:
        per_key.setdefault(key, {})[hour] = Decimal(cost)
    out = []
    for key, hourly in per_key.items():
        spent = sum((c for h, c in hourly.items() if h >= start), Decimal(0))
        values, used, n = period_end_forecast(hourly, spent, now, end, method)
        out.append((key, spent, values["mean"], values["lo80"], values["hi80"], values["lo95"], values["hi95"], used, n))
    out.sort(key=lambda r: (-r[2], r[0]))
    return Result([by, *FORECAST_COLUMNS], ["String", *FORECAST_TYPES], out,
                  {"period": period, "period_start": start.isoformat(), "period_end": end.isoformat(),
                   "now": now.isoformat(), "note": "forecasts are statistical estimates (float model), quantised to 1e-6 USD"})


# ---- backtest: rolling origins ---------------------------------------------------------------


def backtest(series: Mapping[str, Sequence[float]] | Sequence[float], horizon: int = 24, origins: int = 30,
             step: int = 7, methods: Iterable[str] = METHODS, seasonal: bool = True) -> list[dict[str, Any]]:
    """For each method: MAPE of the horizon's total and coverage of its 80 % / 95 % intervals, over
    `origins` rolling origins per series (the last one `horizon` hours before the end, each earlier one
    `step` hours before the next; a step that is not a multiple of 24 puts origins at every time of day).
    Each origin sees only the 28 days before it. The first method is scored against the last (the baseline)."""
    all_series = series if isinstance(series, Mapping) else {"series": series}
    weights = np.ones(horizon)
    out = []
    for method in methods:
        errors, in80, in95, width, cases, began = [], 0, 0, [], 0, time.perf_counter()
        for values in all_series.values():
            y = np.asarray(values, dtype=float)
            for i in range(origins):
                origin = len(y) - horizon - i * step
                if origin < 2 * DAY:
                    break
                history = y[max(0, origin - HISTORY_HOURS):origin]
                nonzero = np.flatnonzero(history)
                history = history[nonzero[0]:] if len(nonzero) else history[:0]
                truth = float(y[origin:origin + horizon].sum())
                band = forecast_band(history, weights, method, seasonal)
                cases += 1
                in80 += band.lo80 <= truth <= band.hi80
                in95 += band.lo95 <= truth <= band.hi95
                if truth > 0:
                    errors.append(abs(band.mean - truth) / truth)
                    width.append((band.hi80 - band.lo80) / truth)
        seconds = time.perf_counter() - began
        out.append({"method": method if seasonal else f"{method} (no season)", "origins": cases, "horizon_hours": horizon,
                    "mape_pct": 100 * float(np.mean(errors)) if errors else None,
                    "coverage80_pct": 100 * in80 / cases if cases else None,
                    "coverage95_pct": 100 * in95 / cases if cases else None,
                    "width80_pct": 100 * float(np.mean(width)) if width else None, "seconds": seconds})
    base = out[-1]
    for row in out:
        row["mape_ratio"] = row["mape_pct"] / base["mape_pct"] if row["mape_pct"] is not None and base["mape_pct"] else None
    return out


def synthetic_trace(hours: int = 8 * WEEK, seed: int = 1, base: float = 10.0, weekly_growth: float = 0.03,
                    noise: float = 0.15, shift_at: int | None = None, shift: float = 1.0) -> np.ndarray:
    """Hourly spend (USD) with a daily cycle (afternoon peak, night trough), quieter weekends (half),
    a trend (+3 % a week), multiplicative Gaussian noise, and optionally a level shift (x`shift` from hour
    `shift_at` on). Hour 0 is a Monday 00:00 UTC."""
    rng = np.random.default_rng(seed)
    t = np.arange(hours)
    daily = 1 + 0.6 * np.sin(2 * np.pi * ((t % DAY) - 8) / DAY)
    weekly = np.where((t // DAY) % 7 >= 5, 0.5, 1.0)
    level = base * (1 + weekly_growth * t / WEEK)
    if shift_at is not None:
        level = np.where(t >= shift_at, level * shift, level)
    mean = level * daily * weekly
    return np.clip(mean * (1 + noise * rng.standard_normal(hours)), 0, None)


def ledger_series(ledger: Any, by: str, tenant: str, now: datetime, hours: int) -> dict[str, np.ndarray]:
    """Each key's hourly spend over the `hours` complete hours before now's hour (for the backtest)."""
    from .report import UNATTRIBUTED, load_query

    if by not in BY:
        raise ValueError(f"--by must be one of {', '.join(BY)}, not {by!r}")
    current = hour_of(now)
    rows = ledger.query(load_query("forecast_hourly"), {
        "by": by, "depth": BY[by], "tenant": tenant, "since": current - timedelta(hours=hours), "until": current,
        "unattributed": UNATTRIBUTED}).rows
    out: dict[str, np.ndarray] = {}
    for key, hour, cost in rows:
        y = out.setdefault(key, np.zeros(hours))
        y[hours - int((current - hour_of(hour)).total_seconds() // 3600)] += float(cost)
    return out


# ---- pacing: the shape of a period's expected spend ----------------------------------------


def pacing_curve(history: Iterable[tuple[datetime, Any]], period_start: datetime,
                 period_end: datetime) -> list[tuple[datetime, float]]:
    """The cumulative fraction of the period's spend expected by the end of each of its hours.

    `history` is (hour start, spend) pairs; hours between the first and the last one that are absent
    spent nothing. The expected spend of an hour is the mean of the history's same hour of the week
    (two full weeks or more of history) or of the day (two days or more); with less history, or none
    spent, the curve is the straight line (spend spread evenly: today's pacing). Partial first or last
    hours count by their share. Pure: the allocator's pacing can use it instead of a straight line.
    Returns [(hour start, fraction by that hour's end)], the last fraction 1.0.
    """
    points = sorted((hour_of(h), float(v)) for h, v in history)
    profile: np.ndarray | None = None
    if points:
        first, last = points[0][0], points[-1][0]
        span = int((last - first).total_seconds() // 3600) + 1
        period = season_of(span)
        if period:
            slot = (lambda h: h.weekday() * DAY + h.hour) if period == WEEK else (lambda h: h.hour)
            total, count = np.zeros(period), np.zeros(period)
            for k in range(span):
                count[slot(first + timedelta(hours=k))] += 1
            for h, v in points:
                total[slot(h)] += v
            profile = total / np.maximum(count, 1)
            expected = lambda h: profile[slot(h)]  # noqa: E731
    hours, t = [], hour_of(period_start)
    while t < period_end:
        share = (min(period_end, t + timedelta(hours=1)) - max(period_start, t)).total_seconds() / 3600
        hours.append((t, share))
        t += timedelta(hours=1)
    weights = np.array([share * (expected(h) if profile is not None else 1.0) for h, share in hours])
    if not weights.sum():
        weights = np.array([share for _, share in hours])
    cumulative = np.cumsum(weights) / weights.sum() if weights.sum() else np.ones(len(hours))
    return [(h, float(c)) for (h, _), c in zip(hours, cumulative)]
