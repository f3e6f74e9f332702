"""`meterline simulate strategies`: the seed's strategy table on the user's workload (allocator/strategies.py);
a command of allocator/cli.py's `simulate` group."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

def strategies(
    from_ledger: Annotated[bool, typer.Option("--from-ledger", help="Replay the ledger's workload (priced events, process GPU samples) instead of the built-in week.")] = False,
    since: Annotated[str, typer.Option(help="With --from-ledger: start ('7d' ago, an ISO date).")] = "7d",
    until: Annotated[Optional[str], typer.Option(help="With --from-ledger: end (default now).")] = None,
    gpu: Annotated[str, typer.Option(help="GPU type: on-demand $/h from streams/catalog.toml, spot and interruptions from allocator/capacity.toml.")] = "h100",
    seed: Annotated[int, typer.Option(help="Seed of every random draw: same seed, same numbers.")] = 7,
    slo: Annotated[float, typer.Option(help="Critical requests' wait objective, seconds.")] = 2.0,
    target_util: Annotated[float, typer.Option(help="Target utilisation for sizing and autoscaling (0-1].")] = 0.8,
    scale_up_delay: Annotated[float, typer.Option(help="Seconds from launching an instance to using it.")] = 120.0,
    cooldown: Annotated[float, typer.Option(help="Seconds after a scaling change before scaling down.")] = 300.0,
    interruptions_per_hour: Annotated[Optional[float], typer.Option(help="Spot interruptions per instance-hour (default: the capacity catalog's).")] = None,
    store: Annotated[bool, typer.Option("--store", help="Write the results to the ledger (strategy_results) for Grafana and the web page.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")] = False,
) -> None:
    """Static, dynamic, priority, spot and meterline's mix on one workload: cost, its predictability, critical
    latency, utilisation, interruption risk, savings vs static and deadline misses. Deterministic; runs in seconds."""
    from datetime import datetime, timezone

    from meterline.console import console, emit_json, fail
    from meterline.schemas.events import new_id

    from . import strategies as st

    if not 0 < target_util <= 1:
        fail("--target-util must be in (0, 1], e.g. 0.8")
    knobs = st.Knobs(target_util=target_util, scale_up_delay_ms=round(scale_up_delay * 1000), cooldown_ms=round(cooldown * 1000),
                     slo_ms=round(slo * 1000), seed=seed, interruptions_per_hour=interruptions_per_hour)
    try:
        inst = st.load_instance(gpu)
    except ValueError as err:
        fail(str(err))
    now = datetime.now(timezone.utc)
    trace = _ledger_trace(since, until, seed, now) if from_ledger else st.builtin_trace(seed)
    rows = st.simulate(trace, inst, knobs)
    run_id = new_id() if store else None
    if store:
        _store(rows, trace, inst, knobs, run_id, now)
    if as_json:
        emit_json(st.to_json(rows, trace, inst, knobs, run_id))
        return
    console.print(st.render_table(rows, trace.source, inst, knobs, st.top_class(trace)))
    if store:
        console.print(f"stored as run {run_id} in strategy_results")


def _ledger_trace(since, until, seed, now):
    from meterline.app.report import parse_when
    from meterline.app.store import open_ledger
    from meterline.console import fail
    from meterline.settings import get_settings

    from .strategies import ledger_trace

    try:
        start, end = parse_when(since, now), parse_when(until, now) or now
    except ValueError as err:
        fail(str(err))
    if start is None or start >= end:
        fail("--since must be before --until")
    ledger = open_ledger(get_settings())
    try:
        return ledger_trace(ledger, start, end, seed=seed)
    finally:
        ledger.close()


def _store(rows, trace, inst, knobs, run_id, now) -> None:
    """Written directly: the API only reads. An embedded store held by `up` cannot be opened twice."""
    from meterline.app.store import running_up
    from meterline.console import fail
    from meterline.settings import get_settings
    from meterline.sql.ledger import connect

    from .strategies import store

    settings = get_settings()
    if settings.dsn.startswith("chdb:") and running_up(settings):
        fail("`meterline up` holds the embedded ledger; run --store while it is stopped, or use a ClickHouse server")
    client = connect(settings)
    try:
        store(client, rows, trace, inst, knobs, run_id, now, settings.clickhouse_cluster)
    finally:
        client.close()
