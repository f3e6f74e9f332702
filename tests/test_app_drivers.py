"""`meterline report drivers`: the change in spend between two periods, split into drivers.

First the decomposition on hand-built two-period ledgers where one driver changes (only that
driver may move, by the whole change, to the last digit), then random ledgers (the drivers sum
to the change exactly), then the real report on a migrated chDB ledger through the CLI, in
every format, and through the API.
"""
from __future__ import annotations

import csv
import gc
import io
import json
import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext

import httpx
import pytest
from typer.testing import CliRunner

from meterline.app.drivers import (DRIVERS, LLM_FACTORS, PREVIOUS, CURRENT, Side, decompose, factors, llm_cost,
                                   period_params, previous_since)
from inprocess import cli_on, filled_ledger
from meterline.cli import app
from meterline.schemas.events import GpuSample, PricedEvent, new_id
from meterline.settings import get_settings
from meterline.sql import ledger
from meterline.sql.rows import gpu_sample_row, priced_event_row, with_offsets

ZERO = Decimal(0)
# USD per token: uncached input, cache write, cache read, output
GPT4O = (Decimal("0.0000025"), Decimal("0.000003125"), Decimal("0.00000125"), Decimal("0.00001"))
MINI = (Decimal("0.00000015"), Decimal("0.0000001875"), Decimal("0.000000075"), Decimal("0.0000006"))


def llm(calls: int, inp: int, out: int, cr: int = 0, cw: int = 0, rates=GPT4O, extra: Decimal = ZERO) -> dict:
    """drivers.sql's row for `calls` identical calls (tokens per call); `extra` per call is a provider's own price."""
    u, w, r, o = rates
    costs = {"input_cost_usd": calls * (inp - cr - cw) * u, "cache_write_cost_usd": calls * cw * w,
             "cache_read_cost_usd": calls * cr * r, "output_cost_usd": calls * out * o}
    return {"calls": calls, "input_tokens": calls * inp, "output_tokens": calls * out, "cache_read_tokens": calls * cr,
            "cache_write_tokens": calls * cw, **costs, "cost_usd": sum(costs.values(), ZERO) + calls * extra}


def side(tool: str = "0", gpu: str = "0", **models: dict) -> Side:
    return Side({("p", name): row for name, row in models.items()}, Decimal(tool), Decimal(gpu))


def check(prev: Side, cur: Side) -> dict[str, Decimal]:
    parts = decompose(prev, cur)
    assert set(parts) == set(DRIVERS)
    assert sum(parts.values(), ZERO) == cur.total() - prev.total()  # exact: Decimal equality, every digit
    return parts


def only(parts: dict[str, Decimal], driver: str, change: Decimal) -> None:
    assert change != 0 and parts[driver] == change, parts
    assert all(v == 0 for k, v in parts.items() if k != driver), parts


BASE = dict(calls=100, inp=1000, out=100, cr=200, cw=50)


def test_the_drivers_are_the_ones_the_report_promises():
    assert DRIVERS == ("call_volume", "model_mix", "tokens_per_call", "cache_hit_rate", "unit_price", "tool_calls", "gpu_time")


@pytest.mark.parametrize("driver, prev, cur", [
    ("call_volume", side(a=llm(**BASE)), side(a=llm(**{**BASE, "calls": 200}))),
    ("tokens_per_call", side(a=llm(**BASE)), side(a=llm(calls=100, inp=2000, out=200, cr=400, cw=100))),  # shares kept
    ("model_mix", side(a=llm(**BASE), b=llm(**BASE, rates=MINI)),
     side(a=llm(**{**BASE, "calls": 40}), b=llm(**{**BASE, "calls": 160}, rates=MINI))),
    ("model_mix", side(a=llm(**BASE)), side(a=llm(**{**BASE, "calls": 30}), b=llm(**{**BASE, "calls": 70}, rates=MINI))),
    ("cache_hit_rate", side(a=llm(**BASE)), side(a=llm(**{**BASE, "cr": 700}))),
    ("cache_hit_rate", side(a=llm(**{**BASE, "cr": 0, "cw": 0})), side(a=llm(**{**BASE, "cr": 0, "cw": 300}))),
    ("unit_price", side(a=llm(**BASE)), side(a=llm(**BASE, rates=tuple(r * 2 for r in GPT4O)))),
    ("unit_price", side(a=llm(**BASE)), side(a=llm(**BASE, extra=Decimal("0.001")))),  # a provider's own price
    ("tool_calls", side("1.5", a=llm(**BASE)), side("4.25", a=llm(**BASE))),
    ("gpu_time", side(gpu="0.006916666667", a=llm(**BASE)), side(gpu="0.02", a=llm(**BASE))),
])
def test_when_one_driver_changes_only_that_driver_moves(driver, prev, cur):
    """Dropping a factor from the identity (or mislabelling it) fails its case here."""
    only(check(prev, cur), driver, cur.total() - prev.total())
    only(check(cur, prev), driver, prev.total() - cur.total())  # and back


def test_a_provider_price_per_call_scales_with_calls_not_price():
    prev = side(a=llm(**BASE, extra=Decimal("0.0003")))
    cur = side(a=llm(**{**BASE, "calls": 300}, extra=Decimal("0.0003")))
    only(check(prev, cur), "call_volume", cur.total() - prev.total())


def test_a_new_group_is_call_volume_and_its_other_terms():
    cur = side("0.5", "0.25", a=llm(**BASE), b=llm(**BASE, rates=MINI))
    parts = check(Side(), cur)
    assert parts["call_volume"] == cur.llm() and parts["tool_calls"] == Decimal("0.5") and parts["gpu_time"] == Decimal("0.25")
    assert all(parts[k] == 0 for k in ("model_mix", "tokens_per_call", "cache_hit_rate", "unit_price"))


def test_an_interaction_is_shared_evenly():
    """Twice the calls, each twice as long: cost x4; Shapley gives volume and length 1.5x each."""
    prev, cur = side(a=llm(**BASE)), side(a=llm(calls=200, inp=2000, out=200, cr=400, cw=100))
    parts = check(prev, cur)
    assert parts["call_volume"] == parts["tokens_per_call"] == prev.total() * Decimal("1.5")


def test_the_identity_reproduces_each_period_exactly():
    prev = side(a=llm(**BASE, extra=Decimal("-0.00001")), b=llm(calls=3, inp=10, out=0, rates=MINI))
    cur = side(a=llm(calls=7, inp=0, out=5), c=llm(calls=1, inp=100, out=1, cr=100))
    f = factors(prev, cur)
    assert llm_cost(f, dict.fromkeys(LLM_FACTORS, PREVIOUS)) == prev.llm()
    assert llm_cost(f, dict.fromkeys(LLM_FACTORS, CURRENT)) == cur.llm()


def random_side(rng: random.Random) -> Side:
    models = {}
    for name in rng.sample("abcd", rng.randrange(0, 4)):
        inp = rng.randrange(0, 5000)
        cr = rng.randrange(0, inp + 1)
        rates = tuple(Decimal(rng.randrange(0, 10**9)) / 10**15 for _ in range(4))
        models[name] = llm(rng.randrange(1, 10**6), inp, rng.randrange(0, 3000), cr, rng.randrange(0, inp - cr + 1), rates,
                           Decimal(rng.randrange(-10**6, 10**6)) / 10**18)
    return side(str(Decimal(rng.randrange(0, 10**30)) / 10**18), str(Decimal(rng.randrange(0, 10**12)) / 10**12), **models)


@pytest.mark.parametrize("seed", range(40))
def test_drivers_sum_to_the_change_to_the_last_digit(seed):
    """Random ledgers, 18-place money and sums far past Decimal's default 28 digits."""
    rng = random.Random(seed)
    prev, cur = random_side(rng), random_side(rng)
    with localcontext(prec=100):
        parts = check(prev, cur)
        back = check(cur, prev)
    assert all(p.as_tuple().exponent >= -18 for p in parts.values())
    # symmetric: swapping the periods negates every driver (rounding may move one 1e-18 unit)
    assert all(abs(parts[k] + back[k]) <= Decimal("1e-18") for k in DRIVERS)


def test_period_parameters():
    now = datetime(2025, 6, 15, 12, tzinfo=timezone.utc)
    p = period_params("7d", now=now, by="team")
    assert (p.since, p.until) == (now + timedelta(seconds=1) - timedelta(days=7), now + timedelta(seconds=1))
    assert previous_since(p) == p.since - timedelta(days=7)
    p = period_params(since="2025-06-01", until="2025-06-08")
    assert previous_since(p) == datetime(2025, 5, 25, tzinfo=timezone.utc)
    p = period_params("24h", until="2025-06-08")
    assert p.since == datetime(2025, 6, 7, tzinfo=timezone.utc)
    for bad in ({"period": "7d", "since": "1d"}, {"period": "week"}, {"by": "session"}, {"by": "model"}, {"tenant": ""}):
        with pytest.raises(ValueError):
            period_params(**bad)


# ---- the report on a real ledger ------------------------------------------------------------------

UNTIL = datetime(2025, 6, 15, tzinfo=timezone.utc)
SINCE = UNTIL - timedelta(days=7)
PREV = SINCE - timedelta(days=7)
EVIL = "[bold red]=HYPERLINK(\"x\")[/]"  # rich markup and a spreadsheet formula: both must stay text


def event(ts: datetime, tenant: str, team: str, agent: str, calls_tokens: tuple[int, int, int] = (1000, 100, 0),
          model: str = "gpt-4o", rates=GPT4O, kind: str = "llm_call", cost: Decimal | None = None) -> PricedEvent:
    common = dict(event_id=new_id(), ts=ts, tenant_id=tenant, team=team, project="p", agent_id=agent, session_id=f"{agent}-s",
                  catalog_version="t", priced_at=ts, cost_source="catalog")
    if kind != "llm_call":
        return PricedEvent(**common, kind=kind, tool="search", units=1, cost_usd=cost, list_cost_usd=cost)
    inp, out, cr = calls_tokens
    u, _, r, o = rates
    parts = {"input_cost_usd": (inp - cr) * u, "cache_read_cost_usd": cr * r, "output_cost_usd": out * o}
    total = sum(parts.values(), ZERO)
    return PricedEvent(**common, kind="llm_call", provider="openai", model=model, input_tokens=inp, output_tokens=out,
                       cache_read_tokens=cr, cost_usd=total, list_cost_usd=total, **parts)


def scenario() -> tuple[list[PricedEvent], list[tuple[GpuSample, Decimal, Decimal]]]:
    """acme/research doubles its calls; globex/research (same team name) doubles tokens per call;
    acme/support starts using a search tool; the evil tenant starts using the cache; GPU time grows."""
    ev = []
    for period_start, factor in ((PREV, 1), (SINCE, 2)):
        at = lambda k: period_start + timedelta(hours=k)  # noqa: E731
        ev += [event(at(k), "acme", "research", "agent-1") for k in range(10 * factor)]
        ev += [event(at(k), "globex", "research", "agent-1", (1000 * factor, 100 * factor, 0)) for k in range(10)]
        ev += [event(at(k), EVIL, "t", "a", (1000, 100, 0 if factor == 1 else 600)) for k in range(4)]
        ev += [event(at(k), "acme", "support", "agent-2") for k in range(5)]
    ev += [event(SINCE + timedelta(hours=k), "acme", "support", "agent-2", kind="tool_call", cost=Decimal("0.004")) for k in range(3)]
    ev.append(event(SINCE - timedelta(milliseconds=1), "acme", "research", "agent-1"))  # the last instant of previous
    ev.append(event(PREV - timedelta(milliseconds=1), "acme", "research", "agent-1"))  # before both: not counted
    ev.append(event(UNTIL, "acme", "research", "agent-1"))  # until is exclusive
    gpu = []
    for ts, tenant, cost in ((PREV + timedelta(hours=1), "acme", "0.5"), (SINCE + timedelta(hours=1), "acme", "0.75"),
                             (SINCE + timedelta(hours=2), "", "0.125")):
        gpu.append((GpuSample(sample_id=new_id(), ts=ts, node="n", level="process", gpu_index=0, gpu_uuid="GPU-1",
                              gpu_name="H100", interval_ms=10_000, pid=1, attributed=bool(tenant), tenant_id=tenant,
                              team="research" if tenant else "", agent_id="agent-1" if tenant else ""),
                    Decimal(10), Decimal(cost)))
    return ev, gpu


pytestmark = pytest.mark.xdist_group("app_drivers")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    events, gpu = scenario()
    tables = {"priced_events": [with_offsets(priced_event_row(e), "priced", 0, i) for i, e in enumerate(events)],
              "gpu_samples": [with_offsets(gpu_sample_row(s, sec, c, "t"), "gpu", 0, i) for i, (s, sec, c) in enumerate(gpu)]}
    with filled_ledger(tmp_path_factory.mktemp("drivers"), tables) as settings:
        yield settings, events, gpu


@pytest.fixture
def cli(filled, monkeypatch):
    with cli_on(filled[0], monkeypatch, "report", "drivers") as invoke:
        yield invoke


def truth(filled, key_of) -> dict[str, tuple[Decimal, Decimal]]:
    """(previous, current) spend per group, from the events and samples that went in."""
    _, events, gpu = filled
    out: dict[str, list[Decimal]] = {}
    items = [(e.ts, e, e.cost_usd) for e in events] + [(s.ts, s, c) for s, _, c in gpu]
    for ts, rec, cost in items:
        if PREV <= ts < UNTIL:
            key = key_of(rec.tenant_id or "unattributed", rec)
            out.setdefault(key, [ZERO, ZERO])[ts >= SINCE] += cost
    return {k: (a, b) for k, (a, b) in out.items()}


PERIOD = ("--period", "7d", "--until", UNTIL.isoformat())


def test_the_report_by_team_qualifies_teams_and_adds_up(cli, filled):
    doc = json.loads(cli("--by", "team", *PERIOD, "-f", "json"))
    assert doc["previous"] == {"since": PREV.isoformat(), "until": SINCE.isoformat()} and doc["drivers"] == list(DRIVERS)
    rows = {r["team"]: r for r in doc["rows"]}
    want = truth(filled, lambda tenant, rec: f"{tenant}/{rec.team}")
    assert set(rows) == set(want) and {"acme/research", "globex/research"} <= set(rows)  # one team name, two tenants
    for key, (before, after) in want.items():
        r = rows[key]
        assert (Decimal(r["previous_usd"]), Decimal(r["current_usd"])) == (before, after), key
        assert sum(Decimal(r[f"{d}_usd"]) for d in DRIVERS) == Decimal(r["change_usd"]) == after - before, key
    research = rows["globex/research"]
    assert Decimal(research["tokens_per_call_usd"]) == Decimal(research["change_usd"]) > 0  # only longer calls there
    assert Decimal(rows[f"{EVIL}/t"]["cache_hit_rate_usd"]) == Decimal(rows[f"{EVIL}/t"]["change_usd"]) < 0
    assert Decimal(rows["acme/support"]["tool_calls_usd"]) == Decimal("0.012")
    assert Decimal(rows["unattributed/"]["gpu_time_usd"]) == Decimal("0.125")


def test_the_report_by_tenant_and_agent(cli, filled):
    for by, key_of in (("tenant", lambda t, rec: t), ("agent", lambda t, rec: f"{t}/{rec.agent_id}")):
        doc = json.loads(cli("--by", by, "--since", SINCE.isoformat(), "--until", UNTIL.isoformat(), "-f", "json"))
        got = {r[by]: (Decimal(r["previous_usd"]), Decimal(r["current_usd"])) for r in doc["rows"]}
        assert got == truth(filled, key_of), by
    acme = json.loads(cli("--tenant", "acme", *PERIOD, "-f", "json"))["rows"]
    assert [r["tenant"] for r in acme] == ["acme"]
    agent = next(r for r in json.loads(cli("--by", "agent", *PERIOD, "-f", "json"))["rows"] if r["agent"] == "acme/agent-1")
    assert Decimal(agent["gpu_time_usd"]) == Decimal("0.25")


def test_csv_and_table_keep_user_text_as_text(cli, filled):
    rows = list(csv.DictReader(io.StringIO(cli("--by", "team", *PERIOD, "-f", "csv"))))
    evil = next(r for r in rows if r["team"].endswith("/t"))
    assert evil["team"] == f"{EVIL}/t"  # starts with '[': no formula; the formula check is csv_text's
    assert all("E" not in r["change_usd"] for r in rows)
    assert sum(Decimal(r["change_usd"]) for r in rows) == sum((b - a for a, b in truth(filled, lambda t, rec: t).values()), ZERO)
    table = cli("--by", "tenant", *PERIOD)
    assert EVIL in table and "TOTAL" in table  # shown literally, not read as rich markup
    assert "tok/call" in table and "cache" in table and "GPU" in table
    assert "no change from: mix, price" in table  # idle drivers are named, not silently dropped


def test_a_formula_named_group_is_neutralised_in_csv():
    from meterline.app.drivers import render
    from meterline.app.store import Result

    params = period_params("7d")
    result = Result(["tenant", "previous_usd"], ["String", "Decimal(38, 18)"], [("=1+2", Decimal("-1"))])
    assert render(params, result, "csv").splitlines()[1] == "'=1+2,-1"


def test_the_api_serves_the_same_report(filled):
    from meterline.app.api import ApiServer
    from meterline.app.report import run_report
    from meterline.app.store import DirectLedger, RemoteLedger

    settings = filled[0]
    params = period_params("7d", until=UNTIL.isoformat(), by="team")
    direct_ledger = DirectLedger(settings, ledger.connect(settings))
    api = ApiServer(lambda: DirectLedger(settings, ledger.connect(settings)), port=0)
    api.start()
    try:
        direct = run_report(direct_ledger, "drivers", params)
        remote = RemoteLedger(api.url).report("drivers", params.as_query())
        bad = httpx.get(f"{api.url}/api/report/drivers", params={"by": "session"})
    finally:
        api.stop()
        direct_ledger.close()
        gc.collect()
    assert remote.rows == direct.rows and remote.columns == direct.columns == ["team", *direct.columns[1:]]
    assert bad.status_code == 400 and "tenant, team, agent" in bad.json()["error"]


def test_on_a_cluster_the_drivers_query_reads_only_the_all_tables():
    import re

    from meterline.app.report import load_query

    rendered = ledger.render_reads(load_query("drivers"), "prod")
    tables = re.findall(r"\bFROM\s+(\w+)", rendered)
    assert sorted(tables) == ["gpu_samples_all", "priced_events_all"], tables


@pytest.mark.parametrize("args, message", [(("--vs", "last-year"), "--vs must be previous"),
                                           (("--by", "session"), "--by must be one of tenant, team, agent"),
                                           (("--period", "7d", "--since", "1d"), "not both"),
                                           (("--period", "fortnight"), "--period must look like")])
def test_mistakes_are_one_line(filled, monkeypatch, args, message):
    monkeypatch.setenv("METERLINE_CLICKHOUSE_DSN", filled[0].dsn)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["report", "drivers", *args])
    get_settings.cache_clear()
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output  # as every report
