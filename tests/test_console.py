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


def test_report_csv_defuses_formulas_and_keeps_numbers_exact():
    import csv
    import io
    from decimal import Decimal

    from meterline.app.report import to_csv
    from meterline.app.store import Result

    evil = '=HYPERLINK("http://evil.example","refund")'
    result = Result(["tenant", "cost_usd"], ["String", "Decimal(38, 18)"],
                    [(evil, Decimal("-1.250000000001")), ("+acme", Decimal(0)), ("@x", Decimal("2")), ("plain-name", Decimal("3"))])
    rows = list(csv.reader(io.StringIO(to_csv(result))))
    assert rows[1] == ["'" + evil, "-1.250000000001"]  # text defused, a negative amount keeps its sign
    assert [r[0] for r in rows[2:]] == ["'+acme", "'@x", "plain-name"]


def test_report_tables_show_tenant_names_as_written():
    from decimal import Decimal

    from meterline.app.report import ReportParams, render
    from meterline.app.store import Result

    name = "[bold red]acme[/] [/]"
    result = Result(["tenant", "total_cost_usd"], ["String", "Decimal(38, 18)"], [(name, Decimal("1"))])
    params = ReportParams.parse(since="1d", until="now")
    out = Console(width=200, record=True, color_system=None)
    out.print(render("chargeback", params, result, "table"))
    assert name in out.export_text()
