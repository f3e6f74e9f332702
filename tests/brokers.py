"""Helpers for tests that run a broker of their own: free ports, and the session broker's jars (no Maven again)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from meterline.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def share_jars(data_dir: Path) -> Path:
    """Link the session broker's Kafka jars into data_dir, so a fresh broker there skips the Maven download
    (~20-40 s a broker on a loaded machine); without a session broker it downloads as a user's would."""
    for jars in (Settings().data_dir / "kafka" / "libs", REPO / ".meterline-test" / "kafka" / "libs"):
        if any(jars.glob("kafka_2.13-*.jar")):
            (data_dir / "kafka").mkdir(parents=True, exist_ok=True)
            os.symlink(jars, data_dir / "kafka" / "libs")
            break
    return data_dir


def committed_sum(consumer, tps, timeout: float = 30.0) -> int:
    """Committed offsets summed over `tps` (none yet counts 0), read while the coordinator moves (a bare
    `committed()` failed a CI run with NOT_COORDINATOR)."""
    from meterline.topics import committed_offsets

    return sum(max(tp.offset, 0) for tp in committed_offsets(consumer, tps, timeout))
