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
import socket
import subprocess
import sys
from decimal import Decimal
from functools import partial

import httpx
import pytest

from meterline.collectors.sdk import Meter
from meterline.schemas.events import UsageEvent, new_id, utcnow
from meterline.settings import Settings
from meterline.streams.pricing import load_catalog

import collectors_kafka  # the tests' shared Kafka helpers

CLI = [sys.executable, "-c", "from meterline.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def start_up(env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([*CLI, "up"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def healthy():
        if proc.poll() is not None:
            raise AssertionError(f"up exited: {proc.stderr.read()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, "up to become healthy")
    return proc


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
        assert proc.wait(120) == 0, proc.stderr.read()[-3000:]
    assert not (settings.data_dir / "up.json").exists()
    direct = totals(env)  # nothing runs: the CLI opens the store itself
    assert direct["priced_events"] <= 500

    proc = start_up(env, port)  # a restart resumes where the last run stopped
    try:
        wait_for(lambda: totals(env)["priced_events"] >= 500, "all 500 events after the restart")
        final = totals(env)
        assert final["priced_events"] == 500  # exactly once
        assert Decimal(final["usage_cost_usd"]) == want  # to the last digit
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0


def test_up_runs_one_stream_worker_per_requested_core(settings):
    """--stream-workers N: N workers in one consumer group, each with its own static member id."""
    from meterline.app.up import ProcessComponent, Up

    workers = [c for c in Up(settings, streams=2).supervisor.components if isinstance(c, ProcessComponent)]
    assert [c.name for c in workers] == ["streams", "streams-2"]
    groups = {c.argv[c.argv.index("--group") + 1] for c in workers}
    assert len(groups) == 1                                   # one group: Kafka splits the partitions
    assert "--instance-id" in workers[1].argv
    assert not [c for c in Up(settings, streams=0).supervisor.components if isinstance(c, ProcessComponent)]


def test_up_with_a_webhook_supervises_the_alerts_job(settings):
    from meterline.app.up import ProcessComponent, Up

    def children(**kw):
        return {c.name: c.argv for c in Up(settings, **kw).supervisor.components if isinstance(c, ProcessComponent)}

    assert "alerts" not in children()
    argv = children(webhook="http://hooks.example/x")["alerts"]
    assert argv[argv.index("alerts"):] == ["alerts", "--webhook", "http://hooks.example/x"]
