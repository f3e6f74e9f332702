"""The sink's checkpoint: where each partition resumes, what an offset means, and the offset commit.

The ledger, not Kafka, holds the truth. On assignment each partition resumes at the `_batch_start`
of its last stored row (a crash can split a batch that spans months: one insert per month
partition), and the offsets of that last batch already stored are skipped on the way. An offset
of that replayed range that is *not* stored was dead-lettered before the crash (`REDELIVERED`):
it is checked again but never dead-lettered twice. The Kafka commit after each insert is only a
hint for tools (lag, `meterline up`'s progress watch); the sink never reads it.

Pure bookkeeping apart from `resume_points` (one query per topic to the ledger) and the consumer
calls in `commit` and `unread`; tests/test_sql_checkpoint.py drives it with fakes.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from . import ledger

log = logging.getLogger("meterline.sink")
TP = tuple[str, int]


class Seen(enum.Enum):
    """What an offset read from Kafka is to the ledger."""

    NEW = "new"                  # not in the ledger: a row to make
    TAKEN = "taken"              # read already in this assignment (redelivered after a pause/resume): ignore
    STORED = "stored"            # in the ledger's last batch (re-read after a restart): skip, but advance
    REDELIVERED = "redelivered"  # in the replayed range, not stored: dead-lettered before a crash


def resume_points(client: Any, tables: dict[str, ledger.LedgerTable], cluster: str | None,
                  topics: set[str]) -> dict[TP, tuple[int, int, set[int]]]:
    """Per stored partition: (its last batch's first offset, highest stored offset, stored offsets of that batch)."""
    out: dict[TP, tuple[int, int, set[int]]] = {}
    for topic in topics & set(tables):
        table = ledger.write_table(tables[topic].name, cluster)
        rows = client.query(
            f"SELECT _partition, max(_offset), argMax(_batch_start, _offset) FROM {table} "
            "WHERE _topic = {t:String} GROUP BY _partition", parameters={"t": topic}).result_rows
        for partition, hi, batch_start in rows:
            present = {r[0] for r in client.query(
                f"SELECT _offset FROM {table} WHERE _topic = {{t:String}} AND _partition = {{p:UInt32}} "
                "AND _offset >= {lo:UInt64}", parameters={"t": topic, "p": partition, "lo": batch_start}).result_rows}
            out[(topic, partition)] = (batch_start, hi, present)
    return out


@dataclass
class Checkpoint:
    replay: dict[TP, tuple[int, set[int]]] = field(default_factory=dict)  # (highest stored offset, stored offsets of its last batch)
    position: dict[TP, int] = field(default_factory=dict)  # next offset to read, per assigned partition
    last_lag: int = 0  # total lag the consuming thread last measured (the insert thread may not ask the consumer)

    def assign(self, partitions: list[TopicPartition], resume: dict[TP, tuple[int, int, set[int]]]) -> None:
        """Set each partition's start offset (in place, for `consumer.assign`) from the ledger's resume points."""
        for tp in partitions:
            key = (tp.topic, tp.partition)
            start, hi, present = resume.get(key, (OFFSET_BEGINNING, -1, set()))
            tp.offset = start
            if hi >= 0:
                self.replay[key] = (hi, present)
            self.position[key] = start if start >= 0 else 0

    def revoke(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.replay.pop((tp.topic, tp.partition), None)
            self.position.pop((tp.topic, tp.partition), None)

    def classify(self, key: TP, offset: int) -> Seen:
        if offset < self.position.get(key, 0):
            return Seen.TAKEN
        replay = self.replay.get(key)
        if replay is None:
            return Seen.NEW
        hi, present = replay
        if offset > hi:
            del self.replay[key]  # past the replayed batch: nothing more to skip on this partition
            return Seen.NEW
        return Seen.STORED if offset in present else Seen.REDELIVERED

    def advance(self, key: TP, offset: int) -> None:
        self.position[key] = offset + 1

    def unread(self, consumer: Any) -> dict[TP, int | None]:
        """Per assigned partition: records between our position and the high watermark its last fetch reported,
        or None while it has none (first fetch not back: -1001, or the client cannot say). Cached watermarks:
        asking the broker instead queues behind the fetch it is holding, fetch.wait.max.ms per partition."""
        out: dict[TP, int | None] = {}
        for tp in consumer.assignment():
            key = (tp.topic, tp.partition)
            try:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
            except Exception:  # noqa: BLE001 - unknown, as before the first fetch
                high = -1
            out[key] = max(0, high - self.position.get(key, 0)) if high >= 0 else None
        return out

    def lag(self, consumer: Any) -> dict[TP, int]:
        """Messages not yet in the ledger, per assigned partition with a known watermark."""
        return {key: n for key, n in self.unread(consumer).items() if n is not None}

    def drained(self, consumer: Any) -> bool:
        """Partitions assigned, and each read to its known high watermark."""
        unread = self.unread(consumer)
        return bool(unread) and all(n == 0 for n in unread.values())

    @staticmethod
    def commit(consumer: Any, next_offset: dict[TP, int]) -> None:
        """Commit what was inserted (asynchronously): a hint for tools; the ledger is the truth."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offset.items()]
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
        except Exception as err:  # noqa: BLE001 - a hint only
            log.debug("offset commit skipped: %s", err)
