"""An in-process chDB ledger filled with known rows, and `meterline` run in-process (typer's CliRunner) on it.

chDB allows one data directory per process, so a module's client is closed (and garbage collected)
before any command opens the store, and `gc.collect()` runs before a new one is made.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from meterline.cli import app
from meterline.console import console
from meterline.settings import Settings, get_settings
from meterline.sql import ledger
from meterline.sql.rows import insert_rows


@contextmanager
def filled_ledger(path: Path, tables: dict[str, list[dict[str, Any]]]) -> Iterator[Settings]:
    """A migrated ledger under `path` holding `tables` ({table: rows with their Kafka offsets})."""
    settings = Settings(data_dir=path / "data", clickhouse_dsn=f"chdb://{path / 'ch'}")
    gc.collect()  # another module's leftover clients must not pin a different chDB path
    client = ledger.connect(settings)
    ledger.migrate(client)
    for table, rows in tables.items():
        insert_rows(client, table, rows)
    client.close()
    yield settings
    gc.collect()


@contextmanager
def open_ledger(path: Path) -> Iterator[tuple[Any, Any, Settings]]:
    """A migrated, empty ledger under `path`, kept open: (client, DirectLedger on it, settings)."""
    from meterline.app.store import DirectLedger

    settings = Settings(data_dir=path / "data", clickhouse_dsn=f"chdb://{path / 'ch'}")
    gc.collect()
    client = ledger.connect(settings)
    ledger.migrate(client)
    yield client, DirectLedger(settings, client), settings
    client.close()
    gc.collect()


@contextmanager
def cli_on(settings: Settings, monkeypatch, *prefix: str) -> Iterator[Callable[..., str]]:
    """invoke(*args) -> stdout of `meterline <prefix> <args>` on that ledger, on a wide terminal (no folded cells)."""
    monkeypatch.setenv("METERLINE_CLICKHOUSE_DSN", settings.dsn)
    monkeypatch.setenv("METERLINE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setattr(console, "width", 250)
    get_settings.cache_clear()
    runner = CliRunner()

    def invoke(*args: str) -> str:
        result = runner.invoke(app, [*prefix, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    yield invoke
    get_settings.cache_clear()
