"""When the sink flushes, and its one insert in flight (sql/batching.py): pure logic and a real thread."""
from __future__ import annotations

import threading

import pytest

from meterline.sql.batching import Batch, FlushPolicy, InFlight, idle_exit_due


def test_a_batch_is_due_when_full_or_old_and_holding_an_offset():
    policy = FlushPolicy(rows=3, seconds=1.0)
    batch = Batch(opened=100.0)
    assert not policy.due(batch, now=500.0)              # old but empty: nothing to commit
    batch.next_offset[("priced", 0)] = 7                  # only skipped records: still commits
    assert not policy.due(batch, now=100.5)
    assert policy.due(batch, now=101.0)
    full = Batch(opened=100.0, rows=3)
    assert policy.due(full, now=100.0)


def test_idle_exit_waits_for_silence_and_for_every_partition_read_to_its_end():
    drained = {"value": False}
    check = lambda: drained["value"]  # noqa: E731
    assert not idle_exit_due(None, False, 0.0, 99.0, check)   # no idle exit asked
    assert not idle_exit_due(2.0, True, 0.0, 99.0, check)     # records just arrived
    assert not idle_exit_due(2.0, False, 98.0, 99.0, check)   # not idle long enough
    assert not idle_exit_due(2.0, False, 0.0, 99.0, check)    # idle, but a partition has unread records
    drained["value"] = True
    assert idle_exit_due(2.0, False, 0.0, 99.0, check)


def test_inflight_hands_back_the_inserted_batch_and_keeps_the_group_alive_while_it_runs():
    release, waited = threading.Event(), []
    inflight, batch = InFlight(), Batch()
    inflight.start(lambda b: release.wait(10), batch)
    assert inflight.busy and inflight.running() and not inflight.finished()

    def while_waiting():  # the sink polls here (rebalance callbacks); the flush finishes meanwhile
        waited.append(True)
        release.set()
        while inflight.running():
            pass
    assert inflight.join(while_waiting, patience=0.01) is batch
    assert waited and not inflight.busy


def test_inflight_reraises_the_flush_error_and_returns_nothing_for_a_revoked_flush():
    inflight = InFlight()
    inflight.start(lambda b: (_ for _ in ()).throw(ConnectionError("ClickHouse is down")), Batch())
    with pytest.raises(ConnectionError):
        inflight.join(lambda: None)
    assert not inflight.busy
    inflight.start(lambda b: False, Batch())               # partitions revoked mid-flush: nothing to commit
    assert inflight.join(lambda: None) is None
    inflight.start(lambda b: True, Batch())
    inflight.abandon()                                     # revoke: wait for it and forget the outcome
    assert not inflight.busy and inflight.join(lambda: None) is None
