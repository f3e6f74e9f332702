"""Reconciliation source: period-to-date spend of a budget scope, from the ClickHouse ledger.

Uses the sql component's `scope_spend.sql` (usage cost + attributed GPU cost) through
`meterline.sql.ledger.connect(settings)`. One client per thread (chDB serialises calls
per client); the allocator calls this from its own thread only. Counts up to
`ledger_lag` ago: the engine adds the stream's windows after that (errs toward throttling).
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from importlib import resources
from typing import Any

from .engine import LedgerSpend
from meterline.schemas.scopes import SEP

log = logging.getLogger("meterline.allocator")
DEPTH = {"tenant": 0, "team": 1, "project": 2, "agent": 3, "session": 4}


def scope_params(scope: str, scope_id: str) -> dict[str, Any]:
    parts = (scope_id.split(SEP) + [""] * 5)[:5]
    return {"tenant": parts[0], "team": parts[1], "project": parts[2], "agent": parts[3], "session": parts[4], "depth": DEPTH[scope]}


def clickhouse_ledger_spend(settings, lag: timedelta = timedelta(minutes=2), client: Any = None) -> LedgerSpend:
    from meterline.sql.ledger import connect, render_reads

    sql = render_reads(resources.files("meterline.sql").joinpath("queries/scope_spend.sql").read_text(),
                       settings.clickhouse_cluster)  # on a cluster: every shard, through the _all tables
    holder = {"client": client}

    def ledger_spend(scope: str, scope_id: str, since: datetime) -> Decimal:
        until = datetime.now(timezone.utc) - lag
        if until <= since:
            return Decimal(0)
        holder["client"] = holder["client"] or connect(settings)
        params = {**scope_params(scope, scope_id), "since": since, "until": until, "bucket_seconds": 366 * 86400}
        rows = holder["client"].query(sql, parameters=params).result_rows
        return sum((Decimal(str(r[1])) for r in rows), Decimal(0))

    return ledger_spend


def ledger_spend_or_none(settings) -> LedgerSpend | None:
    """The ledger query when the sql component is installed, else None (no reconciliation)."""
    try:
        return clickhouse_ledger_spend(settings)
    except Exception as err:  # noqa: BLE001
        log.warning("ledger reconciliation off: %s", err)
        return None
