"""`meterline plan gpu` (allocator/plan.py) and `meterline plan endpoints` (allocator/endpoints.py)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

plan_app = typer.Typer(help="Capacity plans from the ledger: GPUs per pool, replicas per inference endpoint.",
                       no_args_is_help=True)

Since = Annotated[str, typer.Option(help="Start of the demand window ('7d' ago, an ISO date or datetime, UTC).")]
Until = Annotated[Optional[str], typer.Option(help="End of the window (default now).")]
TargetUtil = Annotated[float, typer.Option(help="Target utilisation (0-1].")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]


def _window(since: str, until: str | None):
    from datetime import datetime, timezone

    from meterline.app.report import parse_when
    from meterline.console import fail

    now = datetime.now(timezone.utc)
    try:
        start, end = parse_when(since, now), parse_when(until, now) or now
    except ValueError as err:
        fail(str(err))
    if start is None or start >= end:
        fail("--since must be before --until")
    return start, end


def _read(fn, *args):
    from meterline.app.store import open_ledger
    from meterline.settings import get_settings

    ledger = open_ledger(get_settings())
    try:
        return fn(ledger, *args)
    finally:
        ledger.close()


@plan_app.command("gpu")
def plan_gpu(
    since: Since = "7d",
    until: Until = None,
    target_util: TargetUtil = 0.8,
    p95_wait: Annotated[float, typer.Option(help="Target p95 wait of the top class (critical where there is any), seconds.")] = 2.0,
    what_if: Annotated[str, typer.Option("--what-if", help="Demand growth factor: 1.5 = half as many units of work again.")] = "1",
    as_json: JsonFlag = False,
) -> None:
    """GPUs (and MIG layout) per pool for a target utilisation and p95 wait, with the plan's cost on demand and
    with its batch-only GPUs on spot. Demand: busy GPU-seconds per pool, tenant and minute (process samples)."""
    from fractions import Fraction

    from meterline.console import console, emit_json, fail

    from . import plan as pl
    from . import strategies as st

    if not 0 < target_util <= 1:
        fail("--target-util must be in (0, 1], e.g. 0.8")
    try:
        growth = Fraction(what_if)
    except (ValueError, ZeroDivisionError):
        growth = Fraction(-1)
    if growth <= 0:
        fail(f"--what-if must be a positive number such as 1.5, not {what_if!r}")
    start, end = _window(since, until)
    demand = pl.grow(_read(pl.ledger_demand, start, end), growth)
    knobs = st.Knobs(target_util=target_util)
    try:
        doc = pl.to_json(pl.plan_all(demand, int((end - start).total_seconds() * 1000), knobs, round(p95_wait * 1000)),
                         growth, round(p95_wait * 1000), knobs)
    except ValueError as err:
        fail(str(err))
    doc.update(since=start.isoformat(), until=end.isoformat())
    if as_json:
        emit_json(doc)
    elif not doc["pools"]:
        console.print("no GPU process samples in the window: nothing to plan")
    else:
        console.print(pl.render_table(doc))
