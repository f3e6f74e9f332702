"""A stand-in for confluent_kafka.Message: what StreamWorker.process() / _take() and the sink read of one.

bench/profile.py and bench/wire.py feed the worker these (no broker in the measured loop), and
tests/test_streams_faults.py fuzzes process() with them. Standard library only: the tests load this file
by its path (bench/ is scripts, not an installed package)."""
from __future__ import annotations

import time


class Message:
    __slots__ = ("_topic", "_partition", "_offset", "_key", "_value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        self._topic, self._partition, self._offset, self._key, self._value = topic, partition, offset, key, value

    def topic(self): return self._topic
    def partition(self): return self._partition
    def offset(self): return self._offset
    def key(self): return self._key
    def value(self): return self._value
    def error(self): return None
    def headers(self): return None
    def timestamp(self): return (1, int(time.time() * 1000))  # TIMESTAMP_CREATE_TIME, now
