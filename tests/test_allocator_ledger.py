"""Reconciliation reads the real ledger (chDB, in a subprocess: one engine per process)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import sys
    from datetime import datetime, timedelta, timezone
    from decimal import Decimal
    from meterline.allocator.ledger import clickhouse_ledger_spend
    from meterline.schemas.events import PricedEvent, new_id
    from meterline.settings import Settings
    from meterline.sql.ledger import connect, migrate
    from meterline.sql.rows import insert_rows, priced_event_row, with_offsets

    settings = Settings(data_dir=sys.argv[1], clickhouse_dsn="chdb://" + sys.argv[1] + "/ch")
    client = connect(settings)
    migrate(client)
    now = datetime.now(timezone.utc)
    def event(team, session, cost, ago):
        return PricedEvent(event_id=new_id(), ts=now - timedelta(minutes=ago), tenant_id="acme", team=team, project="chat",
                           agent_id="bot", session_id=session, kind="llm_call", model="gpt-4o", cost_usd=Decimal(cost),
                           cost_source="provider", catalog_version="t", priced_at=now)
    events = [event("research", "s1", "1.25", 30), event("research", "s2", "2.5", 20), event("ops", "s3", "4", 10),
              event("research", "s1", "100", 60 * 24 * 40)]            # before the period: not counted
    insert_rows(client, "priced_events", [with_offsets(priced_event_row(e), "t", 0, i) for i, e in enumerate(events)])
    spend = clickhouse_ledger_spend(settings, lag=timedelta(0), client=client)
    since = now - timedelta(days=7)
    print(spend("tenant", "acme", since), spend("team", "acme/research", since),
          spend("session", "acme/research/chat/bot/s1", since), spend("team", "acme/none", since))
''')


def test_ledger_spend_per_scope_from_clickhouse(tmp_path: Path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    tenant, team, session, nothing = out.stdout.split()
    assert (Decimal(tenant), Decimal(team), Decimal(session), Decimal(nothing)) == (Decimal("7.75"), Decimal("3.75"), Decimal("1.25"), 0)



def test_on_a_cluster_reconciliation_reads_every_shard():
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from meterline.allocator.ledger import clickhouse_ledger_spend
    from meterline.settings import Settings

    sent: list[str] = []

    class Recorder:  # the query text is the behaviour under test; no engine needed
        def query(self, sql, parameters):
            sent.append(sql)
            return SimpleNamespace(result_rows=[])

    spend = clickhouse_ledger_spend(Settings(clickhouse_cluster="prod"), lag=timedelta(0), client=Recorder())
    assert spend("tenant", "acme", datetime.now(timezone.utc) - timedelta(days=1)) == 0
    assert "FROM attributed_spend(" in sent[0]  # the ledger's view, which on a cluster reads every shard:
    from meterline.sql import ledger

    view = next(v for m in ledger.load_migrations() for v in m.statements("prod") if "VIEW IF NOT EXISTS attributed_spend" in v)
    assert all(f"FROM {t}_all" in view for t in ("priced_events", "gpu_samples", "compute_samples"))
