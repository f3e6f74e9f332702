"""Read access to the ledger, wherever it lives.

chDB allows one process per data directory, and while `meterline up` runs that
process is `up` (its sink writes there). So readers ask: does a live `up` hold this
store? If so they go through its HTTP API; otherwise they open the store directly.
`up` announces itself in <data_dir>/up.json (pid + API URL) and removes it on exit.

Results keep exact types across both paths: Decimal money and datetimes travel as
strings in JSON and are restored from the ClickHouse column types.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterline.settings import Settings
from meterline.sql.ledger import render_reads

RUNFILE = "up.json"
READ_ONLY = {"readonly": 2}  # 2: reads only, but queries may tune settings (never `readonly` itself)


@dataclass
class Result:
    """A query result: column names, ClickHouse type names, rows of Python values."""

    columns: list[str]
    types: list[str]
    rows: list[tuple] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)  # what a reader must know, e.g. {"gpu_idle": "owner"}

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]

    def to_json(self) -> dict[str, Any]:
        return {"columns": self.columns, "types": self.types, "rows": [[_jsonable(v) for v in r] for r in self.rows],
                "meta": self.meta}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Result:
        types = doc["types"]
        rows = [tuple(_restore(v, t) for v, t in zip(row, types)) for row in doc["rows"]]
        return cls(doc["columns"], types, rows, dict(doc.get("meta") or {}))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: money never becomes a float
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _param_text(value: Any) -> Any:
    """A query parameter as ClickHouse parses it server-side ({since:DateTime64(3, 'UTC')} wants no 'T')."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return _jsonable(value)


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _restore(value: Any, ch_type: str) -> Any:
    if value is None:
        return None
    base = ch_type.removeprefix("Nullable(").removeprefix("LowCardinality(")
    if base.startswith("Decimal"):
        return Decimal(value)
    if base.startswith("DateTime"):
        return datetime.fromisoformat(value)
    if base.startswith("Date"):
        return date.fromisoformat(value)
    return value


class DirectLedger:
    """Opens the store in this process (chDB path or a ClickHouse server).

    On a cluster every query reads the `_all` Distributed tables (`ledger.render_reads`):
    rendered here, by the ledger that runs it, so reports, FOCUS, `up`'s allocator queries
    and its API (a RemoteLedger's queries too) read every shard, not one shard's local table.
    """

    mode = "direct"

    def __init__(self, settings: Settings, client: Any | None = None):
        if client is None:
            from meterline.sql.ledger import connect

            client = connect(settings)
        self.client = client
        self.cluster = settings.clickhouse_cluster
        self.settings = settings

    def user_query(self, sql: str, parameters: dict[str, Any] | None = None, tag: str | None = None) -> Result:
        """SQL a user wrote: vetted by the sandbox (sql/sandbox.py), run as ClickHouse formatted it, under limits.
        `tag` marks the running query so that `cancel(tag)` can kill it."""
        from meterline.sql import sandbox

        canonical = sandbox.vet(self.client, sql, parameters)
        if tag:
            canonical += f" /* {_marker(tag)} */"
        return self.query(canonical, parameters, settings=sandbox.limits(self.settings))

    def cancel(self, tag: str) -> None:
        """Kill the query that `user_query(..., tag=tag)` runs (from another client than the one running it).
        A marker in the text, not query_id: the embedded engine does not take a client's query_id."""
        self.client.command(f"KILL QUERY WHERE position(query, '{_marker(tag)}') > 0 AND query NOT LIKE 'KILL%' ASYNC")

    def query(self, sql: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> Result:
        sql = render_reads(sql, self.cluster)
        res = self.client.query(sql, parameters=parameters or {}, settings=settings or READ_ONLY)
        if not res.column_names:  # an empty result carries no header on chDB; ask for the shape
            return Result(*self._shape(sql, parameters), [])
        types = [t.name for t in res.column_types]
        utc = [i for i, t in enumerate(types) if "DateTime" in t]
        rows = [tuple(r) for r in res.result_rows]
        if utc:  # clickhouse-connect hands back naive datetimes; the ledger's are all UTC
            rows = [tuple(_aware(v) if i in utc else v for i, v in enumerate(r)) for r in rows]
        return Result(list(res.column_names), types, rows)

    def _shape(self, sql: str, parameters: dict[str, Any] | None) -> tuple[list[str], list[str]]:
        try:
            rows = self.client.query(f"DESCRIBE TABLE ({sql.strip().rstrip(';')})", parameters=parameters or {},
                                     settings=READ_ONLY).result_rows
        except Exception:  # noqa: BLE001 - statements without a row shape (SHOW …): no columns
            return [], []
        return [r[0] for r in rows], [r[1] for r in rows]

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close:
            close()


def _marker(tag: str) -> str:
    if not tag.isalnum():
        raise ValueError(f"query tag {tag!r} must be letters and digits")
    return f"meterline-query:{tag}"


class RemoteLedger:
    """Talks to the `up` process that holds the store."""

    mode = "remote"

    def __init__(self, url: str, timeout: float = 60.0, token: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def user_query(self, sql: str, parameters: dict[str, Any] | None = None) -> Result:
        """Vetted and limited by the `up` that runs it."""
        return self.query(sql, parameters)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Result:
        body = {"sql": sql, "parameters": {k: _param_text(v) for k, v in (parameters or {}).items()}}
        return Result.from_json(self._ok(self.http.post("/api/sql", json=body)))

    def report(self, name: str, params: dict[str, Any]) -> Result:
        query = {k: _jsonable(v) for k, v in params.items() if v is not None}
        return Result.from_json(self._ok(self.http.get(f"/api/report/{name}", params=query)))

    def get(self, path: str, **params: Any) -> Any:
        return self._ok(self.http.get(path, params=params))

    @staticmethod
    def _ok(resp: Any) -> Any:
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text
            raise LedgerError(message)
        return resp.json()

    def close(self) -> None:
        self.http.close()


class LedgerError(RuntimeError):
    """A query the ledger refused (bad SQL, not read-only, ...); the message says why."""


# ---- the runfile that `up` writes -----------------------------------------------------------


def runfile(settings: Settings) -> Path:
    return settings.data_dir / RUNFILE


def write_runfile(settings: Settings, url: str, token: str | None = None) -> Path:
    """`token` lets local readers (the same user: the file is 0600) through the API while tokens are on."""
    from meterline.files import write_private

    path = runfile(settings)
    write_private(path, json.dumps({"pid": os.getpid(), "url": url, "dsn": settings.dsn, "token": token}))
    return path


def remove_runfile(settings: Settings) -> None:
    path = runfile(settings)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def running_up(settings: Settings) -> str | None:
    """The API URL of a live `up` on this data dir, or None."""
    try:
        info = json.loads(runfile(settings).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info.get("url")


def open_ledger(settings: Settings) -> DirectLedger | RemoteLedger:
    """The ledger for a reader: through `up` when it holds an embedded store, else direct."""
    url = running_up(settings)
    if url and settings.dsn.startswith("chdb:") and _answers(url):
        return RemoteLedger(url, token=_up_token(settings))
    return DirectLedger(settings)


def _up_token(settings: Settings) -> str | None:
    """The reader token a running `up` left in its runfile for local commands."""
    try:
        return json.loads(runfile(settings).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


def _answers(url: str) -> bool:
    """A stale up.json (up killed hard, its pid reused) must not send readers to a dead API."""
    import httpx

    try:
        httpx.get(f"{url}/health", timeout=5.0)
    except httpx.HTTPError:
        return False
    return True
