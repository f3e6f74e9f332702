"""The real broker: every contract round-trips through Kafka; the broker's lifecycle keeps data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from meterline.schemas import (
    Anomaly, BudgetPolicy, DeadLetter, GpuSample, PricedEvent, SpendUpdate, ThrottleDecision, UsageEvent,
    decode, new_id, utcnow,
)
from meterline.settings import Settings
from meterline.topics import CATALOG, create_topics

from brokers import free_port, share_jars

NOW = utcnow()


def samples() -> dict[str, list]:
    """One valid record of every contract, keyed by the topic it travels on."""
    usage = UsageEvent(event_id=new_id(), ts=NOW, tenant_id="acme", team="t", project="p", agent_id="a", session_id="s",
                       kind="llm_call", provider="openai", model="gpt-4o", input_tokens=120, output_tokens=30,
                       cache_read_tokens=100, cost_usd=Decimal("0.000123456789"))
    priced = PricedEvent(**usage.model_dump(), list_cost_usd=Decimal("0.0002"), cost_source="provider",
                         catalog_version="test", priced_at=NOW)
    return {
        "usage": [usage],
        "priced": [priced],
        "gpu": [GpuSample(sample_id=new_id(), ts=NOW, node="n1", level="mig", gpu_index=0, gpu_uuid="GPU-1",
                          mig_uuid="MIG-1", mig_profile="1g.18gb", mig_slices=1, mig_total_slices=7, interval_ms=5000,
                          utilization_pct=40, simulated=True)],
        "spend": [SpendUpdate(update_id=new_id(), ts=NOW, tenant_id="acme", scope="session", scope_id="s",
                              window_start=NOW - timedelta(minutes=1), window_end=NOW, window_cost_usd=Decimal("1.5"),
                              period_start=NOW.replace(day=1), period_cost_usd=Decimal("99.000000000001"))],
        "anomalies": [Anomaly(anomaly_id=new_id(), ts=NOW, kind="spend_spike", severity="warning", tenant_id="acme",
                              scope="tenant", scope_id="acme", window_start=NOW, window_end=NOW, evidence={"rate": "12.5"})],
        "control": [ThrottleDecision(decision_id=new_id(), tenant_id="acme", scope="tenant", scope_id="acme", priority="low",
                                     action="throttle", reason="pacing", issued_at=NOW, expires_at=NOW + timedelta(seconds=30))],
        "budgets": [BudgetPolicy(policy_id="acme-monthly", tenant_id="acme", scope="tenant", scope_id="acme", amount=Decimal("1000"))],
        "dlq": [DeadLetter(dlq_id=new_id(), ts=NOW, stage="validate", source_topic="x", partition=0, offset=1,
                           reason="invalid UsageEvent: tenant_id: Field required", error_type="InvalidEvent", payload_b64="e30=")],
    }


def consume_all(settings: Settings, topic: str, count: int) -> list:
    consumer = Consumer(settings.kafka_config(**{"group.id": f"g-{new_id()}", "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    got = []
    try:
        for _ in range(200):
            if len(got) >= count:
                break
            got += [m for m in consumer.consume(count, timeout=0.5) if m.error() is None]
    finally:
        consumer.close()
    return got


def test_every_contract_round_trips_through_the_broker(settings):
    producer = Producer(settings.kafka_config(**{"enable.idempotence": True, "acks": "all"}))
    records = samples()
    for topic, batch in records.items():
        for record in batch:
            producer.produce(settings.topic(topic), record.to_json(), key=b"acme")
    assert producer.flush(30) == 0
    for topic, batch in records.items():
        messages = consume_all(settings, settings.topic(topic), len(batch))
        assert [decode(type(r), m.value()) for r, m in zip(batch, messages)] == batch


def test_catalog_topics_exist_with_their_config(settings):
    admin = AdminClient(settings.kafka_config())
    meta = admin.list_topics(timeout=10).topics
    for spec in CATALOG:
        assert len(meta[settings.topic(spec.name)].partitions) == spec.partitions
    from confluent_kafka.admin import ConfigResource
    control = ConfigResource(ConfigResource.Type.TOPIC, settings.topic("control"))
    config = admin.describe_configs([control])[control].result(10)
    assert config["cleanup.policy"].value == "compact"


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meterline", *args], env=env, capture_output=True, text=True, timeout=300)


def test_broker_lifecycle_keeps_topics_and_data(tmp_path: Path):
    """kafka start twice, status, stop, start again: topics and records survive."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env |= {"METERLINE_DATA_DIR": str(share_jars(tmp_path)), "METERLINE_KAFKA_PORT": "29192",
            "METERLINE_KAFKA_CONTROLLER_PORT": "29193", "METERLINE_TOPIC_PREFIX": "life"}
    settings = Settings(data_dir=tmp_path, kafka_port=29192, kafka_controller_port=29193, topic_prefix="life")
    try:
        first = cli(env, "kafka", "start", "--json")
        assert first.returncode == 0, first.stderr
        second = cli(env, "kafka", "start", "--json")
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["pid"] == json.loads(first.stdout)["pid"]  # idempotent: same broker
        assert cli(env, "topics", "create").returncode == 0
        assert json.loads(cli(env, "kafka", "status", "--json").stdout)["running"] is True

        producer = Producer(settings.kafka_config())
        producer.produce(settings.topic("usage"), b"survives-restart")
        assert producer.flush(30) == 0

        assert cli(env, "kafka", "stop").returncode == 0
        assert cli(env, "kafka", "status").returncode == 1
        assert cli(env, "kafka", "start").returncode == 0
        assert json.loads(cli(env, "topics", "create", "--json").stdout)[settings.topic("usage")] == "exists"
        assert [m.value() for m in consume_all(settings, settings.topic("usage"), 1)] == [b"survives-restart"]
    finally:
        cli(env, "kafka", "stop")


def test_a_bootstrap_naming_the_brokers_own_port_starts_it(tmp_path: Path):
    """METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:<METERLINE_KAFKA_PORT> (a shell that exports both) starts the local
    broker; before, `kafka start` took it for an external cluster, started nothing and waited 90 s."""
    port, controller = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env |= {"METERLINE_DATA_DIR": str(share_jars(tmp_path)), "METERLINE_KAFKA_PORT": str(port), "METERLINE_KAFKA_CONTROLLER_PORT": str(controller),
            "METERLINE_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}
    try:
        started = cli(env, "kafka", "start", "--json")
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["managed"] is True and json.loads(started.stdout)["pid"]
        assert json.loads(cli(env, "kafka", "status", "--json").stdout)["running"] is True
    finally:
        assert "stopped" in cli(env, "kafka", "stop").stdout


def test_missing_java_is_one_clear_line(tmp_path: Path):
    env = {"PATH": "/nonexistent", "METERLINE_DATA_DIR": str(tmp_path), "METERLINE_KAFKA_PORT": "29292",
           "METERLINE_KAFKA_CONTROLLER_PORT": "29293", "HOME": str(tmp_path)}
    result = cli(env, "kafka", "start")
    assert result.returncode != 0
    assert "`java` was not found" in result.stderr and "install" in result.stderr


@pytest.mark.parametrize("round_", range(5))  # made just before, gpu is often not listed yet: 17 of 30 were left short once
def test_a_topic_with_fewer_partitions_than_the_catalog_is_grown(kafka_bootstrap, round_):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"grow{uuid.uuid4().hex[:8]}")
    admin = AdminClient(settings.kafka_config())
    gpu = settings.topic("gpu")
    admin.create_topics([NewTopic(gpu, 6, 1)])[gpu].result(30)  # a deployment from before gpu matched usage
    try:
        assert create_topics(settings)[gpu] == "grown to 12"
        assert len(admin.list_topics(gpu, timeout=10).topics[gpu].partitions) == 12
        assert create_topics(settings)[gpu] == "exists"
    finally:
        admin.delete_topics([settings.topic(spec.name) for spec in CATALOG])


class _Metadata:
    """What AdminClient.list_topics returns, as far as create_topics reads it."""
    def __init__(self, partitions: dict[str, int]):
        part = type("Partition", (), {"leader": 0, "error": None})
        self.topics = {name: type("Topic", (), {"error": None, "partitions": {i: part() for i in range(n)}})()
                       for name, n in partitions.items()}


class _Done:
    def result(self, timeout=None):
        return None


class _FreshTopicAdmin:
    """A broker on which `gpu` was created a moment ago with 6 partitions: KRaft's first metadata
    lists it with none yet (the race that once failed CI), later ones with all 6."""
    def __init__(self, gpu: str):
        self.gpu, self.partitions, self.calls = gpu, {gpu: 6}, 0

    def list_topics(self, topic=None, timeout=None):
        self.calls += 1
        return _Metadata({**self.partitions, self.gpu: 0} if self.calls == 1 else self.partitions)

    def create_partitions(self, new, operation_timeout=None):
        self.partitions.update({p.topic: p.new_total_count for p in new})
        return {p.topic: _Done() for p in new}

    def create_topics(self, new, operation_timeout=None):
        self.partitions.update({t.topic: t.num_partitions for t in new})
        return {t.topic: _Done() for t in new}


class _Exists:
    def result(self, timeout=None):
        raise KafkaException(KafkaError(KafkaError.TOPIC_ALREADY_EXISTS))


class _UnlistedTopicAdmin(_FreshTopicAdmin):
    """The same broker a moment earlier: its metadata does not list `gpu` until a request to create it is refused
    as already there (seen against the real broker: 14 of 15 fresh clients did not list a topic made just before)."""
    def __init__(self, gpu: str):
        super().__init__(gpu)
        self.hidden = True

    def list_topics(self, topic=None, timeout=None):
        return _Metadata({k: v for k, v in self.partitions.items() if not (self.hidden and k == self.gpu)})

    def create_topics(self, new, operation_timeout=None):
        self.hidden = False
        made = {t.topic: t.num_partitions for t in new if t.topic not in self.partitions}
        self.partitions.update(made)
        return {t.topic: _Done() if t.topic in made else _Exists() for t in new}


@pytest.mark.parametrize("broker", [_FreshTopicAdmin, _UnlistedTopicAdmin], ids=["listed-without-partitions", "not-listed-yet"])
def test_a_topic_made_a_moment_ago_is_still_grown(monkeypatch, broker):
    settings = Settings(kafka_bootstrap="127.0.0.1:1", topic_prefix="race")
    admin = broker(settings.topic("gpu"))
    monkeypatch.setattr("meterline.topics.AdminClient", lambda config: admin)
    result = create_topics(settings)
    assert result[settings.topic("gpu")] == "grown to 12" and admin.partitions[settings.topic("gpu")] == 12
    assert admin.partitions == {settings.topic(s.name): s.partitions for s in CATALOG}
