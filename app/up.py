"""`meterline up`: the whole pipeline on one machine, supervised, with the HTTP API.

What runs where, and why:

* the ledger sink runs on a thread of this process, next to the HTTP API: with the
  embedded chDB store only one process may open the data directory, so the process that
  writes the ledger is the one that answers queries (reports, /api/sql, Grafana through
  a real server);
* the stream worker runs as a child process (`meterline streams`): it is the CPU-heavy
  stage and gets a core of its own instead of sharing this process's GIL;
* the allocator runs on a thread, with the ledger injected for reconciliation;
* a live feed thread follows spend, decisions and anomalies for the page and /metrics.

A component that dies is restarted with exponential backoff (1 s … 30 s) and the restart
is logged and counted (/health, /metrics). SIGINT/SIGTERM stop the stream worker first
(it checkpoints), then the allocator, then wait for the sink to drain what is already in
Kafka, flush and commit, so nothing is lost. `up.json` in the data directory tells
`meterline report` / `sql` to come through the API while `up` runs.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from meterline.settings import Settings

log = logging.getLogger("meterline.up")
MAX_BACKOFF_S = 30.0
LEDGER_TOPICS = ("priced", "gpu", "spend", "anomalies", "control", "budgets", "dlq")
ALERTS_GIVE_UP_S = 900.0  # how long `meterline alerts` retries a webhook that is down before dead-lettering


# ---- supervision ------------------------------------------------------------------------------


@dataclass
class Component:
    """One supervised part. Subclasses implement _start, alive and _stop.

    A consumer names its group and input topics; ProgressWatch then judges its progress from Kafka
    (committed offsets that move, or nothing left to read), because a live thread or process can
    still be frozen (issue 10: a deadlocked commit looked "running, 0 restarts" for minutes)."""

    name: str
    restarts: int = 0
    last_error: str = ""
    started_at: float = 0.0
    failures_in_a_row: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    topics: tuple[str, ...] = ()
    lag: int = 0
    committed: int | None = None
    last_progress: float = field(default_factory=time.monotonic)  # not 0: before its start, "since up began"
    patience_s: float | None = None  # its own stall limit, when it may rightly wait longer than the others

    def start(self) -> None:
        self.started_at = self.last_progress = time.monotonic()
        self.committed, self.lag = None, 0
        self._start()

    def observe(self, committed: int | None, lag: int, now: float) -> None:
        """One reading of the group's committed offsets and lag."""
        if lag == 0 or committed != self.committed:
            self.last_progress = now
        self.committed, self.lag = committed, lag

    def stalled(self, stall_after_s: float, now: float | None = None) -> bool:
        return self.lag > 0 and (now or time.monotonic()) - self.last_progress > stall_after_s

    def stop(self, timeout: float = 30.0) -> None:
        self._stop(timeout)

    def _start(self) -> None: ...
    def _stop(self, timeout: float) -> None: ...
    def alive(self) -> bool: ...

    def abandon(self) -> None:
        """Forget an instance that would not stop, so a fresh one can start."""

    def state(self, stall_after_s: float = float("inf")) -> dict[str, Any]:
        out = {"running": self.alive(), "restarts": self.restarts, "last_error": self.last_error, **self.extra}
        if self.group:
            out.update(lag=self.lag, last_progress_s=round(time.monotonic() - self.last_progress, 1),
                       stalled=self.stalled(stall_after_s))
        return out


class ThreadComponent(Component):
    """Runs `make().run(stop_event)` on a thread; a return or an exception counts as a death."""

    def __init__(self, name: str, make: Callable[[], Any], group: str | None = None, topics: tuple[str, ...] = ()):
        super().__init__(name, group=group, topics=topics)
        self.make = make
        self.instance: Any = None
        self._thread: threading.Thread | None = None
        self._abandoned: list[threading.Thread] = []
        self._stop_event = threading.Event()

    def _start(self) -> None:
        self._stop_event = threading.Event()
        self.instance = self.make()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.instance.run(self._stop_event)
        except Exception as err:  # noqa: BLE001 - the supervisor restarts it; the log has the traceback
            self.last_error = f"{type(err).__name__}: {err}"[:300]
            log.exception("%s died", self.name)

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def _stop(self, timeout: float) -> None:
        self._stop_event.set()
        if self._thread:
            self._thread.join(timeout)

    def abandon(self) -> None:
        if self.alive():  # a thread cannot be killed; it exits at its next check of the stop event
            log.warning("%s did not stop; starting a fresh one beside it", self.name)
            self._abandoned.append(self._thread)
            self._thread = None

    def stuck(self) -> list[threading.Thread]:
        """Its threads that still run: the current one (if it did not stop), and any abandoned."""
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        return self._abandoned + ([self._thread] if self.alive() else [])


class ProcessComponent(Component):
    """A child process (its own core); output goes to <data_dir>/logs/<name>.log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, group: str | None = None,
                 topics: tuple[str, ...] = ()):
        super().__init__(name, group=group, topics=topics)
        self.argv, self.env, self.log_dir = argv, env, log_dir
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{self.name}.log", "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self.extra["pid"] = self.proc.pid

    def alive(self) -> bool:
        if self.proc is None:
            return False
        code = self.proc.poll()
        if code is not None and not self.last_error.startswith(("exit", "stalled")):
            self.last_error = f"exit {code} (see {self.log_dir / (self.name + '.log')})"
        return code is None

    def _stop(self, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the worker checkpoints on SIGTERM
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            self.proc.kill()
            self.proc.wait()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM (and checkpoints) if `up` itself is killed hard."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(self, components: list[Component], stall_after_s: float = float("inf")):
        self.components = components
        self.stall_after_s = stall_after_s

    def start(self) -> None:
        for c in self.components:
            log.info("starting %s", c.name)
            c.start()

    def check(self, stopping: threading.Event) -> None:
        """Restart what died or stalled, with exponential backoff between attempts."""
        for c in self.components:
            if not stopping.is_set() and c.alive() and c.stalled(self.patience(c)):
                log.warning("%s stalled: lag %d, no progress for %.0f s; restarting it", c.name, c.lag,
                            time.monotonic() - c.last_progress)
                c.extra["stalls"] = c.extra.get("stalls", 0) + 1
                c.stop(timeout=10)
                c.abandon()
                c.last_error, c.started_at = f"stalled with lag {c.lag}", 0.0  # restarted now, below
            if stopping.is_set() or c.alive():
                if c.alive() and time.monotonic() - c.started_at > MAX_BACKOFF_S:
                    c.failures_in_a_row = 0
                continue
            backoff = min(MAX_BACKOFF_S, 2.0 ** c.failures_in_a_row)
            if time.monotonic() - c.started_at < backoff:
                continue
            c.restarts += 1
            c.failures_in_a_row += 1
            log.warning("%s stopped (%s); restart #%d", c.name, c.last_error or "no error", c.restarts)
            try:
                c.start()
            except Exception as err:  # noqa: BLE001 - try again after the next backoff
                c.last_error = f"restart failed: {err}"[:300]
                log.exception("could not restart %s", c.name)

    def watch(self, stopping: threading.Event, every: float = 0.5) -> None:
        while not stopping.wait(every):
            self.check(stopping)

    def patience(self, c: Component) -> float:
        """How long `c` may hold lag without progress: doubled for each restart in a row, so an instance that
        only starts slowly (a busy machine, a long changelog restore) is not killed in a loop."""
        return (c.patience_s or self.stall_after_s) * 2 ** min(c.failures_in_a_row, 4)

    def health(self) -> dict[str, dict[str, Any]]:
        return {c.name: c.state(self.patience(c)) for c in self.components}

    def get(self, name: str) -> Component | None:
        return next((c for c in self.components if c.name == name), None)


class ProgressWatch:
    """Reads each consumer's committed offsets and lag from Kafka every `every` seconds.

    While Kafka cannot be read nobody is judged (an outage stalls every consumer alike, and a
    restart would not help), so after the broker returns each consumer has `stall_after_s` again."""

    def __init__(self, settings: Settings, components: list[Component], every: float = 5.0):
        self.settings, self.components, self.every = settings, components, every

    def run(self, stop: threading.Event) -> None:
        from .metrics import KafkaWatermarks

        kafka = None
        try:
            while not stop.wait(self.every):
                try:
                    kafka = kafka or KafkaWatermarks(self.settings)
                    self.observe(kafka)
                except Exception as err:  # noqa: BLE001 - Kafka away: pause every consumer's clock
                    log.warning("progress watch: Kafka unavailable (%s)", err)
                    for c in self.components:
                        c.last_progress = time.monotonic()
        finally:
            if kafka is not None:
                kafka.close()

    def observe(self, kafka: Any) -> None:
        readings: dict[tuple[str, tuple[str, ...]], tuple[int | None, int]] = {}
        for c in [c for c in self.components if c.group and c.alive()]:
            key = (c.group, c.topics)
            if key not in readings:  # stream workers share a group: one reading for all
                readings[key] = kafka.progress(c.group, [self.settings.topic(t) for t in c.topics])
            c.observe(*readings[key], time.monotonic())


# ---- the pipeline -----------------------------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a child `meterline` command see these exact settings: every field, so none read
    from the caller's environment, config file or code (the catalog, priced format, state dir...) is lost."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is not None and name != "kafka_security":
            env[f"METERLINE_{name.upper()}"] = str(value)
    env.update({"METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_CLICKHOUSE_DSN": settings.dsn})
    for key, value in settings.kafka_security.model_dump().items():
        if value is not None:
            env[f"METERLINE_KAFKA_{key.upper()}"] = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
    return env


def meterline_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from meterline.cli import main; main()", *args]


class _LiveRunner:
    """LiveFeed as a supervised runner."""

    def __init__(self, feed: Any):
        self.feed = feed

    def run(self, stop: threading.Event) -> None:
        self.feed._stop = stop  # noqa: SLF001 - the feed loops until this event is set
        self.feed._run()  # noqa: SLF001


class _ApiRunner:
    def __init__(self, api: Any):
        self.api = api

    def run(self, stop: threading.Event) -> None:
        if not self.api.alive():
            self.api.start()
        while not stop.wait(0.5):
            if not self.api.alive():
                raise RuntimeError("the HTTP server thread stopped")


class Up:
    """Everything `meterline up` runs. `start()`, then `run_until(stop)` or `stop()`."""

    def __init__(self, settings: Settings, *, port: int | None = None, host: str = "127.0.0.1", streams: int = 1,
                 allocator: bool = True, simulated: bool = False, sink_batch_seconds: float = 0.5, webhook: str | None = None,
                 sinks: int = 1):
        from .live import LiveFeed, LiveState

        self.settings = settings
        self.host, self.port = host, settings.api_port if port is None else port
        self.live = LiveState()
        self.live.simulated = simulated
        self.sink_batch_seconds = sink_batch_seconds
        self._local = threading.local()
        self._clients: list[Any] = []
        self.ledger_lag = timedelta(minutes=2)
        self._models: dict[tuple[str, str], tuple[float, str | None]] = {}
        self.api = None
        self.collector = None
        self.registry = None
        self.latency = None
        self.feed = LiveFeed(settings, self.live, on_decision_latency=self._observe_latency)
        components: list[Component] = [ThreadComponent("sink", self._make_sink, settings.group("sink"), LEDGER_TOPICS)]
        components += self._extra_sinks(int(sinks))
        if allocator:
            components.append(ThreadComponent("allocator", self._make_allocator, settings.group("allocator"), ("spend", "gpu")))
        group = settings.group("streams")
        for i in range(int(streams)):  # one worker per core: partitions are the parallelism
            # a static member id each: a worker restarted after a stall or a crash takes its partitions back at
            # once, instead of waiting out the dead member's session (45 s with no progress: judged stalled again)
            name = "streams" if i == 0 else f"streams-{i + 1}"
            components.append(ProcessComponent(name, meterline_argv("streams", "--group", group, "--instance-id", f"{group}-{i + 1}"),
                                               settings_env(settings), settings.data_dir / "logs", group, ("usage", "gpu")))
        if webhook:  # anomalies to a webhook, at least once (the Faust job in streams/alerts.py)
            alerts = ProcessComponent("alerts", meterline_argv("alerts", "--webhook", webhook, "--give-up-after", str(ALERTS_GIVE_UP_S)),
                                      settings_env(settings), settings.data_dir / "logs", settings.group("alerts"), ("anomalies",))
            alerts.patience_s = ALERTS_GIVE_UP_S + 60  # it waits for a webhook that is down; a restart would reset its clock
            components.append(alerts)
        components.append(ThreadComponent("live", lambda: _LiveRunner(self.feed)))
        self.supervisor = Supervisor(components, stall_after_s=settings.stall_after_s)
        self.progress = ProgressWatch(settings, components, every=min(5.0, settings.stall_after_s / 2))
        self._progress_stop = threading.Event()
        self._started = False  # components were started: stop() has something to stop and drain

    # ---- parts --------------------------------------------------------------------------------

    def client(self) -> Any:
        """A ledger client for the calling thread (chDB serialises calls per client)."""
        client = getattr(self._local, "client", None)
        if client is None:
            from meterline.sql.ledger import connect

            client = self._local.client = connect(self.settings)
            self._clients.append(client)
        return client

    def _make_sink(self) -> Any:
        from meterline.sql.sink import LedgerSink
        from meterline.sql.ledger import connect

        client = connect(self.settings)
        self._clients.append(client)
        return LedgerSink(self.settings, client=client, group=self.settings.group("sink"), batch_seconds=self.sink_batch_seconds)

    def _extra_sinks(self, sinks: int) -> list[Component]:
        """Sinks 2..N as `meterline sink` processes in the sink's group (a core each; Kafka splits the partitions),
        with static member ids so a restarted one takes its partitions back at once. A server or cluster only:
        chDB allows one process per data directory (up_command refuses it)."""
        group = self.settings.group("sink")
        return [ProcessComponent(f"sink-{i}", meterline_argv("sink", "--group", group, "--instance-id", f"{group}-{i}",
                                                             "--batch-seconds", str(self.sink_batch_seconds)),
                                 settings_env(self.settings), self.settings.data_dir / "logs", group, LEDGER_TOPICS)
                for i in range(2, sinks + 1)]

    def _make_allocator(self) -> Any:
        from meterline.allocator.engine import Engine
        from meterline.allocator.service import AllocatorService
        from meterline.streams.pricing import load_catalog

        catalog = load_catalog(self.settings.catalog)
        engine = Engine(ledger_spend=self.ledger_spend, downgrade_for=catalog.downgrade_for, primary_model=self.primary_model)
        self.ledger_lag = engine.config.ledger_lag
        from meterline.allocator.slo import ledger_feeds_or_none

        model_stats, pacing = ledger_feeds_or_none(self.settings, connect=self.client)  # SLO downgrades, pacing curves
        service = AllocatorService(self.settings, engine, group_id=self.settings.group("allocator"),
                                   model_stats=model_stats, pacing=pacing)
        return service

    def ledger_spend(self, scope: str, scope_id: str, since: Any) -> Decimal:
        """Period-to-date spend of a budget scope from the ledger, for the allocator's reconciliation.

        Counts up to `ledger_lag` ago: the allocator adds the stream's windows after that.
        """
        from datetime import datetime, timezone

        from .report import load_query, scope_filter
        from .store import DirectLedger

        until = datetime.now(timezone.utc) - self.ledger_lag
        if until <= since:
            return Decimal(0)
        rows = DirectLedger(self.settings, self.client()).query(load_query("scope_spend"), {
            **scope_filter(scope, scope_id), "since": since, "until": until, "bucket_seconds": 86400 * 366}).rows
        return sum((Decimal(r[1]) for r in rows), Decimal(0))

    def primary_model(self, scope: str, scope_id: str) -> str | None:
        """The model a scope spends most on (last hour, from the ledger), cached for a few seconds."""
        from datetime import datetime, timezone

        from .report import load_query, scope_filter
        from .store import DirectLedger

        now = time.monotonic()
        cached = self._models.get((scope, scope_id))
        if cached and now - cached[0] < (15.0 if cached[1] else 3.0):
            return cached[1]
        try:
            rows = DirectLedger(self.settings, self.client()).query(load_query("primary_model"), {
                **scope_filter(scope, scope_id), "since": datetime.now(timezone.utc) - timedelta(hours=1)}).rows
        except Exception:  # noqa: BLE001 - no model known: the allocator throttles instead of downgrading
            log.exception("primary model lookup failed")
            rows = []
        model = rows[0][0] if rows else None
        self._models[(scope, scope_id)] = (now, model)
        return model

    def _observe_latency(self, seconds: float) -> None:
        if self.latency is not None:
            self.latency.observe(seconds)

    def _unpriced(self) -> int:
        from .store import DirectLedger

        rows = DirectLedger(self.settings, self.client()).query("SELECT sum(unpriced_events) FROM usage_hourly").rows
        return int(rows[0][0] or 0) if rows else 0

    def _scale(self) -> list[tuple[str, str, int]]:
        from .report import load_query
        from .store import DirectLedger

        rows = DirectLedger(self.settings, self.client()).query(load_query("scale_latest")).rows
        return [(provider, model, int(replicas)) for provider, model, replicas in rows]

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> str:
        """Migrate, start every component and the API; returns the API URL."""
        from meterline.sql.ledger import migrate

        from .api import ApiServer
        from .auth import token_store
        from .metrics import PipelineCollector, build_registry
        from .store import DirectLedger, write_runfile

        from meterline.errors import writable_dir

        writable_dir(self.settings.data_dir, "METERLINE_DATA_DIR")
        migrate(self.client(), cluster=self.settings.clickhouse_cluster)
        groups = {self.settings.group("sink"): "priced", self.settings.group("streams"): "usage",
                  self.settings.group("allocator"): "spend"}
        collector = PipelineCollector(self.settings, groups,
                                      self._unpriced, self.supervisor.health, self._scale)
        self.collector = collector
        self.registry, self.latency = build_registry(collector)
        self.api = ApiServer(lambda: DirectLedger(self.settings, self.client()), live=self.live, registry=self.registry,
                             health=self.supervisor.health, host=self.host, port=self.port,
                             tokens=token_store(self.settings), settings=self.settings)
        try:
            url = self.api.start()
        except RuntimeError as err:
            if not isinstance(err.__cause__, OSError):
                raise
            from meterline.errors import UserError

            why = os.strerror(err.__cause__.errno) if err.__cause__.errno else str(err.__cause__)
            raise UserError(f"the API cannot listen on {self.host}:{self.port}: {why}; stop what holds port {self.port} "
                            "or set METERLINE_API_PORT (or --port) to a free one") from None
        if self.api.open:
            log.warning("the API has no token: anyone on this machine may use it (`meterline token create` closes it)")
        self.port = self.api.port
        self.supervisor.components.append(ThreadComponent("api", lambda: _ApiRunner(self.api)))
        self._started = True
        self.supervisor.start()
        threading.Thread(target=self.progress.run, args=(self._progress_stop,), name="progress", daemon=True).start()
        write_runfile(self.settings, url, token=self.api.tokens.ephemeral("cli (local up.json)", "reader"))
        log.info("meterline up: API and dashboard at %s", url)
        return url

    def run_until(self, stop: threading.Event) -> None:
        self.supervisor.watch(stop)

    def drain(self, timeout: float = 20.0) -> bool:
        """Wait until the sink has committed everything already in the ledger topics."""
        from .metrics import KafkaWatermarks

        kafka = KafkaWatermarks(self.settings)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                sink = self.supervisor.get("sink")
                if sink is None or not sink.alive():
                    return False
                lags = [kafka.lag(self.settings.group("sink"), self.settings.topic(t)) for t in LEDGER_TOPICS]
                if all(lag in (0, None) for lag in lags) and any(lag == 0 for lag in lags):
                    return True
                time.sleep(0.2)
            return False
        finally:
            kafka.close()

    def stop(self) -> None:
        """Graceful: stream worker checkpoints, allocator stops, sink drains + flushes + commits."""
        from .store import remove_runfile

        self._progress_stop.set()
        if not self._started:  # start() failed before any component ran: nothing to stop or drain, and no noise
            self._release()
            return
        sinks = [c.name for c in self.supervisor.components if c.name == "sink" or c.name.startswith("sink-")]
        core = (*sinks, "live", "api")
        producers = [c for c in self.supervisor.components if c.name not in core]
        for c in sorted(producers, key=lambda c: c.name == "allocator"):  # stream worker and collectors, then allocator
            log.info("stopping %s", c.name)
            c.stop(timeout=60)
        if not self.drain():
            log.warning("the sink did not drain within the timeout; the rest stays in Kafka for the next start")
        for name in core:
            if (c := self.supervisor.get(name)) is not None:
                log.info("stopping %s", name)
                c.stop(timeout=60)
        self._release()
        remove_runfile(self.settings)
        log.info("meterline up: stopped")

    def _release(self) -> None:
        """The API, the metrics' Kafka client and the ledger clients."""
        if self.api is not None:
            self.api.stop()
        if self.collector is not None:  # after the API: no scrape can make a new client now
            self.collector.close()
        stuck = [t.name for c in self.supervisor.components if isinstance(c, ThreadComponent) for t in c.stuck()]
        if stuck:  # it may be inside a query on any of them: a client closed under it can crash the process
            log.warning("%s still running: the ledger clients are left open for process exit", ", ".join(stuck))
        else:
            for client in self._clients:
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing at exit
                    pass
        self._clients.clear()


def up_command(
    port: Annotated[Optional[int], typer.Option(help="HTTP port for the API and dashboard (default: METERLINE_API_PORT or 8787).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 to serve other machines.")] = "127.0.0.1",
    no_streams: Annotated[bool, typer.Option("--no-streams", help="Do not run the stream worker here (it runs elsewhere).")] = False,
    stream_workers: Annotated[int, typer.Option(min=1, help="Stream worker processes in one group, one per spare core (BENCHMARKS.md); each owns whole tenants, tokens and GPU alike.")] = 1,
    sinks: Annotated[int, typer.Option(min=1, help="Ledger sinks in one group, one per spare core (BENCHMARKS.md, Sizing): Kafka "
                                                   "splits the ledger topics' partitions between them. More than 1 needs a "
                                                   "ClickHouse server (METERLINE_CLICKHOUSE_DSN=http://...).")] = 1,
    no_allocator: Annotated[bool, typer.Option("--no-allocator", help="Do not run the allocator here.")] = False,
    webhook: Annotated[Optional[str], typer.Option(envvar="METERLINE_ANOMALY_WEBHOOK", help="Also run `meterline alerts`: anomalies (warning and above) to this webhook, at least once.")] = None,
) -> None:
    """Run the whole pipeline in one supervised command: stream worker, ledger sink, allocator, HTTP API.

    Embedded chDB by default (this process holds the store and serves every query), or the Kafka and
    ClickHouse named by METERLINE_KAFKA_BOOTSTRAP / METERLINE_CLICKHOUSE_DSN. Components that die are
    restarted; Ctrl-C (or SIGTERM) stops gracefully with nothing lost. While it runs, `meterline report`
    and `meterline sql` go through its API. Dashboard: http://127.0.0.1:8787/  Metrics: /metrics
    """
    from meterline.console import console, fail
    from meterline.errors import UserError, require_kafka, writable_dir
    from meterline.settings import get_settings

    from .store import running_up

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    if (other := running_up(settings)) is not None:
        fail(f"`meterline up` already runs for {settings.data_dir} (API {other}); stop it first or set METERLINE_DATA_DIR")
    writable_dir(settings.data_dir, "METERLINE_DATA_DIR")
    if sinks > 1 and settings.dsn.partition("://")[0].lower() == "chdb":
        raise UserError(f"--sinks {sinks} needs a ClickHouse server: embedded chDB allows one process per data directory; "
                        "set METERLINE_CLICKHOUSE_DSN=http://... or run one sink")
    require_kafka(settings)  # a wrong bootstrap is one line now, not components in a restart loop
    pipeline = Up(settings, port=port, host=host, streams=0 if no_streams else stream_workers, allocator=not no_allocator,
                  webhook=webhook, sinks=sinks)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = pipeline.start()
    except UserError:  # one line that says what to do (meterline.cli.main prints it)
        pipeline.stop()
        raise
    except Exception as err:  # noqa: BLE001 - one clear line
        log.debug("start failed", exc_info=True)
        pipeline.stop()
        fail(f"could not start: {err}")
    console.print(f"[green]meterline up[/]: dashboard {url}/  ·  metrics {url}/metrics  ·  Ctrl-C stops")
    try:
        pipeline.run_until(stop)
    finally:
        console.print("stopping: stream worker checkpoints, sink drains and commits…")
        pipeline.stop()
