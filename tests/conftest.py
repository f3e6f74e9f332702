"""Shared fixtures: a real Kafka broker (never a mock) and per-test topics and data dirs.

The broker is METERLINE_KAFKA_BOOTSTRAP when set (make test starts one), otherwise the
project's own broker is started here. A broker that cannot start fails the run; it
never skips. `--containers` (tests/containers.py) puts both on testcontainers instead.
"""
from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from meterline.broker import BrokerError, LocalBroker
from meterline.settings import Settings
from meterline.topics import create_topics

pytest.register_assert_rewrite("containers")  # a plugin (below), imported here first
import containers  # noqa: E402

pytest_plugins = ["containers"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def kafka_bootstrap(request) -> str:
    if containers.enabled(request.config):
        return containers.kafka_bootstrap(request)
    if os.environ.get("METERLINE_KAFKA_BOOTSTRAP"):
        settings = Settings()
    else:
        settings = Settings(data_dir=REPO / ".meterline-test", kafka_port=19092, kafka_controller_port=19093)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(settings.data_dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # pytest -n N: one process starts the broker, the others find it up
            return LocalBroker(settings).start(timeout=120).bootstrap
    except BrokerError as err:
        pytest.fail(f"Kafka is required for these tests and did not come up: {err}", pytrace=False)


@pytest.fixture
def settings(request, tmp_path: Path, kafka_bootstrap: str):
    """Settings for one test: its own topic prefix (fresh topics) and its own data dir.

    The test's topics are deleted afterwards, so a long suite leaves a lean broker."""
    s = Settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        clickhouse_dsn=containers.clickhouse_dsn(request) or f"chdb://{tmp_path / 'clickhouse'}",
    )
    create_topics(s)
    yield s
    delete_topics_with_prefix(s)


def delete_topics_with_prefix(s: Settings) -> None:
    admin = AdminClient(s.kafka_config())
    doomed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(s.topic_prefix + ".")]
    for future in (admin.delete_topics(doomed, operation_timeout=30) if doomed else {}).values():
        future.exception(30)  # best effort: a failed delete only leaves a topic behind


@pytest.fixture
def own_broker(tmp_path: Path):
    """A broker of this test's own, to freeze or restart without disturbing others; yields
    (broker, its status, Settings for a fresh prefix and store on it)."""
    from brokers import free_port, share_jars

    broker = LocalBroker(Settings(data_dir=share_jars(tmp_path / "broker"), kafka_bootstrap=None,  # not make test's broker
                                  kafka_port=free_port(), kafka_controller_port=free_port()))
    try:
        status = broker.start(timeout=120)
    except BrokerError as err:
        pytest.fail(f"a second Kafka broker did not come up: {err}", pytrace=False)
    assert status.pid, status  # ours to freeze and restart
    settings = Settings(data_dir=tmp_path / "data", kafka_bootstrap=status.bootstrap, topic_prefix="own",
                        clickhouse_dsn=f"chdb://{tmp_path / 'clickhouse'}")
    create_topics(settings)
    try:
        yield broker, status, settings
    finally:
        broker.stop()
