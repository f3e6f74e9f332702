"""Why the project's broker did not start, in one line: its own reason from server.log."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from meterline.broker import BrokerError, LocalBroker
from meterline.settings import Settings

from brokers import free_port, share_jars


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return share_jars(tmp_path)


def test_a_port_held_by_another_program_is_named_with_the_brokers_own_reason(data_dir):
    with socket.socket() as squatter:  # listens, but is no Kafka: `start` cannot tell before the JVM tries to bind
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = LocalBroker(Settings(data_dir=data_dir, kafka_bootstrap=None, kafka_port=port,
                                      kafka_controller_port=free_port()))
        with pytest.raises(BrokerError) as failed:
            broker.start(timeout=120)
    message = str(failed.value)
    assert "\n" not in message, message
    assert f"bind to 127.0.0.1:{port}: Address already in use" in message, message  # server.log's words, with the address
    assert "METERLINE_KAFKA_PORT" in message and str(broker.server_log) in message, message
    assert not broker.pid_file.exists()  # nothing left that looks like a running broker
