"""The on-disk spool, and the SDK when the spool or its queue is full: drops are counted, the agent never waits."""
from __future__ import annotations

import logging
import socket
import threading

import pytest
from prometheus_client import REGISTRY

from collectors_kafka import wait_for
from meterline.collectors import Meter, Spool
from meterline.settings import Settings


def test_records_come_back_in_order_across_segments(tmp_path):
    spool = Spool(tmp_path / "s", max_bytes=1 << 20, segment_bytes=200)
    records = [(b"k%d" % i, b"value-%03d" % i) for i in range(40)]
    assert all(spool.append(k, v) for k, v in records)
    replayed = []
    while (oldest := spool.oldest()) is not None:
        path, batch = oldest
        replayed.extend(batch)
        spool.remove(path)
    assert replayed == records and spool.bytes == 0


def test_a_full_spool_refuses_the_newest_record(tmp_path):
    spool = Spool(tmp_path / "s", max_bytes=100, segment_bytes=60)
    accepted = [spool.append(b"k", b"x" * 30) for _ in range(5)]
    assert accepted == [True, True, False, False, False]
    assert spool.bytes <= 100
    assert spool.append(b"k", b"x" * 30, force=True)  # a failed replay returns to the tail whatever the limit


def test_a_torn_tail_is_skipped_and_counted_and_the_rest_survives_a_restart(tmp_path):
    spool = Spool(tmp_path / "s")
    spool.append(b"a", b"first")
    spool.append(b"b", b"second")
    spool.close()
    segment = next((tmp_path / "s").glob("*.seg"))
    segment.write_bytes(segment.read_bytes()[:-3])  # a crash in the middle of the second write
    reopened = Spool(tmp_path / "s")
    path, batch = reopened.oldest()
    assert batch == [(b"a", b"first")] and reopened.corrupt_records == 1


def test_a_second_process_gets_its_own_directory(tmp_path):
    first = Spool(tmp_path / "agent")
    second = Spool(tmp_path / "agent")
    assert first.directory != second.directory and second.directory.name == "agent.1"
    first.close()
    third = Spool(tmp_path / "agent")  # adopts what the first one left
    assert third.directory == first.directory


def _dead_bootstrap() -> str:
    with socket.socket() as s:  # a port nobody listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _dropped_metric(topic: str, *reasons: str) -> float:
    return sum(REGISTRY.get_sample_value("meterline_sdk_events_dropped_total", {"topic": topic, "reason": r}) or 0
               for r in reasons)


def test_spool_full_drops_are_counted_logged_and_exported_and_the_agent_never_waits(tmp_path, caplog):
    settings = Settings(data_dir=tmp_path, kafka_bootstrap=_dead_bootstrap())
    meter = Meter(settings, tenant_id="acme", agent_id="loop", queue_max=50, spool_max_bytes=20_000,
                  spool_segment_bytes=4_000, delivery_timeout_ms=1000)
    spool, gate = meter.sender._spool, threading.Event()
    real_append = spool.append

    def slow_disk(key, value, force=False):
        gate.wait()  # the background thread is stuck on the disk ...
        return real_append(key, value, force)

    meter.record_llm("openai", "gpt-4o", 1, 1)
    wait_for(lambda: meter.sender.outage, "the outage to be noticed")
    spool.append = slow_disk
    topic = meter.sender.topic
    before = _dropped_metric(topic, "queue_full", "spool_full")
    total = 1 + 500
    with caplog.at_level(logging.WARNING, logger="meterline.collectors"):
        for i in range(500):  # ... and yet every call returns: the queue never waits
            meter.record_llm("openai", "gpt-4o", i, 1)
        queue_drops = meter.stats.drop_reasons.get("queue_full", 0)
        assert queue_drops >= 500 - 50 - 1  # beyond the queue's 50 slots, the newest were dropped
        gate.set()
        wait_for(lambda: meter.stats.spooled + meter.stats.dropped == total and not len(meter.sender._producer),
                 "every record to be spooled or dropped")
    stats = meter.stats
    assert stats.drop_reasons.get("spool_full", 0) > 0, "the 20 kB spool should have filled up"
    assert stats.spooled > 0 and stats.spooled + stats.dropped == total and meter.dropped == stats.dropped
    assert _dropped_metric(topic, "queue_full", "spool_full") - before == stats.dropped
    assert any("dropped" in r.getMessage() and "queue_full" in r.getMessage() for r in caplog.records)
    meter.close(timeout=0)
    assert meter.sender.spooled_bytes <= 20_000


def test_recording_after_close_is_counted_not_lost_silently(tmp_path):
    meter = Meter(Settings(data_dir=tmp_path, kafka_bootstrap=_dead_bootstrap()), tenant_id="acme", delivery_timeout_ms=1000)
    meter.close(timeout=0)
    meter.record_llm("openai", "gpt-4o", 1, 1)
    assert meter.stats.drop_reasons == {"closed": 1}


@pytest.mark.parametrize("policy", ["always", "never"])
def test_fsync_policies_write_the_same_records(tmp_path, policy):
    spool = Spool(tmp_path / policy, fsync=policy)
    spool.append(b"k", b"v")
    assert spool.oldest()[1] == [(b"k", b"v")]
