"""`meterline streams`: the stream worker (validate, dedupe, price, spend, anomalies)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("streams")
    def streams(
        group: Annotated[Optional[str], typer.Option(help="Consumer group (default: the topic prefix followed by -streams, as in `meterline up`); run more workers with the same group to scale out.")] = None,
        catalog: Annotated[Optional[Path], typer.Option(help="Price catalog TOML (default: the catalog setting, METERLINE_CATALOG, else the one shipped in streams/catalog.toml).")] = None,
        checkpoint_interval: Annotated[float, typer.Option(help="Seconds between checkpoints (all spend published, outputs flushed, offsets committed); a crash replays at most this much input.")] = 5.0,
        publish_interval: Annotated[float, typer.Option(help="Seconds between spend updates of tenant/team/project scopes (sessions and agents: every checkpoint).")] = 1.0,
        dedupe_window: Annotated[int, typer.Option(help="Event ids remembered per usage partition to drop producer retries.")] = 100_000,
        exit_when_idle: Annotated[Optional[float], typer.Option(help="Stop after this many seconds without input (tests, backfills).")] = None,
        instance_id: Annotated[Optional[str], typer.Option(help="Static group membership (e.g. the pod name): a restarted worker takes its partitions back at once instead of after the session timeout.")] = None,
        until_caught_up: Annotated[bool, typer.Option(help="Stop once every assigned partition is read to its end (tests, backfills).")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the run's counters as JSON on exit.")] = False,
    ) -> None:
        """Run the stream worker: usage -> validate (bad -> dlq) -> dedupe -> price -> priced topic;
        usage + GPU samples -> real-time spend per tenant/team/project/agent/session -> spend topic;
        streaming anomaly detection -> anomalies topic (`meterline alerts` delivers them to a webhook).

        At-least-once: outputs are flushed before input offsets are committed, so a crash
        repeats work (the ledger dedupes by event_id) and never loses it. Stop with Ctrl-C or
        SIGTERM; the worker checkpoints before it exits.
        """
        import signal
        import threading

        from meterline.console import console, emit_json, fail
        from meterline.settings import get_settings

        from .pricing import load_catalog
        from .worker import StreamWorker

        from meterline.errors import require_kafka

        settings = get_settings()
        require_kafka(settings)
        try:
            worker = StreamWorker(settings, load_catalog(catalog), group_id=group, checkpoint_interval=checkpoint_interval, publish_interval=publish_interval,
                                  dedupe_per_partition=dedupe_window, instance_id=instance_id)
        except Exception as err:  # noqa: BLE001 - one line for the operator
            fail(f"could not start the stream worker against {settings.bootstrap}: {err}. "
                 "Is Kafka running and are the topics created? Try `meterline kafka start` and `meterline topics create`.")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if not as_json:
            console.print(f"streams: pricing with {worker.catalog.version}; consuming {', '.join(worker.topics[t] for t in ('usage', 'gpu', 'compute'))}")
        stats = worker.run(stop, exit_when_idle=exit_when_idle, until_caught_up=until_caught_up)
        if as_json:
            emit_json(dict(stats))
        else:
            console.print(", ".join(f"{k}={v}" for k, v in sorted(stats.items())) or "no input")

    @app.command("alerts")
    def alerts(
        webhook: Annotated[str, typer.Option(envvar="METERLINE_ANOMALY_WEBHOOK", help="URL to POST each anomaly to (JSON; Slack incoming webhooks read its `text`).")],
        min_severity: Annotated[str, typer.Option(help="Deliver anomalies of this severity and above: info, warning or critical.")] = "warning",
        give_up_after: Annotated[float, typer.Option(help="Seconds to keep retrying a webhook that is down before the anomaly goes to the dead-letter topic.")] = 900.0,
        group: Annotated[Optional[str], typer.Option(help="Consumer group (default: the topic prefix followed by -alerts); a second group delivers to a second webhook.")] = None,
    ) -> None:
        """Deliver anomalies to a webhook, at least once (a Faust agent on the anomalies topic).

        Each anomaly at or above --min-severity is POSTed as {"text": "...", "anomaly": {...}} and the
        agent moves on only after a 2xx, so a restart repeats rather than skips. A webhook that is down
        is retried with backoff; a 4xx, or --give-up-after seconds of failures, dead-letters the anomaly
        with the reason. Stop with Ctrl-C or SIGTERM.
        """
        import faust

        from meterline.console import fail
        from meterline.settings import get_settings

        from .alerts import SEVERITIES, make_app

        from meterline.errors import require_kafka

        if min_severity not in SEVERITIES:
            fail(f"--min-severity must be one of {', '.join(SEVERITIES)}, not {min_severity!r}")
        require_kafka(get_settings())
        app = make_app(get_settings(), webhook, min_severity, give_up_after, group)
        faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()
