"""The sink's batching: what a batch holds, when it is flushed, and the one insert allowed in flight.

A batch is flushed when it holds `rows` rows, or when it has taken any offset and is `seconds` old
(an offset alone counts: a batch of skipped or dead-lettered records still commits). One flush at
a time runs in a worker thread (`InFlight`) while the next batch is decoded; a flush first waits
for the one before it, so batches land and commit strictly in order.

Pure logic apart from the thread; tests/test_sql_batching.py drives it with fakes.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from confluent_kafka import Message

from meterline.schemas import events as ev

TP = tuple[str, int]


@dataclass
class TableBatch:
    """Rows of one table waiting for the next insert."""

    # staged tables: the record's JSON with its Kafka columns appended (None once dead-lettered), and the originals
    lines: list[bytes | None] = field(default_factory=list)
    msgs: list[Message] = field(default_factory=list)
    already_dead: set[int] = field(default_factory=set)  # line indices dead-lettered before a crash
    binary: set[int] = field(default_factory=set)  # line indices that are priced.v2 RowBinary rows, not JSON
    # other tables: rows as dicts by month partition, and their ids (parallel to the rows)
    dict_rows: dict[int, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    ids: dict[int, list[tuple[str, datetime]]] = field(default_factory=lambda: defaultdict(list))
    dict_msgs: dict[int, list[Message]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class Batch:
    tables: dict[str, TableBatch] = field(default_factory=lambda: defaultdict(TableBatch))
    dead: list[ev.DeadLetter] = field(default_factory=list)
    anomalies: list[ev.Anomaly] = field(default_factory=list)  # conflicting duplicates (sql/firstwrite.py)
    redelivered: set[tuple[str, int, int]] = field(default_factory=set)  # dead-lettered before a crash
    start: dict[TP, int] = field(default_factory=dict)  # first offset per partition in this batch
    next_offset: dict[TP, int] = field(default_factory=dict)  # what to commit
    rows: int = 0
    opened: float = field(default_factory=time.monotonic)
    nonce: int = field(default_factory=lambda: secrets.randbits(64))  # ends each binary row (framing check)


@dataclass(frozen=True)
class FlushPolicy:
    rows: int = 50_000
    seconds: float = 1.0

    def due(self, batch: Batch, now: float) -> bool:
        return batch.rows >= self.rows or (bool(batch.next_offset) and now - batch.opened >= self.seconds)


def idle_exit_due(idle_exit_s: float | None, got_messages: bool, last_activity: float, now: float,
                  drained: Callable[[], bool]) -> bool:
    """`run(idle_exit_s=...)`: nothing arrived that long since the last record or assignment, and every assigned
    partition is read to its end (joining the group, or a first fetch, may take longer than idle_exit_s)."""
    return idle_exit_s is not None and not got_messages and now - last_activity > idle_exit_s and drained()


class InFlight:
    """At most one flush running in a worker thread; its batch is handed back for the commit, its error re-raised,
    both in the consuming thread (the Kafka client is not shared)."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.inserted: Batch | None = None

    def start(self, flush: Callable[[Batch], bool], batch: Batch) -> None:
        def work() -> None:
            try:
                if flush(batch):
                    self.inserted = batch
            except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
                self.error = err
        self.thread = threading.Thread(target=work, name="ledger-insert", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return self.thread is not None

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def finished(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def join(self, while_waiting: Callable[[], None], patience: float = 0.5) -> Batch | None:
        """Wait for the flush; after `patience` s, call `while_waiting` (it keeps the group alive and returns once
        the thread is done). Returns the batch to commit (None if the flush gave up); re-raises the flush's error."""
        thread = self.thread
        if thread is None:
            return None
        thread.join(patience)
        if thread.is_alive():
            while_waiting()
        thread.join()
        inserted, error = self.inserted, self.error
        self.thread = self.inserted = self.error = None
        if error is not None:
            raise error
        return inserted

    def abandon(self) -> None:
        """Wait for the thread and forget its outcome (partitions revoked: the next owner redoes it)."""
        if self.thread is not None:
            self.thread.join()
        self.thread = self.inserted = self.error = None
