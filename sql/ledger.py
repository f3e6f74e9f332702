"""The ClickHouse ledger: connection, numbered migrations, and the table catalog.

`connect(settings)` opens the store named by `settings.dsn` (embedded chDB by default,
`http(s)://` for a server). `migrate(client)` applies `sql/migrations/NNNN_*.sql` once
each, in order, recording them in `schema_migrations`; with `cluster=` the same files
are rendered for a ClickHouse cluster (see `render_for_cluster` and sql/README.md).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meterline.settings import Settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
MIGRATIONS_TABLE = "schema_migrations"
MONEY_SCALE = 18  # Decimal(38, 18) in every money column


@dataclass(frozen=True)
class LedgerTable:
    """A raw table fed by one Kafka topic."""

    name: str
    topic: str  # catalog name, e.g. "priced"
    contract: str  # key in schemas.events.CONTRACTS
    id_column: str | None  # unique id the sink de-duplicates on (tables that feed rollups; anomalies: `dlq replay`)
    ts_column: str


TABLES: tuple[LedgerTable, ...] = (
    LedgerTable("priced_events", "priced", "priced_event", "event_id", "ts"),
    LedgerTable("gpu_samples", "gpu", "gpu_sample", "sample_id", "ts"),
    LedgerTable("compute_samples", "compute", "compute_sample", "sample_id", "ts"),
    LedgerTable("spend_updates", "spend", "spend_update", None, "ts"),
    LedgerTable("anomalies", "anomalies", "anomaly", "anomaly_id", "ts"),
    LedgerTable("throttle_decisions", "control", "throttle_decision", None, "issued_at"),
    LedgerTable("budget_policies", "budgets", "budget_policy", None, "created_at"),
    LedgerTable("gpu_allocations", "gpu-allocations", "gpu_allocation", None, "created_at"),
    LedgerTable("scale_recommendations", "scale", "scale_recommendation", None, "ts"),
    LedgerTable("dead_letters", "dlq", "dead_letter", None, "ts"),
)
ID_TABLES = {"priced_events": "priced_event_ids", "gpu_samples": "gpu_sample_ids", "compute_samples": "compute_sample_ids",
             "anomalies": "anomaly_ids"}  # anomalies: `dlq replay` may send one the ledger holds (0021)
KAFKA_COLUMNS = ("_topic", "_partition", "_offset", "_batch_start")


def table_for_topic(topic: str) -> LedgerTable:
    return next(t for t in TABLES if t.topic == topic)


# ---------------------------------------------------------------- connection


def connect(settings: Settings, database: str | None = None, **client_settings: Any):
    """A clickhouse-connect client for settings.dsn (chdb:///path or http(s)://...).

    `database` is created when missing and becomes the client's default database
    (tests use one database per test on a shared chDB path).
    """
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import OperationalError

    from meterline.errors import StoreUnavailable, writable_dir

    dsn = settings.dsn
    scheme = dsn.partition("://")[0].lower()
    if scheme == "chdb":
        location = urlsplit(dsn).path if dsn.lower().startswith("chdb:///") else ""
        if location and location not in ("memory", ":memory:"):  # chDB would fail with pages of C++ frames
            writable_dir(Path(location), "METERLINE_CLICKHOUSE_DSN" if settings.clickhouse_dsn else "METERLINE_DATA_DIR")
        client = clickhouse_connect.get_client(dsn=dsn, settings=client_settings or None)
    elif scheme in ("http", "https"):
        _quiet_driver_echo()
        try:  # the scheme, not only the port, decides TLS
            client = clickhouse_connect.get_client(dsn=dsn, interface=scheme, settings=client_settings or None)
        except OperationalError as err:
            raise StoreUnavailable(f"ClickHouse does not answer at {_public(dsn)}: {_why(err)}; start it or fix "
                                   "METERLINE_CLICKHOUSE_DSN") from None
    else:
        raise StoreUnavailable(f"METERLINE_CLICKHOUSE_DSN {dsn.split('@')[-1]!r} has no known scheme; "
                               "use chdb:///path, http:// or https://")
    if database:
        client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
        client.database = database
    return client


def _drop_echo(record: logging.LogRecord) -> bool:
    return record.getMessage() != "Unexpected Http Driver Exception"


def _quiet_driver_echo() -> None:
    """clickhouse-connect logs this warning and then raises the same failure as an OperationalError;
    the exception is what callers report, so the line before it is dropped."""
    driver_log = logging.getLogger("clickhouse_connect.driver._backend.http_sync")
    if _drop_echo not in driver_log.filters:
        driver_log.addFilter(_drop_echo)


def _public(dsn: str) -> str:
    """A server DSN without its user and password."""
    parts = urlsplit(dsn)
    return f"{parts.scheme}://{parts.hostname or 'localhost'}" + (f":{parts.port}" if parts.port else "") + parts.path


def _why(err: Exception) -> str:
    """What the HTTP layer said, without the driver's retry story: 'Connection refused', 'Name or service not known'."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip()
    return (text.strip().splitlines() or [type(err).__name__])[0][:200]


def quote_identifier(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"{name!r} is not a plain identifier (letters, digits, underscore)")
    return f"`{name}`"


# ---------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    version: str  # "0001"
    name: str  # "0001_priced_events"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self, cluster: str | None = None) -> list[str]:
        text = render_for_cluster(self.sql, cluster) if cluster else self.sql
        return split_statements(text)


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    files = sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return [Migration(f.name[:4], f.stem, f.read_text()) for f in files]


def split_statements(sql: str) -> list[str]:
    """Statements end with `;` at the end of a line; `--` comment lines are dropped."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def _migrations_ddl(cluster: str | None) -> str:
    on_cluster, engine = "", "ReplacingMergeTree(applied_at)"
    if cluster:
        on_cluster = f" ON CLUSTER '{cluster}'"
        engine = f"ReplicatedReplacingMergeTree('{REPLICA_PATH}{MIGRATIONS_TABLE}', '{{replica}}', applied_at)"
    return (
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}{on_cluster} "
        "(version String, name String, checksum String, applied_at DateTime64(3, 'UTC')) "
        f"ENGINE = {engine} ORDER BY version"
    )


def applied_migrations(client) -> dict[str, str]:
    rows = client.query(f"SELECT version, argMax(name, applied_at) FROM {MIGRATIONS_TABLE} GROUP BY version").result_rows
    return dict(rows)


def migrate(client, cluster: str | None = None) -> list[str]:
    """Apply every migration not yet recorded, in order. Returns the names applied now.

    Each statement is idempotent (IF NOT EXISTS), so a run interrupted mid-file is safe
    to repeat; a file is recorded only after all of its statements succeeded.
    """
    client.command(_migrations_ddl(cluster))
    done = applied_migrations(client)
    applied: list[str] = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        for statement in migration.statements(cluster):
            client.command(statement)
        client.insert(
            MIGRATIONS_TABLE,
            [[migration.version, migration.name, migration.checksum, datetime.now(timezone.utc)]],
            column_names=["version", "name", "checksum", "applied_at"],
        )
        applied.append(migration.name)
    return applied


ROLLUPS = {"usage_hourly": "usage_hourly_mv", "gpu_hourly": "gpu_hourly_mv"}  # rollup table -> the view that fills it


def rebuild_rollups(client, month: int) -> dict[str, int]:
    """Recompute one month (YYYYMM) of the hourly rollups from the raw tables, with the views' own SELECT.

    The views fire on insert and are not atomic with it: a crash between a raw insert and its views,
    or a correction made in a raw table, leaves a rollup off. Raw tables are the record; this puts the
    rollups back in line with them. Returns the rows written per rollup. Run it with the sink stopped
    (or for a month nothing is written to any more): rows inserted meanwhile could count twice.
    """
    written = {}
    for rollup, view in ROLLUPS.items():
        select = client.query("SELECT as_select FROM system.tables WHERE database = currentDatabase() AND name = {v:String}",
                              parameters={"v": view}).result_rows[0][0]
        client.command(f"ALTER TABLE {rollup} DROP PARTITION {int(month)}")
        client.command(f"INSERT INTO {rollup} SELECT * FROM ({select}) WHERE toYYYYMM(hour) = {int(month)}")
        written[rollup] = client.query(f"SELECT count() FROM {rollup} WHERE toYYYYMM(hour) = {int(month)}").result_rows[0][0]
    return written


def migration_status(client) -> list[dict[str, str]]:
    """Every migration file with 'applied' or 'pending' (for `meterline migrate --json`)."""
    done = applied_migrations(client)
    return [{"migration": m.name, "state": "applied" if m.version in done else "pending"} for m in load_migrations()]


# ---------------------------------------------------------------- cluster rendering

REPLICA_PATH = "/clickhouse/tables/{shard}/{database}/"
_CREATE = re.compile(r"CREATE (TABLE|MATERIALIZED VIEW|VIEW) IF NOT EXISTS (\w+)")
_ALTER = re.compile(r"ALTER TABLE (\w+)")
_ENGINE = re.compile(r"ENGINE = (\w*)MergeTree(?:\(([^)]*)\))?")
_DISTRIBUTED = re.compile(r"^-- @distributed (.+)$", re.M)


def render_for_cluster(sql: str, cluster: str) -> str:
    """The single-node migration text, rewritten for a cluster:

    * `CREATE TABLE|MATERIALIZED VIEW|VIEW IF NOT EXISTS x` gets `ON CLUSTER '<cluster>'`;
    * a plain (parameterized) VIEW reads the Distributed `_all` tables, so it sees every shard;
    * `ENGINE = <X>MergeTree(args)` becomes `Replicated<X>MergeTree('<path>/x', '{replica}', args)`
      (`{shard}`, `{replica}` are the servers' macros);
    * a table preceded by a `-- @distributed <sharding key>` comment also gets `x_all`, a
      Distributed table over the local ones. Writers and readers use `x_all`;
    * `ALTER TABLE x` gets `ON CLUSTER`, and is repeated for `x_all` after the same comment.
    """
    quoted = cluster.replace("'", "")

    def per_statement(statement: str) -> str:
        marker = _DISTRIBUTED.search(statement)
        create = _CREATE.search(statement)
        if not create:
            alter = _ALTER.search(statement)
            if not alter:
                return statement
            out = _ALTER.sub(lambda m: f"{m.group(0)} ON CLUSTER '{quoted}'", statement, count=1)
            if marker:
                out += ";\n" + _ALTER.sub(lambda m: f"ALTER TABLE {m.group(1)}_all ON CLUSTER '{quoted}'",
                                           statement[alter.start():], count=1)
            return out
        name = create.group(2)
        out = _CREATE.sub(lambda m: f"{m.group(0)} ON CLUSTER '{quoted}'", statement, count=1)
        if create.group(1) == "VIEW":
            return render_reads(out, cluster)
        out = _ENGINE.sub(lambda m: _replicated(m, name), out, count=1)
        if marker and create.group(1) == "TABLE":
            out += (
                f";\nCREATE TABLE IF NOT EXISTS {name}_all ON CLUSTER '{quoted}' AS {name} "
                f"ENGINE = Distributed('{quoted}', currentDatabase(), '{name}', {marker.group(1).strip()})"
            )
        return out

    parts = re.split(r"(;\s*(?:\n|$))", sql)
    return "".join(per_statement(p) if i % 2 == 0 else p for i, p in enumerate(parts))


def _replicated(match: re.Match[str], table: str) -> str:
    variant, args = match.group(1), (match.group(2) or "").strip()
    extra = f", {args}" if args else ""
    return f"ENGINE = Replicated{variant}MergeTree('{REPLICA_PATH}{table}', '{{replica}}'{extra})"


def write_table(name: str, cluster: str | None) -> str:
    """The table a writer or reader addresses: the Distributed `_all` table on a cluster."""
    return f"{name}_all" if cluster else name


def read_table(name: str, cluster: str | None) -> str:
    """The table a reader addresses: the Distributed `_all` table on a cluster (raw and rollup
    tables alike get one, see render_for_cluster), the table itself on one node."""
    return write_table(name, cluster)


@lru_cache(maxsize=1)
def distributed_tables() -> frozenset[str]:
    """The tables that get an `_all` on a cluster: those marked `-- @distributed` in the migrations."""
    text = "\n".join(m.sql for m in load_migrations())
    return frozenset(re.findall(r"^-- @distributed .+\nCREATE TABLE IF NOT EXISTS (\w+)", text, re.M))


@lru_cache(maxsize=1)
def ledger_views() -> frozenset[str]:
    """The ledger's plain (parameterized) views, e.g. attributed_spend: readers call them like tables."""
    text = "\n".join(m.sql for m in load_migrations())
    return frozenset(re.findall(r"^CREATE VIEW IF NOT EXISTS (\w+)", text, re.M))


def render_reads(sql: str, cluster: str | None) -> str:
    """A query with each ledger table after FROM / JOIN addressed through read_table: on a cluster
    a plain name reads one shard's local table. The SQL files stay plain, runnable SQL."""
    if not cluster:
        return sql
    names = "|".join(sorted(distributed_tables()))
    return re.sub(rf"\b((?i:FROM|JOIN)\s+)({names})\b", lambda m: m.group(1) + read_table(m.group(2), cluster), sql)
