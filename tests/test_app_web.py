"""The HTTP API and the built-in page, against the real broker, real chDB and a real browser.

Spend updates, decisions and anomalies go through Kafka into the live feed; the page is
loaded in headless Chromium (Debian's `chromium`), its DOM is checked for chart elements
that carry data, and a screenshot must not be blank. Reports through the API must equal
the same reports run directly on the store.
"""
from __future__ import annotations

import gc
import os
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from meterline.app.api import ApiServer
from meterline.app.live import LiveFeed, LiveState
from meterline.app.report import ReportParams, run_report
from meterline.app.store import DirectLedger, RemoteLedger, open_ledger, remove_runfile, write_runfile
from meterline.schemas.events import Anomaly, PricedEvent, SpendUpdate, ThrottleDecision, new_id
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.rows import insert_rows, priced_event_row, with_offsets

from collectors_kafka import wait_for  # the tests' shared bounded wait

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]
TENANTS = ("acme", "globex", "initech")
NOW = datetime.now(timezone.utc)


def publish_activity(settings: Settings) -> None:
    producer = Producer(settings.kafka_config())
    for tenant_i, tenant in enumerate(TENANTS):
        total = Decimal(0)
        for step in range(12):
            total += Decimal(tenant_i + 1) * Decimal("0.37")
            ts = NOW - timedelta(seconds=60 - 5 * step)
            update = SpendUpdate(update_id=new_id(), ts=ts, tenant_id=tenant, scope="tenant", scope_id=tenant,
                                 window_start=ts - timedelta(seconds=5), window_end=ts, window_cost_usd=Decimal("0.37"),
                                 period_start=NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0), period_cost_usd=total)
            producer.produce(settings.topic("spend"), update.to_json(), key=tenant)
    for action, extra in (("throttle", {}), ("downgrade", {"max_model": "gpt-4o-mini"}), ("deny", {}), ("deny", {})):
        d = ThrottleDecision(decision_id=new_id(), tenant_id="globex", scope="tenant", scope_id="globex", priority="low",
                             action=action, reason=f"test {action}", issued_at=NOW, expires_at=NOW + timedelta(minutes=5), **extra)
        producer.produce(settings.topic("control"), d.to_json(), key=d.key)
    for kind in ("runaway_session", "spend_spike"):
        a = Anomaly(anomaly_id=new_id(), ts=NOW, kind=kind, severity="warning", tenant_id="initech", scope="session",
                    scope_id="s-1", window_start=NOW - timedelta(minutes=1), window_end=NOW, message=f"test {kind}")
        producer.produce(settings.topic("anomalies"), a.to_json(), key="initech")
    assert producer.flush(30) == 0


@pytest.fixture
def served(settings, tmp_path):
    """Live feed + API over a migrated chDB ledger with a few priced events."""
    gc.collect()
    store = Settings(**{**settings.model_dump(), "clickhouse_dsn": f"chdb://{tmp_path / 'ch'}"})
    client = ledger.connect(store)
    ledger.migrate(client)
    events = [PricedEvent(event_id=new_id(), ts=NOW - timedelta(minutes=i), tenant_id=TENANTS[i % 3], team="t", kind="llm_call",
                          provider="openai", model="gpt-4o", input_tokens=100, output_tokens=10, cost_usd=Decimal(i) / 1000,
                          list_cost_usd=Decimal(i) / 1000, cost_source="catalog", catalog_version="v", priced_at=NOW)
              for i in range(1, 30)]
    insert_rows(client, "priced_events", [with_offsets(priced_event_row(e), "priced", 0, i) for i, e in enumerate(events)])
    publish_activity(store)
    feed = LiveFeed(store).start()
    api = ApiServer(lambda: DirectLedger(store, ledger.connect(store)), live=feed.state,
                    health=lambda: {"api": {"running": True, "restarts": 0}}, port=0)
    api.start()
    wait_for(lambda: len(feed.state.series) == 3 and len(feed.state.decisions) == 4 and len(feed.state.anomalies) == 2,
             "the live feed to read what was published", step=0.1)
    yield store, api, feed, client, events
    api.stop()
    feed.stop()
    client.close()
    gc.collect()


def test_live_api_reports_spend_decisions_and_anomalies(served):
    _, api, *_ = served
    live = httpx.get(f"{api.url}/api/live").json()
    assert {t["tenant_id"] for t in live["tenants"]} == set(TENANTS)
    top = max(live["tenants"], key=lambda t: Decimal(t["cost_usd"]))
    assert top["tenant_id"] == "initech" and Decimal(top["cost_usd"]) == Decimal("0.37") * 3 * 12
    assert live["decision_counts"] == {"throttle": 1, "downgrade": 1, "deny": 2}
    assert live["anomaly_counts"] == {"runaway_session": 1, "spend_spike": 1}
    assert httpx.get(f"{api.url}/health").json()["status"] == "ok"


def test_decision_latency_counts_only_decisions_that_arrive_after_the_backfill(settings):
    """`up` restarted reads the control topic's recent history into the dashboard; those decisions were issued
    long ago, and counting their age as latency filled meterline_decision_latency_seconds with hours."""
    producer = Producer(settings.kafka_config())

    def publish(issued_at):
        d = ThrottleDecision(decision_id=new_id(), tenant_id="globex", scope="tenant", scope_id="globex", priority="low",
                             action="throttle", reason="test", issued_at=issued_at, expires_at=issued_at + timedelta(hours=2))
        producer.produce(settings.topic("control"), d.to_json(), key=d.key)
        assert producer.flush(30) == 0

    for hours in (3, 2, 1):
        publish(NOW - timedelta(hours=hours))
    latencies: list[float] = []
    feed = LiveFeed(settings, on_decision_latency=latencies.append).start()
    try:
        wait_for(lambda: len(feed.state.decisions) == 3, "the live feed to backfill the old decisions", step=0.1)
        publish(datetime.now(timezone.utc))
        wait_for(lambda: len(feed.state.decisions) == 4, "the live feed to read the new decision", step=0.1)
    finally:
        feed.stop()
    assert len(latencies) == 1 and latencies[0] < 3600  # the new decision alone; each backfilled one is hours old


def test_the_live_tenant_total_starts_over_with_a_new_month():
    """The live total kept the highest month-to-date ever seen: on the 1st, the dashboard went on showing last
    month's total (and its series a flat line) until the new month outspent it."""
    state = LiveState()
    december, january = datetime(2025, 12, 1, tzinfo=timezone.utc), datetime(2026, 1, 1, tzinfo=timezone.utc)

    def spend(period_start, total, ts):
        state.add_spend(SpendUpdate(update_id=new_id(), ts=ts, tenant_id="acme", scope="tenant", scope_id="acme",
                                    window_start=ts - timedelta(seconds=5), window_end=ts, window_cost_usd=Decimal(1),
                                    period_start=period_start, period_cost_usd=Decimal(total)))

    spend(december, "120", january - timedelta(minutes=1))
    spend(december, "100", january - timedelta(minutes=2))  # out of order within the month: the higher total stays
    assert state.snapshot()["tenants"][0]["cost_usd"] == "120"
    spend(january, "3", january + timedelta(minutes=1))
    spend(december, "121", january - timedelta(seconds=1))  # late, of the month before
    assert state.snapshot()["tenants"][0]["cost_usd"] == "3"


def test_reports_through_the_api_equal_direct_reports(served):
    store, api, _, client, events = served
    params = ReportParams.parse(since="1d", by="tenant")
    direct = run_report(DirectLedger(store, client), "chargeback", params)
    remote = RemoteLedger(api.url)
    via_api = remote.report("chargeback", params.as_query())
    assert via_api.rows == direct.rows and via_api.columns == direct.columns
    assert sum(r[-1] for r in via_api.rows) == sum((e.cost_usd for e in events), Decimal(0))
    typed = remote.query("SELECT sum(cost_usd) AS c FROM priced_events WHERE ts >= {since:DateTime64(3, 'UTC')}",
                         {"since": NOW - timedelta(days=1)})
    assert typed.rows == [(sum((e.cost_usd for e in events), Decimal(0)),)]  # a Decimal again, to the last digit


def test_the_api_only_reads(served):
    _, api, _, client, _ = served
    for sql in ("DROP TABLE priced_events", "SELECT 1; DROP TABLE priced_events", "INSERT INTO anomalies SELECT * FROM anomalies"):
        resp = httpx.post(f"{api.url}/api/sql", json={"sql": sql})
        assert resp.status_code == 403, sql
    bad = httpx.get(f"{api.url}/api/report/chargeback", params={"by": "password"})
    assert bad.status_code == 400 and "--by" in bad.json()["error"]
    assert client.query("SELECT count() FROM priced_events").result_rows == [(29,)]


def test_readers_go_through_up_while_it_runs(served):
    store, api, *_ = served
    write_runfile(store, api.url)
    try:
        reader = open_ledger(store)
        assert isinstance(reader, RemoteLedger)
        assert reader.query("SELECT count() AS n FROM priced_events").rows == [(29,)]
    finally:
        remove_runfile(store)
    assert not (store.data_dir / "up.json").exists()


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) into pixel rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and color in (2, 6) and interlace == 0
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        filt, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if filt == 1:
                line[i] = (line[i] + a) & 255
            elif filt == 2:
                line[i] = (line[i] + b) & 255
            elif filt == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i:i + 3]) for r in rows for i in range(0, stride, bpp)]


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / f"chrome-{uuid.uuid4().hex[:6]}"
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def test_the_page_draws_charts_with_data_in_a_real_browser(served, tmp_path):
    _, api, *_ = served
    done = chromium(["--virtual-time-budget=10000", "--dump-dom", api.url], tmp_path)
    dom = done.stdout
    assert "<svg" in dom, done.stderr[-2000:]
    series = set(re.findall(r'<path[^>]*class="series"[^>]*data-series="([^"]+)"', dom))
    assert series == set(TENANTS)  # one line per tenant
    paths = re.findall(r'<path[^>]*class="series"[^>]*\sd="([^"]+)"', dom)
    assert all(p.count("L") >= 5 for p in paths)  # lines drawn through the points
    bars = re.findall(r'<rect[^>]*class="bar"[^>]*data-name="([^"]+)"[^>]*data-value="([^"]+)"', dom)
    names = {n for n, v in bars if float(v) > 0}
    assert {"throttle", "downgrade", "deny", "runaway_session", "spend_spike", *TENANTS} <= names
    assert "test deny" in dom and "test runaway_session" in dom  # the tables list them

    shot = tmp_path / "page.png"
    chromium(["--virtual-time-budget=10000", "--window-size=1280,1100", "--hide-scrollbars", f"--screenshot={shot}", api.url], tmp_path)
    if os.environ.get("METERLINE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["METERLINE_KEEP_SCREENSHOT"])
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1280, 1100)
    colours = {p for p in pixels[::7]}
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    series_blue = sum(1 for p in pixels if abs(p[0] - 0x4d) < 12 and abs(p[1] - 0xab) < 12 and abs(p[2] - 0xf7) < 12)
    assert series_blue > 200  # the first tenant's line and bar are on screen in their colour


def test_user_text_on_the_page_is_text_never_markup(tmp_path):
    """A tenant may be named like HTML (ids allow it); the page must show it, not run it."""
    evil = '<img src=x id=pwned onerror="document.title=1">'
    live = LiveState()
    live.add_spend(SpendUpdate(update_id=new_id(), ts=NOW, tenant_id=evil, scope="tenant", scope_id=evil,
                               window_start=NOW - timedelta(seconds=5), window_end=NOW, window_cost_usd=Decimal("1"),
                               period_start=NOW - timedelta(days=1), period_cost_usd=Decimal("1")))
    api = ApiServer(lambda: None, live=live, health=lambda: {evil: {"running": True, "restarts": 0}}, port=0)
    api.start()
    try:
        dom = chromium(["--virtual-time-budget=5000", "--dump-dom", api.url], tmp_path).stdout
    finally:
        api.stop()
    assert 'id="pwned"' not in dom and "<img" not in dom
    assert dom.count("&lt;img src=x id=pwned") >= 2  # in the legend and the components list, as text


def test_the_page_asks_for_a_token_once_tokens_exist(tmp_path):
    from meterline.app.auth import TokenStore

    tokens = TokenStore(tmp_path / "tokens.json")
    tokens.create("ops", "reader")
    api = ApiServer(lambda: None, live=LiveState(), port=0, tokens=tokens)
    api.start()
    try:
        dom = chromium(["--virtual-time-budget=5000", "--dump-dom", api.url], tmp_path).stdout
    finally:
        api.stop()
    assert re.search(r'<form id="login" class="login">', dom)  # shown (no hidden attribute)
    assert "this API needs a token" in dom


def test_the_drivers_waterfall_draws_the_report_exactly_and_escapes_names(tmp_path):
    """Previous spend -> each driver's +/- -> current spend, from /api/report/drivers; no Kafka needed."""
    from decimal import ROUND_HALF_UP

    from meterline.app.drivers import DRIVERS
    from meterline.sql.rows import gpu_sample_row
    from meterline.schemas.events import GpuSample
    from test_app_drivers import event

    evil = '<img src=x id=pwned onerror="document.title=1">'
    now = datetime.now(timezone.utc).replace(microsecond=0)
    before, recent = now - timedelta(days=10), now - timedelta(hours=1)
    events = [event(before, "acme", "t", "a") for _ in range(5)] + [event(recent, "acme", "t", "a") for _ in range(10)]
    events += [event(recent, evil, "t", "a", (1000, 100, 600)) for _ in range(3)]
    events.append(event(before, evil, "t", "a", kind="tool_call", cost=Decimal("0.002")))
    gpu = GpuSample(sample_id=new_id(), ts=recent, node="n", level="process", gpu_index=0, gpu_uuid="GPU-1", gpu_name="H100",
                    interval_ms=10_000, pid=1, attributed=True, tenant_id="acme")
    gc.collect()
    store = Settings(data_dir=tmp_path / "data", clickhouse_dsn=f"chdb://{tmp_path / 'ch'}")
    client = ledger.connect(store)
    ledger.migrate(client)
    insert_rows(client, "priced_events", [with_offsets(priced_event_row(e), "priced", 0, i) for i, e in enumerate(events)])
    insert_rows(client, "gpu_samples", [with_offsets(gpu_sample_row(gpu, Decimal(10), Decimal("0.5"), "t"), "gpu", 0, 0)])
    client.close()
    api = ApiServer(lambda: DirectLedger(store, ledger.connect(store)), live=LiveState(), port=0)
    api.start()
    try:
        doc = httpx.get(f"{api.url}/api/report/drivers", params={"since": "7d", "by": "tenant"}).json()
        dom = chromium(["--virtual-time-budget=5000", "--dump-dom", api.url], tmp_path).stdout
    finally:
        api.stop()
        gc.collect()
    rows = [dict(zip(doc["columns"], r)) for r in doc["rows"]]
    assert {r["tenant"] for r in rows} == {"acme", evil}
    bars = re.findall(r'<rect[^>]*class="wf-bar"[^>]*data-step="([^"]+)"[^>]*data-value="([^"]+)"', dom)
    assert [step for step, _ in bars] == ["previous", *DRIVERS, "current"]  # every driver has its bar, in order
    want = {step: sum((Decimal(r[f"{step}_usd"]) for r in rows), Decimal(0)) for step, _ in bars}
    assert {step: Decimal(v) for step, v in bars} == want  # exact: BigInt sums on the page, not floats
    assert want["previous"] == Decimal("0.0195") and want["gpu_time"] == Decimal("0.5") and want["tool_calls"] == Decimal("-0.002")
    assert want["previous"] + sum(want[d] for d in DRIVERS) == want["current"]

    def label(step: str, v: Decimal) -> str:
        q = abs(v).quantize(Decimal("0.0001"), ROUND_HALF_UP)
        sign = "" if not q else "−" if v < 0 else "" if step in ("previous", "current") else "+"
        return f"{sign}${q}"

    labels = re.findall(r'<text[^>]*class="wf-value"[^>]*>([^<]*)</text>', dom)
    assert labels == [label(step, want[step]) for step, _ in bars]
    assert 'id="pwned"' not in dom and "<img" not in dom
    assert "&lt;img src=x id=pwned" in dom  # the group picker shows the tenant's name as text


def test_the_strategies_card_shows_the_stored_run_and_escapes_its_source(tmp_path):
    """`simulate strategies --store` -> strategy_results -> /api/report/strategies -> the table card."""
    from meterline.allocator import strategies as st

    evil = '<img src=x id=pwned onerror="document.title=1">'
    trace = st.Trace(evil, 3_600_000, [st.Request(i * 1000, "a", "critical", 400) for i in range(3600)],
                     [st.Job("j", 0, 600_000, 3_600_000, 60_000)])
    inst = st.load_instance("h100", on_demand=Decimal("2.49"))
    rows = st.simulate(trace, inst)
    gc.collect()
    store = Settings(data_dir=tmp_path / "data", clickhouse_dsn=f"chdb://{tmp_path / 'ch'}")
    client = ledger.connect(store)
    ledger.migrate(client)
    st.store(client, rows, trace, inst, st.Knobs(), "run-1", NOW)
    client.close()
    api = ApiServer(lambda: DirectLedger(store, ledger.connect(store)), live=LiveState(), port=0)
    api.start()
    try:
        dom = chromium(["--virtual-time-budget=5000", "--dump-dom", api.url], tmp_path).stdout
    finally:
        api.stop()
        gc.collect()
    cells = re.findall(r'<td data-metric="cost_usd" data-strategy="([^"]+)" data-value="([^"]+)">', dom)
    assert [(s, Decimal(v)) for s, v in cells] == [(r["strategy"], r["cost_usd"]) for r in rows]  # exact, seed's order
    assert len(re.findall(r'<td data-metric="', dom)) == 8 * len(rows)  # every row of the table, every strategy
    assert 'id="pwned"' not in dom and "&lt;img src=x id=pwned" in dom


def test_the_budget_card_draws_the_forecast_band_of_the_burn_down(tmp_path):
    """/api/report/burn-down's period-end forecast and 80 % interval, drawn as a shaded band; no Kafka needed."""
    from meterline.app.forecast import hour_of
    from meterline.schemas.events import BudgetPolicy
    from meterline.sql.rows import budget_policy_row

    import random

    rng, now = random.Random(7), datetime.now(timezone.utc).replace(microsecond=0)
    events = []
    for k in range(96, -1, -1):  # four days of hourly spend with a daily cycle and noise
        ts = min(hour_of(now) - timedelta(hours=k) + timedelta(minutes=1), now)
        cost = Decimal(200 + (ts.hour >= 9) * 300 + rng.randrange(-50, 50)) / 10_000
        events.append(PricedEvent(event_id=new_id(), ts=ts, tenant_id="acme", team="t", kind="llm_call", provider="openai",
                                  model="gpt-4o", input_tokens=10, output_tokens=1, cost_usd=cost, list_cost_usd=cost,
                                  cost_source="catalog", catalog_version="v", priced_at=ts))
    policy = BudgetPolicy(policy_id="acme-month", tenant_id="acme", scope="tenant", scope_id="acme", amount=Decimal("40"),
                          period="month")
    gc.collect()
    store = Settings(data_dir=tmp_path / "data", clickhouse_dsn=f"chdb://{tmp_path / 'ch'}")
    client = ledger.connect(store)
    ledger.migrate(client)
    insert_rows(client, "priced_events", [with_offsets(priced_event_row(e), "priced", 0, i) for i, e in enumerate(events)])
    insert_rows(client, "budget_policies", [with_offsets(budget_policy_row(policy), "budgets", 0, 0)])
    client.close()
    api = ApiServer(lambda: DirectLedger(store, ledger.connect(store)), live=LiveState(), port=0)
    api.start()
    try:
        doc = httpx.get(f"{api.url}/api/report/burn-down", timeout=60).json()  # the first call imports statsmodels
        dom = chromium(["--virtual-time-budget=5000", "--dump-dom", api.url], tmp_path).stdout
    finally:
        api.stop()
        gc.collect()
    (row,) = [dict(zip(doc["columns"], r)) for r in doc["rows"]]
    assert Decimal(row["spent"]) <= Decimal(row["forecast_lo80"]) <= Decimal(row["forecast_spend"]) <= Decimal(row["forecast_hi80"])
    band = re.search(r'<rect[^>]*class="fc-band"[^>]*data-policy="acme-month"[^>]*data-lo="([^"]+)"[^>]*data-hi="([^"]+)"'
                     r'[^>]*x="([^"]+)"[^>]*width="([^"]+)"', dom)
    assert band, dom[-3000:]
    point = re.search(r'<line[^>]*class="fc-point"[^>]*data-value="([^"]+)"', dom)
    lo, hi, mean = Decimal(band[1]), Decimal(band[2]), Decimal(point[1])
    assert lo < mean < hi and float(band[4]) >= 2  # a band with width on screen, the forecast inside it
    # the page asked a moment after the test did: the same forecast, up to the few seconds between the two
    for got, want in ((lo, row["forecast_lo80"]), (hi, row["forecast_hi80"]), (mean, row["forecast_spend"])):
        assert abs(got - Decimal(want)) <= Decimal("0.001") * Decimal(want), (got, want)
    spent = Decimal(re.search(r'<rect[^>]*class="fc-spent"[^>]*data-value="([^"]+)"', dom)[1])
    assert spent == Decimal(row["spent"]) and spent < lo
