"""Terminal output: user text is shown as written, never read as rich markup."""
from __future__ import annotations

from rich.console import Console

from meterline.console import table


def test_table_cells_are_text_not_markup():
    evil = "[red]acme[/red] [/] [link=http://evil.example]click"
    out = Console(width=200, record=True, color_system=None)
    out.print(table([{"tenant": evil, "cost": 1}]))
    text = out.export_text()
    assert evil in text  # shown literally: no colour taken, no link made, no MarkupError for "[/]"
