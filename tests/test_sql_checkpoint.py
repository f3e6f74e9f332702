"""The sink's checkpoint decisions (sql/checkpoint.py), pure logic with a fake consumer.

The exactly-once behaviour end to end (crashes, rebalances, a real broker and chDB) is in
tests/test_sql_sink.py, tests/test_streams_ledger_crash.py and tests/test_chaos.py."""
from __future__ import annotations

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from meterline.sql.checkpoint import Checkpoint, Seen


class FakeConsumer:
    """Assignment and cached high watermarks as librdkafka reports them (-1001 before the first fetch)."""

    def __init__(self, highs: dict[tuple[str, int], int], broken: set[tuple[str, int]] = frozenset()):
        self.highs, self.broken, self.commits = highs, broken, []

    def assignment(self):
        return [TopicPartition(t, p) for t, p in self.highs]

    def get_watermark_offsets(self, tp, cached=False):
        assert cached, "the sink must not queue a watermark request behind a held fetch"
        if (tp.topic, tp.partition) in self.broken:
            raise RuntimeError("no such partition")
        return 0, self.highs[(tp.topic, tp.partition)]

    def commit(self, offsets, asynchronous):
        self.commits.append(([(o.topic, o.partition, o.offset) for o in offsets], asynchronous))


def test_assign_resumes_from_the_ledger_and_from_the_beginning_where_it_holds_nothing():
    cp = Checkpoint()
    parts = [TopicPartition("priced", 0), TopicPartition("priced", 1)]
    cp.assign(parts, {("priced", 0): (40, 47, {40, 41, 43, 47})})
    assert [tp.offset for tp in parts] == [40, OFFSET_BEGINNING]
    assert cp.position == {("priced", 0): 40, ("priced", 1): 0}
    assert cp.replay == {("priced", 0): (47, {40, 41, 43, 47})}


def test_the_replayed_batch_skips_stored_offsets_and_flags_the_dead_lettered_ones():
    cp = Checkpoint()
    cp.assign([TopicPartition("priced", 0)], {("priced", 0): (40, 43, {40, 41, 43})})
    key = ("priced", 0)
    verdicts = []
    for offset in (40, 41, 42, 43, 44, 45):
        verdicts.append(cp.classify(key, offset))
        cp.advance(key, offset)
    assert verdicts == [Seen.STORED, Seen.STORED, Seen.REDELIVERED, Seen.STORED, Seen.NEW, Seen.NEW]
    assert key not in cp.replay  # past the replayed batch: forgotten
    assert cp.position[key] == 46


def test_an_offset_behind_the_position_was_taken_already():
    cp = Checkpoint()
    cp.assign([TopicPartition("priced", 3)], {})
    cp.advance(("priced", 3), 9)
    assert cp.classify(("priced", 3), 5) is Seen.TAKEN  # redelivered after a pause/resume
    assert cp.classify(("priced", 3), 10) is Seen.NEW


def test_revoke_forgets_only_the_revoked_partitions():
    cp = Checkpoint()
    cp.assign([TopicPartition("priced", 0), TopicPartition("priced", 1)],
              {("priced", 0): (5, 6, {5, 6}), ("priced", 1): (2, 3, {3})})
    cp.revoke([TopicPartition("priced", 0)])
    assert list(cp.position) == [("priced", 1)] and list(cp.replay) == [("priced", 1)]


def test_lag_and_drained_read_one_watermark_helper():
    cp = Checkpoint()
    cp.assign([TopicPartition("priced", 0), TopicPartition("priced", 1)], {})
    cp.advance(("priced", 0), 9)
    consumer = FakeConsumer({("priced", 0): 10, ("priced", 1): -1001})
    assert cp.lag(consumer) == {("priced", 0): 0}      # no watermark yet: no lag figure
    assert not cp.drained(consumer)                     # ... and not drained: its first fetch is not back
    consumer.highs[("priced", 1)] = 4
    assert cp.lag(consumer) == {("priced", 0): 0, ("priced", 1): 4}
    assert not cp.drained(consumer)
    for offset in range(4):
        cp.advance(("priced", 1), offset)
    assert cp.drained(consumer)
    consumer.broken = {("priced", 1)}
    assert not cp.drained(consumer) and cp.lag(consumer) == {("priced", 0): 0}
    assert not cp.drained(FakeConsumer({}))             # nothing assigned: never drained


def test_commit_sends_each_partitions_next_offset_asynchronously():
    consumer = FakeConsumer({})
    Checkpoint.commit(consumer, {("priced", 0): 12, ("spend", 2): 3})
    assert consumer.commits == [([("priced", 0, 12), ("spend", 2, 3)], True)]
