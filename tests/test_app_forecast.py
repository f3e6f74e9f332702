"""`meterline forecast` (app/forecast.py): intervals that cover, a level shift followed, a pacing shape,
and the commands against a real migrated chDB ledger filled in-process from a known hourly pattern."""
from __future__ import annotations

import csv
import gc
import io
import json
import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import numpy as np
import pytest
from typer.testing import CliRunner

from meterline.app.forecast import (DAY, WEEK, backtest, forecast_band, horizon_weights, hour_of, period_end_forecast,
                                    pacing_curve, synthetic_trace)
from meterline.app.report import period_bounds
from meterline.cli import app
from meterline.console import console
from meterline.schemas.events import BudgetPolicy, GpuSample, PricedEvent, new_id
from meterline.settings import Settings, get_settings
from meterline.sql import ledger
from meterline.sql.rows import budget_policy_row, gpu_sample_row, insert_rows, priced_event_row, with_offsets

NOW = datetime.now(timezone.utc).replace(microsecond=0)
MICRO = Decimal("0.000001")


# ---- the method, on synthetic series ---------------------------------------------------------


def test_the_80_percent_interval_covers_a_seasonal_series_and_a_non_seasonal_model_does_not():
    """Daily cycle, quieter weekends, a trend: 24 rolling origins at every time of day (11 h apart)."""
    y = synthetic_trace(seed=3)
    ets, naive = backtest(y, horizon=24, origins=24, step=11)
    assert ets["origins"] == naive["origins"] == 24
    assert 70 <= ets["coverage80_pct"] <= 90, ets
    assert ets["coverage95_pct"] >= 85, ets
    assert ets["mape_pct"] < 5 and ets["mape_ratio"] < 1, (ets, naive)  # better than the seasonal naive baseline
    (flat,) = backtest(y, horizon=24, origins=24, step=11, methods=("ets",), seasonal=False)
    # without the seasonal component the same model misses: far worse point forecasts, uselessly wide bands
    assert not 70 <= flat["coverage80_pct"] <= 90 and flat["mape_pct"] > 5 * ets["mape_pct"], flat


def test_a_level_shift_is_followed_within_days():
    """Spend doubles three days before the origin: the forecast follows, the week-ago baseline does not."""
    n = 6 * WEEK
    y = synthetic_trace(hours=n, seed=4, shift_at=n - 72, shift=2.0)
    history, truth = y[: n - DAY], float(y[n - DAY:].sum())
    band = forecast_band(history, np.ones(DAY))
    assert band.method == "ets"
    assert band.lo80 <= truth <= band.hi80, (band, truth)
    assert abs(band.mean - truth) / truth < 0.15
    naive = forecast_band(history, np.ones(DAY), "seasonal-naive")
    assert naive.hi95 < truth  # last week's level: the shift is missed, and so is the interval


def test_short_empty_and_flat_histories_fall_back_without_failing():
    w = np.ones(10)
    assert forecast_band([], w) == forecast_band([0.0] * 50, w)
    assert forecast_band([], w).mean == 0
    flat = forecast_band([2.0] * 100, w)  # no variance: the baseline, exact
    assert flat.method == "seasonal-naive" and flat.mean == pytest.approx(20.0) and flat.lo95 == flat.hi95
    short = forecast_band([1.0, 3.0, 2.0], w)
    assert short.method == "seasonal-naive" and short.mean == pytest.approx(20.0) and short.lo80 < 20 < short.hi80
    assert forecast_band(synthetic_trace(hours=30), w).method == "ets"  # non-seasonal ETS from 10 hours on


def test_period_end_forecast_is_decimal_at_micro_dollars_and_never_below_spent():
    now = datetime(2025, 6, 11, 15, 20, tzinfo=timezone.utc)
    start, end = period_bounds("month", "UTC", now)
    trace = synthetic_trace(hours=3 * WEEK, seed=5)
    hourly = {hour_of(now) - timedelta(hours=len(trace) - k): Decimal(repr(float(v))).quantize(Decimal("1e-12"))
              for k, v in enumerate(trace)}
    spent = Decimal("1234.567890123456789")
    values, method, n = period_end_forecast(hourly, spent, now, end)
    assert method == "ets" and n == 3 * WEEK
    assert all(isinstance(v, Decimal) and v.as_tuple().exponent == -6 for v in values.values())
    assert spent <= values["lo95"] <= values["lo80"] <= values["mean"] <= values["hi80"] <= values["hi95"]
    remaining = float(values["mean"] - spent)
    assert 0.6 * 10 * (end - now).total_seconds() / 3600 < remaining < 1.6 * 10 * (end - now).total_seconds() / 3600
    done, _, _ = period_end_forecast(hourly, spent, end, end)  # the period is over: what was spent
    assert set(done.values()) == {spent.quantize(MICRO)}


def test_horizon_weights_count_the_rest_of_the_current_hour():
    now = datetime(2025, 6, 1, 10, 45, tzinfo=timezone.utc)
    w = horizon_weights(now, datetime(2025, 6, 1, 13, 30, tzinfo=timezone.utc))
    assert list(w) == [0.25, 1.0, 1.0, 0.5]


def test_pacing_curve_follows_the_weekly_shape():
    monday = datetime(2025, 5, 5, tzinfo=timezone.utc)
    history = [(monday + timedelta(hours=k), 2.0 if (k // DAY) % 7 < 5 else 0.5) for k in range(3 * WEEK)]
    start = datetime(2025, 6, 2, tzinfo=timezone.utc)  # a Monday
    curve = pacing_curve(history, start, start + timedelta(days=7))
    assert len(curve) == WEEK and curve[0][0] == start and curve[-1][1] == pytest.approx(1.0)
    fractions = [f for _, f in curve]
    assert all(a <= b for a, b in zip(fractions, fractions[1:]))
    by_friday = fractions[5 * DAY - 1]
    assert by_friday == pytest.approx(10 / 11) and by_friday > 5 / 7  # weekdays carry 10 of 11 units
    # no history, or too little: the straight line (today's pacing)
    for few in ([], history[:30]):
        line = pacing_curve(few, start, start + timedelta(days=1))
        assert [f for _, f in line] == pytest.approx([(k + 1) / 24 for k in range(24)])


def test_pacing_curve_follows_the_daily_shape_and_partial_hours():
    day0 = datetime(2025, 6, 1, tzinfo=timezone.utc)
    history = [(day0 + timedelta(hours=k), 3.0 if 9 <= k % DAY < 17 else 0.0) for k in range(3 * DAY)]
    start = datetime(2025, 6, 5, 8, 30, tzinfo=timezone.utc)
    curve = pacing_curve(history, start, start + timedelta(hours=3))
    assert [h.hour for h, _ in curve] == [8, 9, 10, 11]
    assert [f for _, f in curve] == pytest.approx([0.0, 1 / 2.5, 2 / 2.5, 1.0])  # 8:30-9 spends nothing, 11:00-11:30 half


# ---- the commands, against a real ledger -------------------------------------------------------

KEYS = (("acme", "research", "gpt-4o", 1.0), ("acme", "support", "claude-sonnet-4", 0.25), ("globex", "ops", "gpt-4o", 0.5))
HISTORY_HOURS = 3 * WEEK


def cost_at(hour: datetime, scale: float) -> Decimal:
    """A known pattern: a daily cycle and quieter weekends, as exact 12-place decimals."""
    daily = 1 + 0.6 * math.sin(2 * math.pi * (hour.hour - 8) / DAY)
    weekly = 0.5 if hour.weekday() >= 5 else 1.0
    return Decimal(repr(round(scale * daily * weekly * 0.01, 12))) + Decimal("0.000000000001")


pytestmark = pytest.mark.xdist_group("app_forecast")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    path = tmp_path_factory.mktemp("forecast")
    settings = Settings(data_dir=path / "data", clickhouse_dsn=f"chdb://{path / 'ch'}")
    gc.collect()
    client = ledger.connect(settings)
    ledger.migrate(client)
    events = []
    for k in range(HISTORY_HOURS, -1, -1):  # one call per key and hour, the last in the current hour
        hour = hour_of(NOW) - timedelta(hours=k)
        ts = min(hour + timedelta(minutes=1), NOW)
        for tenant, team, model, scale in KEYS:
            cost = cost_at(hour, scale)
            events.append(PricedEvent(event_id=new_id(), ts=ts, tenant_id=tenant, team=team, project="p", agent_id=f"{team}-bot",
                                      session_id="s", kind="llm_call", provider="openai", model=model, input_tokens=10,
                                      output_tokens=1, cost_usd=cost, list_cost_usd=cost, cost_source="catalog",
                                      catalog_version="t", priced_at=ts))
    insert_rows(client, "priced_events", [with_offsets(priced_event_row(e), "priced", 0, i) for i, e in enumerate(events)])
    gpu = GpuSample(sample_id=new_id(), ts=NOW - timedelta(hours=2), node="n", level="process", gpu_index=0, gpu_uuid="GPU-1",
                    gpu_name="H100", interval_ms=10_000, pid=1, attributed=True, tenant_id="acme", team="research",
                    project="p", agent_id="research-bot")
    insert_rows(client, "gpu_samples", [with_offsets(gpu_sample_row(gpu, Decimal(10), Decimal("0.004"), "t"), "gpu", 0, 0)])
    policy = BudgetPolicy(policy_id="acme-week", tenant_id="acme", scope="tenant", scope_id="acme", amount=Decimal("50"),
                          period="week")
    insert_rows(client, "budget_policies", [with_offsets(budget_policy_row(policy), "budgets", 0, 0)])
    client.close()
    yield {"events": events, "gpu": gpu, "settings": settings}
    gc.collect()


@pytest.fixture
def cli(filled, monkeypatch):
    s = filled["settings"]
    monkeypatch.setenv("METERLINE_CLICKHOUSE_DSN", s.dsn)
    monkeypatch.setenv("METERLINE_DATA_DIR", str(s.data_dir))
    monkeypatch.setattr(console, "width", 250)
    get_settings.cache_clear()
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.stdout if code == 0 else result.output

    yield invoke
    get_settings.cache_clear()


def spent_by(filled, key, since: datetime) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for e in filled["events"]:
        if e.ts >= since:
            out[key(e)] = out.get(key(e), Decimal(0)) + e.cost_usd
    return out


def test_forecast_per_team_spends_exactly_and_bands_the_rest(cli, filled):
    doc = json.loads(cli("forecast", "--by", "team", "--period", "week", "-f", "json"))
    start, end = period_bounds("week", "UTC", NOW)
    assert doc["report"] == "forecast" and doc["period"] == "week" and doc["since"] == start.isoformat()
    rows = {r["team"]: r for r in doc["rows"]}
    want = spent_by(filled, lambda e: f"{e.tenant_id}/{e.team}", start)
    want["acme/research"] += Decimal("0.004")  # the GPU sample
    assert set(rows) == set(want)  # scope ids: tenant/team
    hours_left = (end - NOW).total_seconds() / 3600
    for key, row in rows.items():
        assert Decimal(row["spent_usd"]) == want[key]  # exact, from the rollups
        lo95, lo80, mean, hi80, hi95 = (Decimal(row[c]) for c in ("lo95_usd", "lo80_usd", "forecast_usd", "hi80_usd", "hi95_usd"))
        assert want[key] <= lo95 <= lo80 <= mean <= hi80 <= hi95
        assert all(-Decimal(row[c]).as_tuple().exponent <= 6 for c in ("forecast_usd", "hi95_usd"))
        crossed = (hour_of(datetime.now(timezone.utc)) - hour_of(NOW)) // timedelta(hours=1)  # the CLI's now is later
        assert row["method"] == "ets" and row["history_hours"] == HISTORY_HOURS + crossed
        scale = next(s for t, team, _, s in KEYS if f"{t}/{team}" == key)
        truth = sum(float(cost_at(hour_of(NOW) + timedelta(hours=k), scale)) for k in range(int(hours_left) + 1))
        if hours_left > 6:  # the known pattern continues: the forecast of the rest is close to it
            assert abs(float(mean - want[key]) - truth) <= 0.15 * truth + 0.02, (key, mean, truth)


def test_forecast_per_model_csv_and_table(cli, filled):
    rows = list(csv.DictReader(io.StringIO(cli("forecast", "--by", "model", "--period", "month", "-f", "csv"))))
    assert {r["model"] for r in rows} == {"gpt-4o", "claude-sonnet-4", "gpu:H100"}
    start, _ = period_bounds("month", "UTC", NOW)
    want = spent_by(filled, lambda e: e.model, start)
    for r in rows:
        if r["model"] in want:
            assert Decimal(r["spent_usd"]) == want[r["model"]]
        assert Decimal(r["forecast_usd"]) >= Decimal(r["spent_usd"])
    acme = json.loads(cli("forecast", "--tenant", "acme", "-f", "json"))
    assert [r["tenant"] for r in acme["rows"]] == ["acme"]
    table = cli("forecast", "--by", "team", "--period", "day")
    assert "acme/research" in table and "globex/ops" in table and "lo80" in table


def test_forecast_mistakes_are_one_line(cli):
    out = cli("forecast", "--by", "session", code=1)
    assert "--by must be one of tenant, team, project, agent, model" in out and "Traceback" not in out
    assert "--period must be" in cli("forecast", "--period", "year", code=1)
    assert "--horizon must be" in cli("forecast", "backtest", "--horizon", "soon", code=1)


def test_backtest_compares_with_the_baseline_in_the_same_run(cli):
    doc = json.loads(cli("forecast", "backtest", "--synthetic", "1", "--origins", "4", "-f", "json"))
    ets, naive = doc["rows"]
    assert (ets["method"], naive["method"]) == ("ets", "seasonal-naive")
    assert ets["origins"] == naive["origins"] == 4 and naive["mape_ratio"] == 1.0
    assert ets["mape_ratio"] == pytest.approx(ets["mape_pct"] / naive["mape_pct"])
    ledger_doc = json.loads(cli("forecast", "backtest", "--by", "team", "--origins", "2", "--horizon", "12h", "-f", "json"))
    assert ledger_doc["rows"][0]["origins"] == 2 * len(KEYS) and ledger_doc["rows"][0]["horizon_hours"] == 12
    table = cli("forecast", "backtest", "--synthetic", "2", "--origins", "2")
    assert "MAPE %" in table and "seasonal-naive" in table and "cov 80 %" in table


def test_burn_down_carries_the_forecast_band(cli, filled):
    doc = json.loads(cli("report", "burn-down", "-f", "json"))
    (row,) = doc["rows"]
    start, _ = period_bounds("week", "UTC", NOW)
    spent = sum((e.cost_usd for e in filled["events"] if e.tenant_id == "acme" and e.ts >= start), Decimal(0)) + Decimal("0.004")
    assert Decimal(row["spent"]) == spent
    lo, mean, hi = (Decimal(row[c]) for c in ("forecast_lo80", "forecast_spend", "forecast_hi80"))
    assert spent <= lo <= mean <= hi
    assert "forecast" in cli("report", "burn-down")  # the table shows the band's columns


def test_json_is_the_same_as_format_json_for_the_forecast_and_its_backtest(cli, filled):
    """--json, as the other commands spell it; it and a --format it contradicts are refused in one line."""
    by_flag = json.loads(cli("forecast", "--by", "team", "--json"))
    by_format = json.loads(cli("forecast", "--by", "team", "-f", "json"))
    assert by_flag["report"] == "forecast" and by_flag["rows"]
    spent = lambda doc: {r["team"]: r["spent_usd"] for r in doc["rows"]}  # noqa: E731 - the ledger's, exact
    assert spent(by_flag) == spent(by_format)
    backtest = json.loads(cli("forecast", "backtest", "--synthetic", "1", "--origins", "2", "--json"))
    assert [r["method"] for r in backtest["rows"]] == ["ets", "seasonal-naive"]
    out = cli("forecast", "--json", "-f", "csv", code=1)
    assert "--json and --format csv disagree" in out and "Traceback" not in out
