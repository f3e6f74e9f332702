"""Output helpers shared by every command: rich tables for people, JSON for machines."""
from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()
err_console = Console(stderr=True)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: money never goes through float
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_default)


def emit_json(obj: Any) -> None:
    sys.stdout.write(dumps(obj) + "\n")


def table(rows: Iterable[Mapping[str, Any]], title: str | None = None) -> Table:
    rows = list(rows)
    t = Table(title=title, header_style="bold")
    for col in rows[0].keys() if rows else []:
        t.add_column(col, justify="right" if isinstance(rows[0][col], (int, Decimal)) else "left")
    for r in rows:
        # cells are user text (tenant names, SQL results): Text, so "[red]" or "[/]" is shown, never markup
        t.add_row(*(Text(v if isinstance(v, str) else _default(v)) for v in r.values()))
    return t


def error_line(message: str) -> None:
    """`error: <message>` on stderr as one line: never wrapped, brackets in it printed as they are."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr, then exit non-zero."""
    import typer

    error_line(message)
    raise typer.Exit(code)
