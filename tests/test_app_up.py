"""`meterline up` as a user runs it: a child process on the real broker and an embedded chDB store.

Events go in through the agent SDK; reports and SQL come back through up's API while it
runs; a killed stream worker is restarted; SIGTERM stops gracefully and a restart picks
up every event exactly once. The test process never opens the store itself (chDB: one
process per data directory), it asks the CLI.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from decimal import Decimal
from functools import partial
from pathlib import Path

import httpx
import pytest

from meterline.collectors.sdk import Meter
from meterline.schemas.events import UsageEvent, new_id, utcnow
from meterline.settings import Settings
from meterline.streams.pricing import load_catalog

import collectors_kafka  # the tests' shared Kafka helpers
from brokers import free_port

CLI = [sys.executable, "-c", "from meterline.cli import main; main()"]


def env_for(settings: Settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(METERLINE_KAFKA_BOOTSTRAP=settings.bootstrap, METERLINE_TOPIC_PREFIX=settings.topic_prefix,
               METERLINE_DATA_DIR=str(settings.data_dir), METERLINE_CLICKHOUSE_DSN=settings.dsn,
               METERLINE_API_PORT=str(port))
    return env


wait_for = partial(collectors_kafka.wait_for, step=0.3)  # conditions here query the API or run the CLI


def meterline(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def log_tail(text: str, chars: int = 3000) -> str:
    """The end of a log, or, after a native crash, all of faulthandler's dump from where it begins: it lists
    every thread's stack (the crashing one need not be last), and a short tail would cut it off."""
    start = text.rfind("Fatal Python error")
    return text[start:] if start >= 0 else text[-chars:]


def start_up(env: dict[str, str], port: int, log: Path | None = None) -> subprocess.Popen:
    """`meterline up`, healthy. With `log`, its log goes to that file: an outage makes it log a lot, and a
    pipe nobody reads would block it."""
    proc = subprocess.Popen([*CLI, "up"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "ab") if log else subprocess.PIPE, text=True)

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f"up exited: {log_tail(log.read_text() if log else proc.stderr.read())}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, "up to become healthy")
    except BaseException:  # one that never got healthy would hold its ports and the chDB dir for the rest of the run
        stop_and_reap(proc)
        raise
    return proc


def stop_and_reap(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM (up checkpoints and drains), SIGKILL if it does not go, then reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def send(settings: Settings, n: int, session: str) -> list[UsageEvent]:
    """n LLM calls through the SDK; returns the events as the pipeline will price them."""
    meter = Meter(settings, tenant_id="acme", team="search", project="p", agent_id="bot", session_id=session, register_pid=False)
    events = []
    for i in range(n):
        events.append(UsageEvent(event_id=new_id(), ts=utcnow(), tenant_id="acme", team="search", project="p", agent_id="bot",
                                 session_id=session, kind="llm_call", provider="openai", model="gpt-4o",
                                 input_tokens=1000 + i, output_tokens=100 + i, cache_read_tokens=i))
        meter.send(events[-1])
    assert meter.flush(30)
    meter.close()
    return events


def totals(env: dict[str, str]) -> dict:
    (row,) = json.loads(meterline(env, "report", "totals", "--since", "1d", "-f", "json"))["rows"]
    return row


@pytest.fixture
def up_env(settings):
    port = free_port()
    return settings, env_for(settings, port), port


def test_up_serves_reports_restarts_the_dead_and_loses_nothing_on_sigterm(up_env):
    settings, env, port = up_env
    catalog = load_catalog()
    proc = start_up(env, port)
    try:
        first = send(settings, 300, "s-1")
        want = sum((catalog.price_usage(e).cost_usd for e in first), Decimal(0))
        wait_for(lambda: totals(env)["priced_events"] == 300, "300 priced events in the ledger (through the API)")
        assert Decimal(totals(env)["usage_cost_usd"]) == want
        rows = json.loads(meterline(env, "sql", "SELECT count() AS n, uniqExact(event_id) AS ids FROM priced_events", "-f", "json"))
        assert rows == [{"n": 300, "ids": 300}]

        health = httpx.get(f"http://127.0.0.1:{port}/health").json()["components"]
        assert set(health) == {"sink", "allocator", "streams", "live", "api"}
        os.kill(health["streams"]["pid"], signal.SIGKILL)  # the stream worker dies…
        restarted = wait_for(lambda: (c := httpx.get(f"http://127.0.0.1:{port}/health").json()["components"]["streams"])
                             ["restarts"] >= 1 and c["running"] and c, "the stream worker to be restarted")
        assert restarted["pid"] != health["streams"]["pid"]

        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "meterline_usage_events_total 300.0" in metrics
        restarts = float(re.search(r'meterline_component_restarts_total\{component="streams"\} (\S+)', metrics)[1])
        assert restarts >= 1  # (a restart that hits a transient broker error at startup is retried: 2)
        assert "meterline_dead_letters_total" in metrics and "meterline_decision_latency_seconds_bucket" in metrics

        second = send(settings, 200, "s-2")  # …then up is stopped while these are in flight
        want += sum((catalog.price_usage(e).cost_usd for e in second), Decimal(0))
    finally:
        proc.send_signal(signal.SIGTERM)
        code, log = proc.wait(120), proc.stderr.read()
        assert code == 0, log[-3000:]
    assert "the API has no token" in log  # an open API says so at start
    assert not (settings.data_dir / "up.json").exists()
    direct = totals(env)  # nothing runs: the CLI opens the store itself
    assert direct["priced_events"] <= 500

    meterline(env, "token", "create", "--name", "ops", "--role", "reader")  # from now on the API wants a token
    proc = start_up(env, port)  # a restart resumes where the last run stopped
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/api/live").status_code == 401
        # the CLI still reads through up: it takes the reader token up left in its 0600 runfile
        wait_for(lambda: totals(env)["priced_events"] >= 500, "all 500 events after the restart")
        final = totals(env)
        assert final["priced_events"] == 500  # exactly once
        assert Decimal(final["usage_cost_usd"]) == want  # to the last digit
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0


def test_start_up_stops_and_reaps_an_up_that_never_got_healthy(monkeypatch):
    """A test that gave up waiting left `meterline up` running: its ports and chDB dir stayed taken for the rest of the run."""
    started = []

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def give_up(condition, what):
        raise AssertionError(f"gave up waiting for {what}")

    real_popen = subprocess.Popen
    monkeypatch.setattr(sys.modules[__name__], "CLI", [sys.executable, "-c", "import time; time.sleep(600)"])
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(sys.modules[__name__], "wait_for", give_up)
    with pytest.raises(AssertionError, match="gave up waiting for up to become healthy"):
        start_up(dict(os.environ), free_port())
    (proc,) = started
    assert proc.returncode is not None  # stopped and reaped (not a zombie, not running)


def test_up_runs_one_stream_worker_per_requested_core(settings):
    """--stream-workers N: N workers in one consumer group, each with its own static member id."""
    from meterline.app.up import ProcessComponent, Up

    workers = [c for c in Up(settings, streams=2).supervisor.components if isinstance(c, ProcessComponent)]
    assert [c.name for c in workers] == ["streams", "streams-2"]
    groups = {c.argv[c.argv.index("--group") + 1] for c in workers}
    assert len(groups) == 1                                   # one group: Kafka splits the partitions
    ids = [c.argv[c.argv.index("--instance-id") + 1] for c in workers]
    assert len(set(ids)) == 2                                 # each a static member: a restart resumes at once
    assert not [c for c in Up(settings, streams=0).supervisor.components if isinstance(c, ProcessComponent)]


def test_up_with_a_webhook_supervises_the_alerts_job(settings):
    from meterline.app.up import ProcessComponent, Up

    def children(**kw):
        return {c.name: c.argv for c in Up(settings, **kw).supervisor.components if isinstance(c, ProcessComponent)}

    assert "alerts" not in children()
    argv = children(webhook="http://hooks.example/x")["alerts"]
    assert argv[argv.index("alerts"):] == ["alerts", "--webhook", "http://hooks.example/x", "--give-up-after", "900.0"]
    # it waits (lag, no commits) while a webhook is down: judged stalled only after it would have given up,
    # since a restart would start its give-up clock again and the anomaly would never be dead-lettered
    supervisor = Up(settings, webhook="http://hooks.example/x").supervisor
    alerts = supervisor.get("alerts")
    alerts.alive, alerts.lag, alerts.last_progress = (lambda: True), 3, time.monotonic() - 600
    assert alerts.stalled(supervisor.stall_after_s)                 # past the others' limit ...
    assert supervisor.health()["alerts"]["stalled"] is False        # ... but not its own


def test_a_frozen_consumer_is_reported_stalled_and_restarted(up_env):
    """A live process can still be frozen (issue 10: a deadlocked commit looked 'running, 0 restarts').
    Here the stream worker is SIGSTOPped while events wait: /health turns it stalled (503), the
    supervisor kills and restarts it, and every event is priced exactly once.

    Every step waits for what it checks, never for time: on a loaded machine a worker can also be judged
    stalled while it starts (CI saw stalls == 2), so stalls are counted from the freeze on."""
    settings, env, port = up_env
    env = {**env, "METERLINE_STALL_AFTER_S": "4"}
    proc = start_up(env, port)
    base = f"http://127.0.0.1:{port}"
    health = lambda: httpx.get(f"{base}/health", timeout=30)  # noqa: E731
    try:
        send(settings, 50, "s-1")
        wait_for(lambda: totals(env)["priced_events"] == 50, "the first events in the ledger")
        # lag 0 read from Kafka: it has committed all it read, so nothing can judge it stalled before the freeze
        frozen = wait_for(lambda: (c := health().json()["components"]["streams"])["running"] and c["lag"] == 0 and c,
                          "a running stream worker with nothing left to read")
        assert frozen["stalled"] is False and "last_progress_s" in frozen
        os.kill(frozen["pid"], signal.SIGSTOP)
        send(settings, 100, "s-2")

        def seen_stalled():  # /health and /metrics in one look: the supervisor may replace the worker right after
            r = health()
            if r.status_code != 503 or not r.json()["components"]["streams"]["stalled"]:
                return None
            metrics = httpx.get(f"{base}/metrics", timeout=30).text
            return re.search(r'meterline_component_stalled\{component="streams"\} 1\.0', metrics) and (r.json(), metrics)

        stalled, metrics = wait_for(seen_stalled, "/health and /metrics to report the frozen stream worker stalled")
        assert stalled["status"] == "degraded" and stalled["components"]["streams"]["lag"] > 0
        assert stalled["components"]["streams"]["pid"] == frozen["pid"]
        assert float(re.search(r'meterline_component_last_progress_seconds\{component="streams"\} (\S+)', metrics)[1]) >= 4  # (rounded to 0.1 s)
        after = wait_for(lambda: (r := health()).status_code == 200
                         and (c := r.json()["components"]["streams"])["pid"] != frozen["pid"] and c,
                         "the stalled worker to be replaced")
        assert after["stalls"] > frozen.get("stalls", 0) and after["restarts"] >= 1
        assert after["last_error"].startswith("stalled")  # replaced for the stall, not for a crash
        assert not Path(f"/proc/{frozen['pid']}").exists()  # the frozen one was killed (and reaped), not left beside
        wait_for(lambda: totals(env)["priced_events"] == 150, "every event priced after the restart")
        assert json.loads(meterline(env, "sql", "SELECT uniqExact(event_id) AS ids FROM priced_events", "-f", "json")) == [{"ids": 150}]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, proc.stderr.read()[-3000:]


def test_progress_is_judged_only_while_kafka_can_be_read(settings):
    """Pure supervision logic: lag with committed offsets that do not move is a stall; no lag, or moving
    offsets, is progress; while Kafka cannot be read nobody is judged, so a broker outage restarts nothing."""
    import threading
    import time

    from meterline.app.up import ProgressWatch, ThreadComponent

    c = ThreadComponent("sink", lambda: None, group="g", topics=("priced",))
    c.alive = lambda: True
    c.observe(10, 5, now=100.0)
    c.observe(10, 5, now=200.0)             # same offsets, still lag
    assert c.stalled(60, now=200.0) and not c.stalled(120, now=200.0)
    c.observe(12, 5, now=201.0)             # offsets moved
    assert not c.stalled(60, now=250.0)
    c.observe(12, 0, now=400.0)             # nothing to read is not a stall
    assert not c.stalled(60, now=400.0)

    class KafkaAway:
        def progress(self, group, topics):
            raise RuntimeError("broker down")

    c.observe(12, 7, now=time.monotonic() - 1000)
    watch, stop, reads = ProgressWatch(settings, [c], every=0.01), threading.Event(), []

    def observe(kafka):
        reads.append(1)
        KafkaAway().progress("g", [])

    watch.observe = observe
    runner = threading.Thread(target=watch.run, args=(stop,))
    runner.start()
    # a second read attempt means the first failure was handled (its client may be slow to make on a loaded machine)
    wait_for(lambda: len(reads) >= 2, "two reads of Kafka that fail")
    stop.set()
    runner.join()
    assert not c.stalled(60)


def test_an_instance_restarted_for_stalling_gets_more_time_before_the_next_judgement():
    """A replacement that starts slowly (a busy machine, a long restore) must not be killed in a loop:
    the stall limit doubles with each restart in a row."""
    import time

    from meterline.app.up import Supervisor, ThreadComponent

    c = ThreadComponent("streams", lambda: None, group="g", topics=("usage",))
    c.observe(10, 5, now=time.monotonic() - 10)  # 10 s with lag and no progress
    supervisor = Supervisor([c], stall_after_s=4)
    assert c.stalled(supervisor.patience(c))
    c.failures_in_a_row = 2  # restarted twice in a row: 16 s of patience
    assert supervisor.patience(c) == 16 and not c.stalled(supervisor.patience(c))
    assert supervisor.health()["streams"]["stalled"] is False


def test_a_component_not_started_yet_reports_no_progress_since_up_began_not_since_the_machine_booted():
    """/health and /metrics showed a consumer waiting to start (up starts them one by one) as idle for the
    machine's uptime (last_progress_s 2025.6 in a demo data dir), since its clock started at 0."""
    from meterline.app.up import ThreadComponent

    began = time.monotonic()
    component = ThreadComponent("streams", lambda: None, group="g", topics=("usage",))
    assert component.state()["last_progress_s"] <= round(time.monotonic() - began, 1) + 0.1


def test_stopping_up_leaves_ledger_clients_open_while_a_thread_that_did_not_stop_may_use_them(settings):
    """A component thread that outlives its stop timeout (or was abandoned for stalling) may still be inside a
    query: closing its chDB client under it can crash the process. Those clients are left to process exit."""
    import threading

    from meterline.app.up import ThreadComponent, Up

    class Stubborn:  # ignores the stop event until released
        def __init__(self):
            self.release = threading.Event()

        def run(self, stop):
            self.release.wait()

    class Client:
        closed = False

        def close(self):
            self.closed = True

    pipeline = Up(settings, streams=0, allocator=False)
    stubborn = ThreadComponent("sink", Stubborn)
    pipeline.supervisor.components = [stubborn]
    stubborn.start()
    stubborn.stop(timeout=0.01)  # did not stop in time
    pipeline._clients = [left := Client()]
    pipeline._release()
    assert not left.closed

    stubborn.abandon()  # replaced for a stall: the old thread still runs
    pipeline._clients = [left := Client()]
    pipeline._release()
    assert not left.closed

    stubborn.instance.release.set()  # once every thread is gone, the clients are closed
    wait_for(lambda: not stubborn.stuck(), "the stubborn thread to end")
    pipeline._clients = [done := Client()]
    pipeline._release()
    assert done.closed
