"""`kafka start --secure`: SASL/SCRAM-SHA-512 and ACLs on the project's own broker. Every role does its
job with its own principal (agent, collector, streams, sink, allocator, through the real components),
an agent is refused what is not its own, and a wrong password is one line from the CLI.

One secured broker for the module (its own ports and data dir); jars are the session broker's.
"""
from __future__ import annotations

import http.server
import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from brokers import committed_sum, free_port, share_jars
from collectors_kafka import wait_for
from meterline import kafka_acl
from meterline.broker import BrokerError, LocalBroker
from meterline.settings import KafkaSecurity, Settings
from meterline.topics import create_topics

pytestmark = [pytest.mark.kafka, pytest.mark.xdist_group("kafka_secure")]  # one process makes the module fixtures
METERLINE = str(Path(sys.executable).with_name("meterline"))
PREFIX = "sec"


wait_until = partial(wait_for, step=0.01)  # WAIT_S: a subprocess (the Faust alerts job) starts slowly on a loaded machine


class Secured:
    def __init__(self, broker: LocalBroker, bootstrap: str, root: Path):
        self.broker, self.bootstrap, self.root = broker, bootstrap, root

    def password(self, user: str) -> str:
        return json.loads(self.broker.credentials_file.read_text())["users"][user]

    def as_user(self, user: str, password: str | None = None) -> Settings:
        """Client settings of one principal, with a data dir (spools, ledger) of its own."""
        return Settings(data_dir=self.root / "clients" / user, kafka_bootstrap=self.bootstrap, topic_prefix=PREFIX,
                        clickhouse_dsn=f"chdb://{self.root / 'ledger'}",
                        kafka_security=KafkaSecurity(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                                                     sasl_username=user, sasl_password=password or self.password(user)))

    def cli_env(self, user: str | None = None, password: str | None = None) -> dict[str, str]:
        """Environment of a `meterline` subprocess: this broker's data dir and ports, optionally a principal."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
        s = self.broker.settings
        env.update(METERLINE_DATA_DIR=str(s.data_dir), METERLINE_KAFKA_PORT=str(s.kafka_port),
                   METERLINE_KAFKA_CONTROLLER_PORT=str(s.kafka_controller_port), METERLINE_TOPIC_PREFIX=PREFIX,
                   METERLINE_CLICKHOUSE_DSN=f"chdb://{self.root / 'ledger'}")
        if user:
            env.update(kafka_acl.client_env(user, password or self.password(user)), METERLINE_KAFKA_BOOTSTRAP=self.bootstrap,
                       METERLINE_DATA_DIR=str(self.root / "clients" / user))
        return env


def broker_settings(root: Path, kafka_secure: bool = True) -> Settings:
    """A broker of its own under root/broker on free ports, with the session broker's jars (no Maven again)."""
    return Settings(data_dir=share_jars(root / "broker"), kafka_bootstrap=None, kafka_port=free_port(), kafka_controller_port=free_port(),
                    kafka_secure=kafka_secure, topic_prefix=PREFIX)


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Secured:
    root = tmp_path_factory.mktemp("secure")
    broker = LocalBroker(broker_settings(root))
    try:
        status = broker.start(timeout=120)
    except BrokerError as err:
        pytest.fail(f"the secured Kafka broker did not come up: {err}", pytrace=False)
    try:
        env = Secured(broker, status.bootstrap, root)
        create_topics(env.as_user(kafka_acl.ADMIN))
        yield env
    finally:
        broker.stop()


def meterline(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([METERLINE, *args], env=env, capture_output=True, text=True, timeout=timeout)


# ---- the broker and its credentials -----------------------------------------------------------------


def test_secure_start_again_keeps_the_passwords_and_reports_every_principal(secured):
    creds = secured.broker.credentials_file
    before = creds.read_text()
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE(secured.broker.config_file.stat().st_mode) == 0o600  # it holds the admin's password too
    assert set(json.loads(before)["users"]) == set(kafka_acl.USERS)

    again = meterline(secured.cli_env(), "kafka", "start", "--secure", "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["running"], report["pid"], report["secure"]) == (True, secured.broker._pid_alive(), True)
    assert [p["user"] for p in report["principals"]] == list(kafka_acl.USERS)
    agent = next(p for p in report["principals"] if p["user"] == "agent")
    assert f"WRITE topic {PREFIX}.usage.v1" in agent["acls"] and f"READ topic {PREFIX}.control.v1" in agent["acls"]
    assert creds.read_text() == before  # reused, not made again

    exports = meterline(secured.cli_env(), "kafka", "start", "--secure", "--env", "agent")
    assert exports.returncode == 0, exports.stderr
    assert f"export METERLINE_KAFKA_SASL_PASSWORD={secured.password('agent')}" in exports.stdout.splitlines()
    assert "export METERLINE_KAFKA_SASL_USERNAME=agent" in exports.stdout.splitlines()

    status = meterline(secured.cli_env(), "kafka", "status", "--json")  # the readiness probe signs in as admin
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["running"] is True
    plain = meterline(secured.cli_env(), "kafka", "start")  # a secured broker is not silently taken for an open one
    assert plain.returncode != 0 and "--secure" in plain.stderr


def test_a_password_the_broker_refuses_is_said_at_once(secured, monkeypatch):
    """Readiness signs in as admin: a wrong admin password is named, not waited out as "no answer"."""
    broker = LocalBroker(secured.broker.settings)
    real = broker.credentials()
    monkeypatch.setattr(broker, "credentials", lambda: {**real, "users": {**real["users"], "admin": "stale"}})
    with pytest.raises(BrokerError, match="refused the admin of .*credentials.json: SASL authentication error"):
        broker.start(timeout=60)
    assert secured.broker.status().running  # the real admin still gets in


def test_storage_formatted_without_secure_gets_its_admin_and_keeps_its_topics(tmp_path):
    plain = LocalBroker(broker_settings(tmp_path, kafka_secure=False))
    bootstrap = plain.start(timeout=120).bootstrap
    try:
        create_topics(Settings(data_dir=tmp_path / "c", kafka_bootstrap=bootstrap, topic_prefix=PREFIX))
    finally:
        plain.stop()
    secure = LocalBroker(plain.settings.model_copy(update={"kafka_secure": True}))
    try:
        assert secure.start(timeout=120).topics >= 9  # the catalog, seen by the admin
        assert json.loads(secure.credentials_file.read_text())["admin_ready"] is True
        agent = Secured(secure, bootstrap, tmp_path).as_user("agent")
        assert write_error(agent, "usage") is None and write_error(agent, "control") == KafkaError.TOPIC_AUTHORIZATION_FAILED
        assert write_error(agent, "spend") is None   # a guard's session announcement
    finally:
        secure.stop()


# ---- every role does its job with its own principal ---------------------------------------------


def test_every_role_does_its_job_with_only_its_own_grants(secured):
    from meterline.allocator.budgets import publish_policy
    from meterline.allocator.engine import Engine, EngineConfig
    from meterline.allocator.guard import DecisionFeed
    from meterline.allocator.service import run_in_thread
    from meterline.collectors.sdk import Meter
    from meterline.schemas.events import PRIORITIES, BudgetPolicy
    from meterline.streams.worker import StreamWorker

    # admin: a budget (operators set budgets with the admin principal)
    publish_policy(secured.as_user("admin"), BudgetPolicy(policy_id="acme-budget", tenant_id="acme", scope="tenant",
                                                          scope_id="acme", amount=Decimal("100"), hard=True,
                                                          actions={p: "deny" for p in PRIORITIES}))
    # allocator: budgets and spend in, decisions out, in its own group
    allocator_settings = secured.as_user("allocator")
    service, stop, thread = run_in_thread(allocator_settings, Engine(EngineConfig()), tick=0.02,
                                          group_id=allocator_settings.group("allocator"))
    feed = None
    try:
        assert service.ready.wait(30), "the allocator did not read the budgets topic"
        # agent: the SDK's decision feed reads control ...
        feed = DecisionFeed(secured.as_user("agent"), tenants={"acme"}).start()
        assert feed.wait_ready(30)
        wait_until(lambda: feed.decisions.get("tenant:acme:normal"), "the allocator's decision reached the agent")
        # ... and its Meter sends usage
        meter = Meter(secured.as_user("agent"), tenant_id="acme", team="core", agent_id="planner", session_id="s-1")
        for i in range(5):
            meter.record_llm("openai", "gpt-4o", 1000 + i, 100)
        assert meter.flush(30) and meter.sender.stats.delivered == 5, meter.sender.stats
        meter.close()
        # collector: the real command, principal from METERLINE_KAFKA_* variables
        gpu = meterline(secured.cli_env("collector"), "collect", "gpu", "--simulate", "--once", "--json", "--node", "n1")
        assert gpu.returncode == 0, gpu.stderr
        samples = len(gpu.stdout.splitlines())
        assert samples > 0
        node = meterline(secured.cli_env("collector"), "collect", "node", "--once", "--json", "--interval", "0.3", "--node", "n1")
        assert node.returncode == 0, node.stderr
        compute_samples = len(node.stdout.splitlines())
        assert compute_samples > 0

        # streams: usage and GPU samples in (its group), priced, spend and its changelog out
        worker = StreamWorker(secured.as_user("streams"), checkpoint_interval=0.5, publish_interval=0.2)
        stats = worker.run(until_caught_up=True)
        assert stats["priced"] == 5 and stats["gpu_samples"] == samples and not stats["dead_letters"], stats
        wait_until(lambda: service.counts["spend"] > 0, "the allocator read the streams' spend")
    finally:
        stop.set()
        thread.join(30)
        if feed is not None:
            feed.close()
    assert service.counts["kafka_errors"] == 0, service.counts

    # sink: priced (and the rest) into the ledger, in its own group
    sink = meterline(secured.cli_env("sink"), "sink", "--until-idle", "2", "--batch-seconds", "0.2")
    assert sink.returncode == 0, sink.stdout + sink.stderr
    rows = meterline(secured.cli_env("sink"), "sql", "SELECT count() AS n FROM priced_events", "--format", "json")
    assert rows.returncode == 0, rows.stderr
    assert json.loads(rows.stdout) == [{"n": 5}]
    rows = meterline(secured.cli_env("sink"), "sql", "SELECT count() AS n FROM compute_samples", "--format", "json")
    assert json.loads(rows.stdout) == [{"n": compute_samples}]  # the sink may read what the collector may write
    committed = committed_offsets(secured.as_user("admin"), allocator_settings.group("sink"), f"{PREFIX}.priced.v1")
    assert committed == 5


class Webhook(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.delivered: list[dict] = []
        super().__init__(("127.0.0.1", 0), WebhookHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.server.delivered.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_alerts_job_delivers_with_its_own_principal(secured):
    """Faust: its group, the anomalies it reads, and the leader topic it creates for itself."""
    from meterline.schemas.events import Anomaly, build, new_id, utcnow

    now, hook = utcnow(), Webhook()
    alert = build(Anomaly, anomaly_id=new_id(), ts=now, kind="spend_spike", severity="critical", tenant_id="acme",
                  scope="tenant", scope_id="acme", window_start=now - timedelta(seconds=10), window_end=now,
                  evidence={"observed_usd": "4.2"}, message="spend far above its baseline")
    producer = Producer(secured.as_user("allocator").kafka_config())  # the allocator raises anomalies too
    producer.produce(f"{PREFIX}.anomalies.v1", alert.to_json(), b"acme")
    assert producer.flush(60) == 0
    job = subprocess.Popen([METERLINE, "alerts", "--webhook", f"http://127.0.0.1:{hook.server_port}/hook"],
                           env=secured.cli_env("alerts"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: hook.delivered or job.poll() is not None, "the alerts job delivered the anomaly")
    finally:
        job.terminate()
        out, _ = job.communicate(timeout=60)
        hook.shutdown()
    assert [d["anomaly"]["anomaly_id"] for d in hook.delivered] == [str(alert.anomaly_id)], out[-3000:]


def committed_offsets(settings: Settings, group: str, topic: str) -> int:
    consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return committed_sum(consumer, [TopicPartition(topic, p) for p in parts])
    finally:
        consumer.close()


# ---- and nothing more ----------------------------------------------------------------------------


def read_error(settings: Settings, topic: str, group: str) -> int | None:
    """The error code a consumer in `group` gets subscribing to `topic` (None: it read a record, or nothing came)."""
    consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False, "log_level": 0,
                                                 "auto.offset.reset": "earliest"}))
    try:
        consumer.subscribe([settings.topic(topic)])
        deadline = time.monotonic() + 60  # the refusal comes after a metadata round trip: slow on a loaded machine
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                return msg.error().code() if msg.error() else None
        return None
    finally:
        consumer.close()


def write_error(settings: Settings, topic: str) -> int | None:
    errors: list = []
    producer = Producer(settings.kafka_config(**{"log_level": 0, "message.timeout.ms": 60_000}))
    producer.produce(settings.topic(topic), b"{}", b"acme", on_delivery=lambda err, msg: errors.append(err))
    producer.flush(90)  # returns at the delivery report; a timeout would read as an error code, not as a refusal
    assert errors, "no delivery report"
    return errors[0].code() if errors[0] else None


def test_an_agent_cannot_read_priced_or_spend_nor_write_control(secured):
    agent = secured.as_user("agent")
    guard_group = f"meterline-guard-{uuid.uuid4().hex}"  # a group the agent may use
    assert read_error(agent, "priced", guard_group) == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert read_error(agent, "spend", guard_group) == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert write_error(agent, "control") == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert write_error(agent, "budgets") == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # nor commit in a server-side group (it would move the streams' offsets)
    assert read_error(agent, "control", f"{PREFIX}-streams") == KafkaError.GROUP_AUTHORIZATION_FAILED
    # a collector sends GPU samples, not usage; the sink writes no decisions
    assert write_error(secured.as_user("collector"), "usage") == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert write_error(secured.as_user("sink"), "control") == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # what it may do still works (the refusals above are ACLs, not a broken client)
    assert write_error(agent, "usage") is None


def test_a_wrong_password_is_one_clear_line(secured):
    done = meterline(secured.cli_env("agent", password="not-the-password"), "topics", "create", timeout=60)
    out = (done.stdout + done.stderr).strip()
    assert done.returncode != 0, out
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    assert "authentication" in out.lower() and "refused the credentials" in out, out
    assert done.returncode == 2 and "METERLINE_KAFKA_SASL_PASSWORD" in out, out


def test_the_pipeline_user_is_the_server_side_union_and_never_the_agents():
    def allowed(role: str) -> set[tuple]:  # what Kafka lets it do: READ and WRITE imply DESCRIBE
        grants = set(kafka_acl.grants(role, s))
        return grants | {(kind, name, prefixed, "DESCRIBE") for kind, name, prefixed, op in grants if op in ("READ", "WRITE")}

    s = Settings(topic_prefix=PREFIX)
    pipeline = allowed("pipeline")
    for role in ("streams", "sink", "allocator", "alerts"):
        assert allowed(role) <= pipeline, role
    assert ("topic", s.topic("usage"), False, "WRITE") in pipeline  # up's OTLP endpoint sends usage for agents
    assert ("group", "meterline-guard-", True, "READ") not in pipeline
    assert ("topic", s.topic("gpu"), False, "WRITE") not in pipeline  # only collectors send GPU samples
    assert ("topic", s.topic("compute"), False, "WRITE") not in pipeline  # and CPU and memory samples


def test_the_replay_principal_replays_a_dead_letter_and_may_not_write_control(secured):
    """`meterline dlq replay --yes` as the `replay` user: its idempotent producer writes anomalies; control is not its."""
    from meterline.schemas import events as ev

    now = ev.utcnow()
    anomaly = ev.build(ev.Anomaly, anomaly_id=ev.new_id(), ts=now, kind="unpriced_model", severity="warning",
                       tenant_id="acme", scope="model", scope_id="m", window_start=now, window_end=now)
    payload, _ = ev.dead_letter_payload(anomaly.to_json(), "")
    letter = ev.DeadLetter(dlq_id=ev.new_id(), ts=now, stage="alerts", source_topic=f"{PREFIX}.anomalies.v1", partition=0,
                           offset=0, reason="secure-replay-test", error_type="HTTPStatusError", payload_b64=payload)
    producer = Producer(secured.as_user("admin").kafka_config())
    producer.produce(f"{PREFIX}.dlq.v1", letter.to_json())
    assert producer.flush(30) == 0
    sink = meterline(secured.cli_env("sink"), "sink", "--until-idle", "2", "--batch-seconds", "0.2")
    assert sink.returncode == 0, sink.stdout + sink.stderr
    done = meterline(secured.cli_env("replay"), "dlq", "replay", "--reason-contains", "secure-replay-test", "--yes", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["replayed"] == 1
    assert write_error(secured.as_user("replay"), "control") == KafkaError.TOPIC_AUTHORIZATION_FAILED
