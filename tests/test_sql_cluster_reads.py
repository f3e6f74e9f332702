"""Every report query reads the whole cluster: rendered for one, it names only `_all` tables.

On a cluster a plain table name is one shard's local table, so a report that reads it
silently misses the other shards' rows. These tests render sql/queries/*.sql the way the
ledger does (`ledger.render_reads`) and read the table names after FROM / JOIN. That the
rendered SQL also runs and gives the single-node answers is checked on real chDB in
tests/test_app_report.py (stand-in `_all` tables: no ClickHouse cluster runs here).
"""
from __future__ import annotations

import re

import pytest

from meterline.app.report import load_query, query_dir
from meterline.sql import ledger

QUERIES = sorted(p.stem for p in query_dir().glob("*.sql"))
_SOURCE = re.compile(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w.]*)", re.I)
_COMMENT = re.compile(r"--[^\n]*")


def tables_read(sql: str) -> list[str]:
    """Table identifiers after FROM / JOIN (subqueries, which start with `(`, are not tables)."""
    return _SOURCE.findall(_COMMENT.sub(" ", sql))


def cluster_tables(cluster: str) -> set[str]:
    """The `_all` tables that the migrations, rendered for a cluster, create."""
    text = "\n".join(ledger.render_for_cluster(m.sql, cluster) for m in ledger.load_migrations())
    return set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+_all) ON CLUSTER", text))


def local_tables() -> set[str]:
    text = "\n".join(m.sql for m in ledger.load_migrations())
    return set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", text))


def test_there_are_report_queries_to_check():
    assert {"chargeback", "top_sessions", "cost_per_action", "gpu_utilisation", "ledger_totals", "focus_usage",
            "focus_gpu", "scope_spend", "budget_policies", "primary_model"} <= set(QUERIES)


@pytest.mark.parametrize("name", QUERIES)
def test_on_a_cluster_every_query_reads_only_distributed_tables(name):
    sql = ledger.render_reads(load_query(name), "prod")
    read = tables_read(sql)
    assert read, f"{name}: no table found after FROM/JOIN"
    readable = cluster_tables("prod") | ledger.ledger_views()  # a view reads `_all` tables itself (below)
    assert set(read) <= readable, f"{name} reads {set(read) - readable} (one shard only)"


def test_on_a_cluster_the_ledger_views_read_only_distributed_tables():
    views = [s for m in ledger.load_migrations() for s in m.statements("prod") if s.startswith("CREATE VIEW")]
    assert len(views) == len(ledger.ledger_views()) >= 1
    for view in views:
        assert "ON CLUSTER 'prod'" in view.split(" AS", 1)[0]
        read = tables_read(view)
        assert read and set(read) <= cluster_tables("prod"), view


@pytest.mark.parametrize("name", QUERIES)
def test_on_one_node_every_query_reads_the_plain_tables(name):
    read = tables_read(ledger.render_reads(load_query(name), None))
    assert read and set(read) <= local_tables() | ledger.ledger_views() and not any(t.endswith("_all") for t in read), (name, read)


def test_every_table_a_report_reads_has_a_distributed_table_on_a_cluster():
    """Rollups included: a reader may use any ledger table, so each one must have its `_all`."""
    assert {f"{t}_all" for t in local_tables()} == cluster_tables("prod")
    assert ledger.distributed_tables() == local_tables()
    assert {"usage_hourly_all", "gpu_hourly_all"} <= cluster_tables("prod")


def test_read_table_names_the_distributed_table_only_on_a_cluster():
    assert ledger.read_table("usage_hourly", "prod") == "usage_hourly_all"
    assert ledger.read_table("usage_hourly", None) == "usage_hourly"
    sql = "SELECT {t:String} FROM priced_events p JOIN gpu_hourly g USING k WHERE x IN (SELECT y FROM priced_events_all)"
    assert ledger.render_reads(sql, "c") == sql.replace("priced_events p", "priced_events_all p").replace("gpu_hourly", "gpu_hourly_all")
    assert ledger.render_reads(sql, None) == sql
    user = "select count() from anomalies, system.tables from db.priced_events"  # ledger tables only, any case
    assert ledger.render_reads(user, "c") == user.replace("from anomalies", "from anomalies_all")


def test_the_parser_finds_plain_and_unrendered_names():
    """The checks above are only as good as tables_read: it must see what a query reads."""
    assert tables_read("SELECT * FROM priced_events p LEFT JOIN gpu_samples g ON 1 -- from x\nWHERE a IN (SELECT b FROM c)") \
        == ["priced_events", "gpu_samples", "c"]
    assert tables_read("SELECT * FROM (SELECT 1 FROM t_all)") == ["t_all"]
