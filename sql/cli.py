"""`meterline migrate`, `meterline sql` and `meterline sink`."""
from __future__ import annotations

import re
from enum import Enum
from typing import Annotated

import typer

class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate_command)
    app.command("sql")(sql_command)
    app.command("sink")(sink_command)
    app.command("rebuild-rollups")(rebuild_rollups_command)
    from .dlq_cli import dlq_app

    app.add_typer(dlq_app, name="dlq")


def _connect():
    from meterline.console import fail
    from meterline.errors import UserError
    from meterline.settings import get_settings

    from .ledger import connect

    settings = get_settings()
    try:
        return connect(settings)
    except UserError:  # already one line that says what to do (meterline.cli.main prints it)
        raise
    except Exception as err:  # noqa: BLE001 - one clear line instead of a traceback
        fail(f"cannot open the ledger at {settings.dsn}: {err}. If `meterline up` or `meterline sink` holds the "
             "embedded store, query through it or stop it; for a server check METERLINE_CLICKHOUSE_DSN.")


def migrate_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")] = False,
    cluster: Annotated[str | None, typer.Option(help="Run DDL ON CLUSTER with Replicated + Distributed tables "
                                                     "(default: METERLINE_CLICKHOUSE_CLUSTER).")] = None,
) -> None:
    """Create or upgrade the ClickHouse ledger (safe to re-run: each migration applies once).

    Applies sql/migrations/NNNN_*.sql in order to the store in METERLINE_CLICKHOUSE_DSN
    (default: embedded chDB under METERLINE_DATA_DIR) and records them in schema_migrations.
    """
    from meterline.console import console, emit_json, table
    from meterline.settings import get_settings

    from .ledger import load_migrations, migrate

    client = _connect()
    applied = set(migrate(client, cluster=cluster or get_settings().clickhouse_cluster))
    rows = [{"migration": m.name, "state": "applied" if m.name in applied else "skipped"} for m in load_migrations()]
    if as_json:
        emit_json({"applied": sorted(applied), "skipped": [r["migration"] for r in rows if r["state"] == "skipped"]})
    else:
        console.print(table(rows, title=f"ledger at {get_settings().dsn}"))


def rebuild_rollups_command(
    month: Annotated[str, typer.Argument(help="The month to rebuild, e.g. 2026-11.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")] = False,
) -> None:
    """Recompute a month of the hourly rollups (usage_hourly, gpu_hourly) from the raw tables.

    The rollups are filled by materialized views when the sink inserts; a crash between a raw insert
    and its views, or a correction in a raw table, can leave them off. The raw tables are the record:
    this rebuilds the month from them. Stop the sink first (`meterline up` too), or pick a month
    nothing is written to any more. Single node only: on a cluster, run it against each shard.
    """
    from meterline.console import console, emit_json, fail, table
    from meterline.settings import get_settings

    from .ledger import rebuild_rollups

    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
        fail(f"{month!r} is not a month; write it as YYYY-MM, e.g. 2026-11")
    if get_settings().clickhouse_cluster:
        fail("rebuild-rollups runs on one node: point METERLINE_CLICKHOUSE_DSN at each shard and unset the cluster")
    written = rebuild_rollups(_connect(), int(month.replace("-", "")))
    if as_json:
        emit_json({"month": month, "rows": written})
    else:
        console.print(table([{"rollup": k, "rows": v} for k, v in written.items()], title=f"rollups of {month} rebuilt"))


def sql_command(
    query: Annotated[str, typer.Argument(help='A read-only query, e.g. "SELECT tenant_id, sum(cost_usd) FROM usage_hourly GROUP BY 1".')],
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="table for people, json or csv for tools.")] = OutputFormat.table,
) -> None:
    """Run one SELECT against the ledger, in a sandbox (sql/sandbox.py: its tables only, no files, limits).

    Tables: priced_events, gpu_samples, compute_samples, spend_updates, anomalies, throttle_decisions,
    budget_policies, dead_letters; hourly rollups usage_hourly and gpu_hourly
    (always read rollups with sum() ... GROUP BY). Money columns are exact Decimals.
    On a cluster read <table>_all: a plain name is one shard's local table.
    """
    from meterline.console import console, emit_json, fail, table

    from meterline.settings import get_settings

    from .sandbox import Refused, failure, limits, vet

    client = _connect()
    try:
        result = client.query(vet(client, query), settings=limits(get_settings()))
    except Refused as err:
        fail(f"{err}; `meterline sql` only reads the ledger")
    except Exception as err:  # noqa: BLE001
        fail(f"query failed: {failure(err)}")
    rows = [dict(zip(result.column_names, r)) for r in result.result_rows]
    if fmt is OutputFormat.json:
        emit_json(rows)
    elif fmt is OutputFormat.csv:
        _write_csv(result.column_names, result.result_rows)
    else:
        console.print(table(rows) if rows else "(no rows)")


def _write_csv(columns, rows) -> None:
    import csv
    import sys
    from decimal import Decimal

    from meterline.console import _default

    def cell(v):
        if isinstance(v, Decimal):
            return format(v, "f")  # 0.000000000000000001, never 1E-18
        return v if isinstance(v, (str, int)) or v is None else _default(v)

    writer = csv.writer(sys.stdout)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(cell(v) for v in row)


def sink_command(
    batch_rows: Annotated[int, typer.Option(help="Flush when this many rows are buffered.")] = 50_000,
    batch_seconds: Annotated[float, typer.Option(help="Flush at least this often (seconds).")] = 1.0,
    group: Annotated[str | None, typer.Option(help="Kafka consumer group (default: the topic prefix followed by -sink, as in `meterline up`). "
                                                   "Sinks in one group split the ledger topics' partitions and each resumes its "
                                                   "share from the ledger: run several against a ClickHouse server to scale out.")] = None,
    instance_id: Annotated[str | None, typer.Option(help="Static group membership id: a restarted sink takes its "
                                                         "partitions back at once instead of after the session timeout.")] = None,
    until_idle: Annotated[float | None, typer.Option(
        help="Exit once every assigned partition is read to its end and nothing came for this many seconds "
             "(backfills, tests).")] = None,
) -> None:
    """Write every priced event, GPU sample, spend snapshot, anomaly, decision, budget and
    dead letter from Kafka into the ClickHouse ledger, exactly once.

    Each row stores its Kafka (topic, partition, offset); on start the sink resumes after
    the highest offset in the ledger, and commits to Kafka only after the insert, so a
    crash anywhere neither loses nor doubles a row. Ctrl-C flushes and stops.
    """
    from meterline.errors import require_kafka
    from meterline.settings import get_settings

    from .sink import run_sink

    require_kafka(get_settings())
    overrides = {"group.instance.id": instance_id, "session.timeout.ms": 10_000} if instance_id else None
    settings = get_settings()
    run_sink(settings, batch_rows=batch_rows, batch_seconds=batch_seconds, group=group or settings.group("sink"),
             consumer_overrides=overrides, idle_exit_s=until_idle)
