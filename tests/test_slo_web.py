"""The page's SLO card (/api/report/slo) in a real browser: exact figures, user text escaped. No Kafka needed."""
from __future__ import annotations

import gc
import html
import re
from decimal import Decimal

import httpx

from meterline.app.api import ApiServer
from meterline.app.live import LiveState
from meterline.app.store import DirectLedger
from meterline.schemas.events import BudgetPolicy, build
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.rows import budget_policy_row, contract_row, insert_rows, with_offsets

from test_app_web import chromium
from test_slo import call, decision_copies, under_decision

EVIL = '<img src=x id=pwned onerror="document.title=1">'


def test_the_slo_card_shows_the_report_exactly_and_escapes_scope_ids(tmp_path):
    policy = build(BudgetPolicy, policy_id="p-bot-ok", tenant_id="acme", scope="agent", scope_id="acme/research/chat/bot-ok",
                   amount=Decimal(1), slo={"p95_latency_ms": 2000, "success_rate_pct": "97"})
    evil = build(BudgetPolicy, policy_id="p-evil", tenant_id="acme", scope="agent", scope_id=f"acme/research/chat/{EVIL}",
                 amount=Decimal(1), slo={"success_rate_pct": "50"})
    events = under_decision() + [call(EVIL, "gpt-4o", i) for i in range(3)]
    gc.collect()
    store = Settings(data_dir=tmp_path / "data", clickhouse_dsn=f"chdb://{tmp_path / 'ch'}")
    client = ledger.connect(store)
    ledger.migrate(client)
    insert_rows(client, "priced_events", [with_offsets(contract_row(e), "priced", 0, i) for i, e in enumerate(events)])
    insert_rows(client, "throttle_decisions", [with_offsets(contract_row(d), "control", 0, i) for i, d in enumerate(decision_copies())])
    insert_rows(client, "budget_policies", [with_offsets(budget_policy_row(p), "budgets", 0, i) for i, p in enumerate((policy, evil))])
    client.close()
    api = ApiServer(lambda: DirectLedger(store, ledger.connect(store)), live=LiveState(), port=0)
    api.start()
    try:
        doc = httpx.get(f"{api.url}/api/report/slo?since=7d", timeout=60).json()
        dom = chromium(["--virtual-time-budget=5000", "--dump-dom", api.url], tmp_path).stdout
    finally:
        api.stop()
        gc.collect()
    rows = {r[0]: dict(zip(doc["columns"], r)) for r in doc["rows"]}
    assert Decimal(rows["p-bot-ok"]["saved_usd"]) > 0
    for policy_id, row in rows.items():
        for metric in ("saved_usd", "success_pct", "p95_latency_ms", "success_met"):
            found = re.search(rf'<td data-metric="{metric}" data-value="([^"]*)" data-policy="{policy_id}">', dom)
            assert found, dom[-3000:]
            assert html.unescape(found.group(1)) == ("" if row[metric] is None else str(row[metric]))
    assert 'id="pwned"' not in dom and "&lt;img src=x id=pwned" in dom
