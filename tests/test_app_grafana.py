"""Every Grafana panel's SQL runs against the real migrated ledger schema in chDB.

Grafana's ClickHouse plugin expands macros ($__timeFilter, $__timeInterval, ...) and
variables (${tenant}) before sending SQL; `expand` does the same small substitution
(documented in deploy/grafana/README.md), then each query runs on a ledger with rows in
every table, for all tenants and for one.
"""
from __future__ import annotations

import gc
import json
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from meterline.allocator import strategies
from meterline.schemas.events import Anomaly, BudgetPolicy, DeadLetter, GpuSample, PricedEvent, ThrottleDecision, new_id
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.rows import contract_row, gpu_sample_row, insert_rows, with_offsets

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
NOW = datetime.now(timezone.utc).replace(microsecond=0)
FROM, TO = NOW - timedelta(hours=6), NOW + timedelta(minutes=5)


def expand(sql: str, tenant: str = "", start: datetime = FROM, end: datetime = TO) -> str:
    def ts(t: datetime) -> str:
        return f"toDateTime64('{t.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}', 3, 'UTC')"

    sql = re.sub(r"\$__timeFilter\((\w+)\)", lambda m: f"{m[1]} >= {ts(start)} AND {m[1]} < {ts(end)}", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)", lambda m: f"toStartOfInterval({m[1]}, INTERVAL 60 second)", sql)
    sql = sql.replace("$__fromTime", ts(start)).replace("$__toTime", ts(end)).replace("$__interval_s", "60")
    sql = sql.replace("${tenant}", tenant.replace("'", "''"))
    assert "$" not in sql, f"an unexpanded macro or variable is left: {sql}"
    return sql


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.extend(panels(p) if p.get("type") == "row" else [p])
    return out


def strategy_run():
    """A small `simulate strategies` run: one hour of requests and a batch job."""
    trace = strategies.Trace("test", 3_600_000, [strategies.Request(i * 1000, "a", "critical", 500) for i in range(3600)],
                             [strategies.Job("j", 0, 600_000, 3_600_000, 60_000)])
    inst = strategies.load_instance("h100", on_demand=Decimal("2.49"))
    knobs = strategies.Knobs()
    return strategies.simulate(trace, inst, knobs), trace, inst, knobs


pytestmark = pytest.mark.xdist_group("app_grafana")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = tmp_path_factory.mktemp("grafana")
    gc.collect()
    c = ledger.connect(Settings(data_dir=path, clickhouse_dsn=f"chdb://{path / 'ch'}"))
    ledger.migrate(c)
    events = [PricedEvent(event_id=new_id(), ts=NOW - timedelta(minutes=i), tenant_id=("acme", "globex")[i % 2], team="t",
                          agent_id="a", session_id=f"s{i % 3}", kind="llm_call", provider="openai", model="gpt-4o",
                          input_tokens=100, output_tokens=10, cache_read_tokens=20, cost_usd=Decimal("0.01"),
                          input_cost_usd=Decimal("0.006"), cache_read_cost_usd=Decimal("0.001"), output_cost_usd=Decimal("0.003"),
                          list_cost_usd=Decimal("0.01"), status="ok" if i % 4 else "error",
                          cost_source="catalog" if i % 5 else "unpriced", catalog_version="v", priced_at=NOW) for i in range(40)]
    insert_rows(c, "priced_events", [with_offsets(contract_row(e), "priced", 0, i) for i, e in enumerate(events)])
    gpu = []
    for i in range(10):
        base = dict(ts=NOW - timedelta(minutes=i), node="n1", gpu_index=0, gpu_uuid="GPU-1", gpu_name="H100", interval_ms=5000)
        gpu.append(gpu_sample_row(GpuSample(sample_id=new_id(), level="gpu", utilization_pct=50, **base), Decimal(5), Decimal("0.003"), "v"))
        gpu.append(gpu_sample_row(GpuSample(sample_id=new_id(), level="process", pid=7, attributed=i % 2 == 0,
                                            tenant_id="acme" if i % 2 == 0 else "", session_id="s0" if i % 2 == 0 else "", **base),
                                  Decimal(5), Decimal("0.003"), "v"))
    insert_rows(c, "gpu_samples", [with_offsets(r, "gpu", 0, i) for i, r in enumerate(gpu)])
    decision = ThrottleDecision(decision_id=new_id(), tenant_id="acme", scope="tenant", scope_id="acme", action="throttle",
                                reason="pace", issued_at=NOW, expires_at=NOW + timedelta(minutes=1))
    insert_rows(c, "throttle_decisions", [with_offsets(contract_row(decision), "control", 0, 0)])
    anomaly = Anomaly(anomaly_id=new_id(), ts=NOW, kind="spend_spike", severity="warning", tenant_id="acme", scope="tenant",
                      scope_id="acme", window_start=NOW - timedelta(seconds=10), window_end=NOW, message="spike")
    insert_rows(c, "anomalies", [with_offsets(contract_row(anomaly), "anomalies", 0, 0)])
    policy = BudgetPolicy(policy_id="p1", tenant_id="acme", scope="tenant", scope_id="acme", amount=Decimal(10))
    insert_rows(c, "budget_policies", [with_offsets(contract_row(policy), "budgets", 0, 0)])
    dead = DeadLetter(dlq_id=new_id(), ts=NOW, stage="validate", source_topic="usage", partition=0, offset=1, reason="bad",
                      error_type="InvalidEvent", payload_b64="")
    insert_rows(c, "dead_letters", [with_offsets(contract_row(dead), "dlq", 0, 0)])
    strategies.store(c, *strategy_run(), run_id="r1", ts=NOW)
    yield c
    c.close()
    gc.collect()


def test_dashboards_are_wired_to_the_provisioned_data_source():
    assert DASHBOARDS, "no dashboards under deploy/grafana/dashboards"
    provisioned = (GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml").read_text()
    uid = re.search(r"uid:\s*(\S+)", provisioned)[1]
    assert "type: grafana-clickhouse-datasource" in provisioned
    assert "/var/lib/grafana/dashboards/meterline" in (GRAFANA / "provisioning" / "dashboards" / "meterline.yaml").read_text()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)) >= 8
        for p in panels(board):
            assert p["datasource"]["uid"] == uid and p["targets"] and all(t["rawSql"].strip() for t in p["targets"])


@pytest.mark.parametrize("tenant", ["", "acme", "x' OR 1=1 --"])
def test_every_panel_query_runs_on_the_real_schema(client, tenant):
    ran = 0
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for var in board.get("templating", {}).get("list", []):
            client.query(expand(var["query"], tenant))
        for p in panels(board):
            for target in p["targets"]:
                result = client.query(expand(target["rawSql"], tenant))
                if tenant in ("", "acme"):
                    assert result.result_rows, f"panel {p['title']!r} returned no rows for tenant {tenant!r}"
                ran += 1
    assert ran >= 8


def test_panel_numbers_match_the_ledger(client):
    board = json.loads(DASHBOARDS[0].read_text())
    by_title = {p["title"]: p["targets"][0]["rawSql"] for p in panels(board)}
    teams = client.query(expand(by_title["Spend by team"])).result_rows
    assert teams == [("t", Decimal("0.4"))]
    (unpriced,) = client.query(expand(by_title["Unpriced events (kept at 0, flagged)"])).result_rows
    assert unpriced[0] == 8
    table = client.query(expand(by_title["Compute strategies, latest `simulate strategies --store` run"])).result_rows
    rows = strategy_run()[0]
    assert [(r[0], r[1]) for r in table] == [(r["strategy"], r["cost_usd"]) for r in rows]  # exact, in the seed's order
