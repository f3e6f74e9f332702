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


def _overrides(items: list[str], field: str, cast) -> dict[str, object]:
    """MODEL=VALUE options as {model: value}."""
    from meterline.console import fail

    out = {}
    for item in items:
        model, sep, value = item.rpartition("=")
        try:
            out[model] = cast(value)
        except ValueError:
            model = ""
        if not sep or not model:
            fail(f"--{field} takes MODEL=VALUE, e.g. llama-3-70b=1500, not {item!r}")
    return out


@plan_app.command("endpoints")
def plan_endpoints(
    since: Since = "15m",
    until: Until = None,
    slo_ms: Annotated[int, typer.Option(help="p95 response objective of every endpoint, ms.")] = 2_000,
    slo: Annotated[Optional[list[str]], typer.Option(help="One model's SLO: MODEL=MS (repeatable).")] = None,
    target_util: TargetUtil = 0.7,
    min_replicas: Annotated[int, typer.Option(help="Fewest replicas of an endpoint.")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Most replicas of an endpoint.")] = 100,
    concurrency: Annotated[int, typer.Option(help="Requests one replica serves at once (its batch size).")] = 1,
    publish: Annotated[bool, typer.Option("--publish", help="Publish the records to the compacted scale topic "
                                          "(the ledger keeps them; /metrics serves the latest).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Replicas per self-hosted inference endpoint (provider selfhosted / self-hosted) from its request rate,
    latency and GPU utilisation against its SLO: ceil(rate x service time / (concurrency x utilisation)), raised
    until the M/M/c p95 response meets the SLO, within min..max (allocator/endpoints.py)."""
    from dataclasses import replace
    from datetime import datetime, timezone

    from meterline.console import console, emit_json, fail

    from . import endpoints as ep

    if not 0 < target_util <= 1 or concurrency < 1 or slo_ms < 1 or not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        fail("need 0 < --target-util <= 1, --concurrency >= 1, --slo-ms >= 1 and 0 <= --min-replicas <= --max-replicas (>= 1)")
    default = ep.Bounds(slo_ms, target_util, min_replicas, max_replicas, concurrency)
    bounds = {m: replace(default, slo_ms=v) for m, v in _overrides(slo or [], "slo", int).items()}
    start, end = _window(since, until)
    records = _read(ep.recommendations, start, end, bounds, default, datetime.now(timezone.utc))
    if publish and records:
        from meterline.errors import require_kafka
        from meterline.settings import get_settings

        settings = get_settings()
        require_kafka(settings)
        ep.publish(settings, records)
    if as_json:
        emit_json({"since": start.isoformat(), "until": end.isoformat(), "published": publish,
                   "endpoints": [r.model_dump(mode="json") for r in records]})
        return
    if not records:
        console.print("no self-hosted LLM calls in the window: nothing to recommend")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"endpoint replicas · {start:%Y-%m-%d %H:%M} → {end:%H:%M} UTC"), header_style="bold")
    for name in ("endpoint", "req/s", "service ms", "p95 ms", "SLO ms", "GPUs", "GPU %", "replicas", "predicted p95 ms", "why"):
        table.add_column(Text(name), justify="left" if name in ("endpoint", "why") else "right")
    for r in records:
        cells = (r.endpoint, r.rate_rps, r.service_ms, r.p95_latency_ms, r.slo_ms, r.observed_replicas or "-",
                 "-" if r.gpu_utilization_pct is None else r.gpu_utilization_pct, r.recommended_replicas,
                 r.predicted_p95_ms if r.predicted_p95_ms is not None else "-", r.reason)
        table.add_row(*(Text(str(c)) for c in cells))
    console.print(table)
    if publish:
        console.print(f"published {len(records)} to {get_settings().topic('scale')}")
