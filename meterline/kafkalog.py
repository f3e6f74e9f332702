"""librdkafka's log, through Python logging: WARNING and up, each repeated message once.

Without a logger librdkafka writes every failed connection attempt to stderr (`%3|…|FAIL|…`),
hundreds of lines a minute while a broker is away. `Settings.kafka_config()` hands every client
KAFKA_LOG instead; confluent-kafka passes the messages on from the client's poll/consume/flush.
"""
from __future__ import annotations

import logging
import re
import threading
import time

# What differs between two repeats of one message: the client's name and the times librdkafka adds.
_VARIES = re.compile(r"rdkafka#\w+-\d+|\(after \d+ms in state \w+[^)]*\)|\d+ms|\d+ identical error\(s\) suppressed")
# "FAIL [rdkafka#producer-1] [thrd:host:1/bootstrap]: host:1/bootstrap: Connect to … failed: … (after 0ms …)"
_REASON = re.compile(r"^\S+ \[[^\]]*\] \[thrd:[^\]]*\]: (?:\S+/(?:bootstrap|\d+): )?(?P<text>.*?)(?: \(after \d+ms[^)]*\))?$")


class CollapseRepeats(logging.Filter):
    """Lets the first of a repeated message through and counts the rest; after `window_s` the next one
    passes again, saying how many were held back. At most `max_kinds` messages are remembered."""

    def __init__(self, window_s: float = 60.0, max_kinds: int = 256):
        super().__init__()
        self.window_s, self.max_kinds = window_s, max_kinds
        self.suppressed = 0
        self._seen: dict[str, list[float | int]] = {}  # kind -> [when it last passed, repeats held since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = _VARIES.sub("", record.getMessage())
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                self.suppressed += 1
                return False
            if seen is None and len(self._seen) >= self.max_kinds:
                self._seen.pop(next(iter(self._seen)))
            held = int(seen[1]) if seen else 0
            self._seen[kind] = [now, 0]
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} more like it in the last {self.window_s:.0f} s)", ()
        return True


def reason(message: str) -> str:
    """The part of a librdkafka log line that says what went wrong (no thread, broker or timing)."""
    match = _REASON.match(message)
    return match.group("text") if match else message


KAFKA_LOG = logging.getLogger("meterline.kafka")
if KAFKA_LOG.level == logging.NOTSET:  # an application that configured it keeps its level
    KAFKA_LOG.setLevel(logging.WARNING)
if not any(isinstance(f, CollapseRepeats) for f in KAFKA_LOG.filters):
    KAFKA_LOG.addFilter(CollapseRepeats())
