"""`pytest --containers` (or METERLINE_TEST_CONTAINERS=1): the Kafka and ClickHouse tests against
testcontainers' Kafka (KRaft) and ClickHouse server, so the http:// DSN path meets a real server.

Loaded by tests/conftest.py. Without the option nothing here runs and nothing here is imported
beyond this module: the default path is the project's own broker and chDB, and needs no Docker.
With it, a Docker engine that does not answer fails the run with one line; it never skips and
never falls back. Each test gets a database of its own on the one server (dropped afterwards),
as each gets its own chdb:// directory otherwise.

Images: METERLINE_TEST_KAFKA_IMAGE (testcontainers' KafkaContainer drives Confluent's image) and
METERLINE_TEST_CLICKHOUSE_IMAGE (default: the one deploy/docker-compose.yml runs).
"""
from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

ENV = "METERLINE_TEST_CONTAINERS"
KAFKA_IMAGE = os.environ.get("METERLINE_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")
CLICKHOUSE_IMAGE = os.environ.get("METERLINE_TEST_CLICKHOUSE_IMAGE", "clickhouse/clickhouse-server:25.8")
INSTALL = "pip install -e '.[test,containers]'"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--containers", action="store_true", default=False,
                     help=f"run the Kafka and ClickHouse tests against testcontainers (needs Docker; also {ENV}=1)")


def enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("containers", False)) or os.environ.get(ENV, "").strip().lower() in {"1", "true", "yes"}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Before anything is collected: with containers on, Docker must answer and testcontainers be installed."""
    if not enabled(session.config):
        return
    problem = docker_problem()
    if problem:
        raise pytest.UsageError(f"--containers needs a Docker engine: {problem}")
    try:
        _modules()
    except ImportError as err:
        raise pytest.UsageError(f"--containers needs testcontainers: {INSTALL} ({_one_line(err)})") from None


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:500]


def docker_problem() -> str | None:
    """Why no Docker engine answers, or None when one does.

    With testcontainers installed, its own client asks (it also reads ~/.testcontainers.properties and the
    docker context); without it, a plain GET /_ping on DOCKER_HOST, so the answer does not depend on the
    optional packages being there."""
    try:
        from testcontainers.core.docker_client import DockerClient
    except ImportError:
        return _ping_problem(os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    try:
        DockerClient().client.ping()
    except Exception as err:  # noqa: BLE001 - whatever it is, it is the reason
        return _one_line(err)
    return None


def _ping_problem(host: str) -> str | None:
    import httpx

    if host.startswith("unix://"):
        transport, url = httpx.HTTPTransport(uds=host.removeprefix("unix://")), "http://docker/_ping"
    elif host.startswith("tcp://"):
        scheme = "https" if os.environ.get("DOCKER_TLS_VERIFY") else "http"
        transport, url = None, f"{scheme}://{host.removeprefix('tcp://')}/_ping"
    else:
        return None  # ssh://, npipe://: only the docker client can tell; it comes with testcontainers
    try:
        with httpx.Client(transport=transport, timeout=10) as client:
            answer = client.get(url)
    except httpx.HTTPError as err:
        return f"{host}: {_one_line(err)}"
    if answer.status_code != 200:
        return f"{host}: /_ping answered {answer.status_code}"
    return None


def _modules() -> tuple[Any, Any]:
    """(KafkaContainer, ClickHouseContainer): testcontainers >= 4.15 keeps them under community/."""
    try:
        from testcontainers.community.clickhouse import ClickHouseContainer
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        from testcontainers.clickhouse import ClickHouseContainer
        from testcontainers.kafka import KafkaContainer
    return KafkaContainer, ClickHouseContainer


# ---------------------------------------------------------------- session containers


@pytest.fixture(scope="session")
def kafka_container() -> Iterator[str]:
    """The bootstrap address of a single-node KRaft broker in a container, for the whole session."""
    kafka_cls, _ = _modules()
    container = None
    try:  # constructing one already asks Docker
        container = kafka_cls(KAFKA_IMAGE).with_kraft()
        container.start(timeout=180)
    except Exception as err:  # noqa: BLE001
        _stop_quietly(container)
        pytest.fail(f"--containers: the Kafka container ({KAFKA_IMAGE}) did not come up: {_one_line(err)}", pytrace=False)
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


@pytest.fixture(scope="session")
def clickhouse_server() -> Iterator[str]:
    """http://user:pass@host:port of a ClickHouse server in a container, for the whole session."""
    _, clickhouse_cls = _modules()
    user, password = "meterline", secrets.token_hex(12)  # hex: nothing to quote in a DSN
    container = None
    try:
        container = clickhouse_cls(CLICKHOUSE_IMAGE, username=user, password=password, dbname="meterline")
        container.start()
    except Exception as err:  # noqa: BLE001
        _stop_quietly(container)
        pytest.fail(f"--containers: the ClickHouse container ({CLICKHOUSE_IMAGE}) did not come up: {_one_line(err)}",
                    pytrace=False)
    try:
        yield f"http://{user}:{password}@{container.get_container_host_ip()}:{container.get_exposed_port(8123)}"
    finally:
        container.stop()


def _stop_quietly(container: Any) -> None:
    """A container that started but never became ready is removed now (testcontainers' reaper would, later)."""
    if container is not None:
        try:
            container.stop()
        except Exception:  # noqa: BLE001, S110 - it is already the failure being reported
            pass


# ---------------------------------------------------------------- what conftest.py asks


def kafka_bootstrap(request: pytest.FixtureRequest) -> str | None:
    """The container broker's address with containers on, else None (the project's broker)."""
    return request.getfixturevalue("kafka_container") if enabled(request.config) else None


def clickhouse_dsn(request: pytest.FixtureRequest) -> str | None:
    """With containers on: a DSN for a database of this test's own on the server, dropped after the
    test; else None (a chdb:// directory)."""
    if not enabled(request.config):
        return None
    import clickhouse_connect

    base = request.getfixturevalue("clickhouse_server")
    name = database_name(request.node.name)
    admin = clickhouse_connect.get_client(dsn=base)
    create_database(admin, name)

    def drop() -> None:
        try:
            drop_database(admin, name)
        finally:
            admin.close()

    request.addfinalizer(drop)
    return f"{base}/{name}"


def database_name(test_name: str) -> str:
    """`t_<test name, as an identifier>_<8 hex>`: readable on the server, unique per run of a test."""
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", test_name).strip("_")[:48]
    return f"t_{stem}_{uuid.uuid4().hex[:8]}"


def create_database(client: Any, name: str) -> None:
    from meterline.sql.ledger import quote_identifier

    client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(name)}")


def drop_database(client: Any, name: str) -> None:
    from meterline.sql.ledger import quote_identifier

    client.command(f"DROP DATABASE IF EXISTS {quote_identifier(name)} SYNC")
