"""`meterline dlq list` and `meterline dlq replay` (the logic and its safety rules: sql/dlq.py)."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from typing import Annotated, Optional

import typer

dlq_app = typer.Typer(
    help=("The dead-letter queue: records the worker, the sink or the alerts job could not process, kept in the ledger's "
          "dead_letters table with their reason and original bytes (read by the sink from the dlq topic).\n\n"
          "After fixing the bug that rejected them:  meterline dlq list  →  meterline dlq replay --reason-contains "
          "'SQL checks'  (a dry run)  →  the same with --yes. A replay sends each record's original bytes back to its "
          "source topic, once; the worker and the sink check it again."),
    no_args_is_help=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]
Stage = Annotated[Optional[str], typer.Option(help="Only dead letters of this stage: streams (the worker), sink or alerts.")]
SourceTopic = Annotated[Optional[str], typer.Option(help="Only records from this topic: a catalog name (usage, priced, "
                                                         "anomalies, ...) or the full topic name.")]
ReasonContains = Annotated[Optional[str], typer.Option(help="Only dead letters whose reason contains this text (any case).")]
Since = Annotated[Optional[str], typer.Option(help="Only dead letters from this time on (ISO 8601, UTC unless it says; "
                                                   "e.g. 2026-12-01 or 2026-12-01T08:00:00+01:00).")]


def _filters(settings, stage, source_topic, reason_contains, since):
    from meterline.console import fail

    from .dlq import Filters, full_topic

    when = None
    if since is not None:
        try:
            when = datetime.fromisoformat(since)
        except ValueError:
            fail(f"--since {since!r} is not a date or time; write it as ISO 8601, e.g. 2026-12-01T08:00:00", code=2)
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return Filters(stage, full_topic(settings, source_topic) if source_topic else None, reason_contains, when)


def _ledger(settings):
    from .cli import _connect
    from .ledger import migrate

    client = _connect()
    migrate(client, cluster=settings.clickhouse_cluster)  # dlq_replays and anomaly_ids (0021), as the sink would
    return client


@dlq_app.command("list")
def list_command(stage: Stage = None, source_topic: SourceTopic = None, reason_contains: ReasonContains = None,
                 since: Since = None, as_json: JsonFlag = False) -> None:
    """Dead letters by stage, source topic, error type and first line of the reason: how many, how many were
    replayed, and the first and last time one came. Reads the ledger (the sink stores the dlq topic there)."""
    from meterline.console import console, emit_json, table
    from meterline.settings import get_settings

    from .dlq import summary

    settings = get_settings()
    rows = summary(_ledger(settings), settings, _filters(settings, stage, source_topic, reason_contains, since))
    if as_json:
        emit_json(rows)
    else:
        console.print(table(rows) if rows else "(no dead letters)")


@dlq_app.command("replay")
def replay_command(
    stage: Stage = None, source_topic: SourceTopic = None, reason_contains: ReasonContains = None, since: Since = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be replayed (the default).")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Replay: send each chosen record's original bytes to its source topic.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Send dead-lettered records back to their source topics, once, after the bug that rejected them is fixed.

    Without --yes nothing is sent: it shows what would be. Only records whose every consumer counts them once are
    sent: priced and anomalies (the sink keeps the first id), usage, gpu and compute as dead-lettered by the stream
    worker (it charged nothing; the sink keeps the first id). Refused, with the reason: spend, control, budgets,
    gpu-allocations and scale (no id, or latest per key), gpu and compute that only the sink refused (the worker
    charged them already), usage the ledger holds, truncated or empty payloads and conflicting duplicates.
    Each replayed record is recorded in the ledger's dlq_replays table: a second replay sends nothing again.
    On a secured broker use the `replay` principal (meterline kafka start --secure --env replay) or the admin.
    """
    from meterline.console import fail
    from meterline.settings import get_settings

    from .dlq import plan

    if dry_run and yes:
        fail("--dry-run and --yes contradict each other: pick one", code=2)
    settings = get_settings()
    client = _ledger(settings)
    found = plan(client, settings, _filters(settings, stage, source_topic, reason_contains, since))
    if not yes:
        _show(found, as_json)
        return
    _replay(client, settings, found, as_json)


def _replay(client, settings, found, as_json: bool) -> None:
    import uuid

    from meterline.console import console, emit_json, error_line
    from meterline.errors import require_kafka

    from .dlq import claim, produce, unclaim

    require_kafka(settings)
    replay_id = str(uuid.uuid4())
    mine = claim(client, settings, found.replay, replay_id)
    won = {letter.key for letter in mine}
    raced = [letter for letter in found.replay if letter.key not in won]  # another replay claimed them first
    delivery = produce(settings, mine)
    unclaim(client, settings, replay_id, [letter for letter, _ in delivery.refused])
    result = {"replayed": len(delivery.delivered), "replayed_before": len(found.replayed_before) + len(raced),
              "refused": len(found.refused), "not_delivered": len(delivery.refused), "unknown": len(delivery.unknown)}
    if as_json:
        emit_json({**result, "refusals": [letter.summary(why) for letter, why in found.refused],
                   "not_delivered_letters": [letter.summary(why) for letter, why in delivery.refused],
                   "unknown_letters": [letter.summary("no answer from Kafka") for letter in delivery.unknown]})
    else:
        console.print(f"replayed {result['replayed']}, replayed before {result['replayed_before']}, "
                      f"refused {result['refused']}")
    _refusal_lines(found.refused)
    for letter, why in delivery.refused:
        error_line(f"{letter.source_topic}[{letter.partition}]@{letter.offset} (dlq_id {letter.dlq_id}) not delivered: "
                   f"{why}; its claim is dropped, replay it again once that is fixed")
    if delivery.unknown:
        error_line(f"{len(delivery.unknown)} records got no answer from Kafka in time; they may be written, so they stay "
                   "marked replayed (check the source topic before sending them by hand)")
    if found.refused or delivery.refused or delivery.unknown:
        raise typer.Exit(1)


def _show(found, as_json: bool) -> None:
    from meterline.console import console, emit_json, table

    if as_json:
        emit_json({"dry_run": True, "replay": [letter.summary("replay") for letter in found.replay],
                   "refused": [letter.summary(why) for letter, why in found.refused],
                   "replayed_before": [letter.summary("replayed before") for letter in found.replayed_before]})
        return
    counts = Counter((letter.source_topic, letter.stage, "replay") for letter in found.replay)
    counts.update((letter.source_topic, letter.stage, "replayed before") for letter in found.replayed_before)
    counts.update((letter.source_topic, letter.stage, "refused") for letter, _ in found.refused)
    rows = [{"source_topic": t, "stage": s, "action": a, "records": n} for (t, s, a), n in sorted(counts.items())]
    console.print(table(rows, title="dry run: nothing was sent") if rows else "(no dead letters match)")
    _refusal_lines(found.refused)
    if found.replay:
        console.print(f"Run again with --yes to replay {len(found.replay)} records.")


def _refusal_lines(refused) -> None:
    """One line per distinct reason: what is refused and why."""
    from meterline.console import error_line

    for (topic, why), n in sorted(Counter((letter.source_topic, why) for letter, why in refused).items()):
        error_line(f"refused {n} dead letters of {topic}: {why}")
