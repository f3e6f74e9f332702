"""Off-thread delivery to Kafka with an on-disk spool for broker outages.

The caller's thread only appends `(key, value)` to a bounded deque (`send`, no lock, no
I/O). One background thread moves records into a confluent-kafka idempotent producer
(`enable.idempotence=true`, `acks=all`) and serves its callbacks:

* A failed delivery (message timeout, transport error, purge) puts the record into the
  spool; `message.timeout.ms` is short (15 s default) so librdkafka's own buffering
  hands undelivered records back instead of holding them for its default 5 minutes.
* The error callback (`_ALL_BROKERS_DOWN`, fatal errors) and failed deliveries mark an
  outage: new records then go straight to the spool. A probe thread asks for metadata
  once a second during an outage; the first answer (or any successful delivery) ends it.
  A producer whose probes fail for STALE_PRODUCER_S while it holds nothing is replaced
  (librdkafka can be left with no broker to ask after a broker restart).
* While anything is spooled, new records queue behind it on disk, and the spool is
  replayed oldest segment first, so order is kept (records in flight when an outage
  began come back after those spooled before them).
* Nothing is silently lost: a full deque or a full spool drops the newest record,
  counts it (`stats.dropped`, the `meterline_sdk_events_dropped_total` counter) and logs
  a warning line (the first drop, then at most every 10 s).
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import Counter

from meterline.settings import Settings

from .spool import FsyncPolicy, Spool

log = logging.getLogger("meterline.collectors")
# librdkafka's own lines (served by poll()). During an outage it logs every reconnect attempt; the
# error callback already turns that into one warning, so its lines are off unless a level is set here.
RDKAFKA_LOG = logging.getLogger("meterline.collectors.librdkafka")
if RDKAFKA_LOG.level == logging.NOTSET:
    RDKAFKA_LOG.setLevel(logging.CRITICAL)

DROPPED = Counter("meterline_sdk_events_dropped_total", "Records the SDK dropped (spool or queue full).", ["topic", "reason"])
SPOOLED = Counter("meterline_sdk_events_spooled_total", "Records written to the on-disk spool.", ["topic"])
DELIVERED = Counter("meterline_sdk_events_delivered_total", "Records the broker acknowledged.", ["topic"])

# Errors that retrying cannot fix: the record is dropped (counted, logged) instead of cycling forever.
PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError._INVALID_ARG,
}
DROP_LOG_EVERY_S = 10.0
# An outage whose probe has failed this long gets a new producer (see _probe_loop).
STALE_PRODUCER_S = 10.0


@dataclass
class SenderStats:
    produced: int = 0  # handed to librdkafka (first try or replay)
    delivered: int = 0
    spooled: int = 0
    replayed: int = 0
    dropped: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    outages: int = 0


class Sender:
    def __init__(
        self,
        settings: Settings,
        topic: str,
        spool_dir: Path,
        *,
        queue_max: int = 100_000,
        spool_max_bytes: int = 64 << 20,
        spool_segment_bytes: int = 1 << 20,
        fsync: FsyncPolicy = "segment",
        delivery_timeout_ms: int = 15_000,
        producer_config: dict | None = None,
        encoder: Callable[[Any], tuple[bytes, bytes]] | None = None,
    ):
        self.topic = topic
        self.encoder = encoder
        self._delivered_metric, self._spooled_metric = DELIVERED.labels(topic), SPOOLED.labels(topic)
        self.stats = SenderStats()
        self.queue_max = queue_max
        self._queue: deque[tuple] = deque()
        self._spool = Spool(spool_dir, spool_max_bytes, spool_segment_bytes, fsync)
        self._conf = settings.kafka_config(**{
            "enable.idempotence": True, "acks": "all", "linger.ms": 20, "compression.type": "lz4",
            "message.timeout.ms": delivery_timeout_ms, "socket.connection.setup.timeout.ms": 3000,
            "reconnect.backoff.max.ms": 2000, "error_cb": self._on_error, "logger": RDKAFKA_LOG,
            **(producer_config or {}),
        })
        self._producer = Producer(self._conf)
        self._outage = False
        self._reset_producer = False
        self._busy = False  # the thread holds records it popped but has not produced or spooled yet
        self._replay: Path | None = None
        self._replay_pending = 0
        self._drop_lock = threading.Lock()
        self._last_drop_log = 0.0
        self._closed = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"meterline-sender[{topic}]", daemon=True)
        self._probe = threading.Thread(target=self._probe_loop, name=f"meterline-probe[{topic}]", daemon=True)
        self._thread.start()
        self._probe.start()
        atexit.register(self.close)

    # ---- the caller's side (hot path) ------------------------------------------------------

    def send(self, key: bytes, value: bytes) -> None:
        """Queue one record; never blocks, never does I/O."""
        self.submit((key, value))

    def submit(self, item: tuple) -> None:
        """Queue `(key, value)` bytes, or any tuple that `encoder` turns into them on the background thread."""
        if len(self._queue) >= self.queue_max or self._closed:
            self._drop("closed" if self._closed else "queue_full")
            return
        self._queue.append(item)

    @property
    def outage(self) -> bool:
        return self._outage

    @property
    def spooled_bytes(self) -> int:
        return self._spool.bytes

    @property
    def spool_dir(self) -> Path:
        return self._spool.directory

    def flush(self, timeout: float = 30.0) -> bool:
        """True once everything sent so far was delivered (spool replayed too); False when `timeout`
        passed first: the rest is then safe in the spool or in librdkafka's queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle() and not self._spool.bytes and not self._outage:
                return True
            time.sleep(0.005)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Drain the queue, try to deliver within `timeout`, spool whatever is left."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._close_deadline = time.monotonic() + timeout
        self._closing.set()
        self._thread.join()
        self._probe.join()
        if len(self._producer):
            self._producer.purge()  # undelivered records come back through the callback → spool
            self._producer.flush(1.0)
        self._spool.close()

    # ---- the background thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            moved = self._drain_queue()
            if self._reset_producer:
                self._replace_producer()
            if not self._outage and self._replay is None and self._spool.bytes:
                self._start_replay()
            self._producer.poll(0 if moved else 0.02)
            if self._closing.is_set() and not self._queue and self._done_closing():
                return

    def _done_closing(self) -> bool:
        if time.monotonic() >= self._close_deadline:
            return True  # close() purges what is still in flight: the callback spools it
        if self._replay is not None:
            return False
        return self._outage or (not self._spool.bytes and not len(self._producer))

    def _idle(self) -> bool:
        if self._queue or self._busy or self._replay is not None:
            return False
        return len(self._producer) == 0 and (self._outage or not self._spool.bytes)

    def _drain_queue(self) -> int:
        queue, moved = self._queue, 0
        self._busy = True
        while queue:
            item = queue.popleft()
            if type(item[0]) is bytes:
                key, value = item
            else:
                try:
                    key, value = self.encoder(item)
                except Exception:  # noqa: BLE001 - a bug here must not stop the sender thread
                    log.exception("meterline: could not encode a queued %s record", self.topic)
                    self._drop("encode_error")
                    continue
            if self._outage or self._spool.bytes:  # keep order: newer records wait behind spooled ones
                self._to_spool(key, value)
            else:
                self._produce(key, value, self._on_delivery)
            moved += 1
        self._busy = False
        return moved

    def _produce(self, key: bytes, value: bytes, callback) -> None:
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=callback)
                self.stats.produced += 1
                return
            except BufferError:  # librdkafka's own queue is full: serve callbacks, then retry
                self._producer.poll(0.05)

    def _start_replay(self) -> None:
        oldest = self._spool.oldest()
        if oldest is None:
            return
        self._replay, records = oldest
        self._replay_pending = len(records)
        for key, value in records:
            self._produce(key, value, self._on_replay_delivery)
        self.stats.replayed += len(records)
        self._finish_replay_if_done()

    def _finish_replay_if_done(self) -> None:
        if self._replay is not None and self._replay_pending == 0:
            self._spool.remove(self._replay)  # every record was delivered or spooled again
            self._replay = None

    def _on_replay_delivery(self, err: KafkaError | None, msg) -> None:
        self._on_delivery(err, msg, replaying=True)
        self._replay_pending -= 1
        self._finish_replay_if_done()

    def _on_delivery(self, err: KafkaError | None, msg, replaying: bool = False) -> None:
        if err is None:
            self.stats.delivered += 1
            self._delivered_metric.inc()
            self._outage = False
            return
        if err.code() in PERMANENT:
            log.error("meterline: the broker rejected a record for %s: %s", self.topic, err.str())
            self._drop(f"rejected:{err.name()}")
            return
        self._set_outage(err)
        # A failed replay goes back to the tail even past the limit: its segment, still counted, is removed next.
        self._to_spool(msg.key() or b"", msg.value(), force=replaying)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("meterline: fatal producer error (%s); starting a new producer", err.str())
            self._reset_producer = True
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._MSG_TIMED_OUT) or err.fatal():
            self._set_outage(err)

    def _set_outage(self, err: KafkaError) -> None:
        if not self._outage:
            self.stats.outages += 1
            log.warning("meterline: Kafka unreachable (%s); spooling %s records to %s", err.str(), self.topic, self._spool.directory)
        self._outage = True

    def _replace_producer(self) -> None:
        self._reset_producer = False
        old, self._producer = self._producer, Producer(self._conf)
        old.purge()
        old.flush(1.0)

    def _to_spool(self, key: bytes, value: bytes, force: bool = False) -> None:
        if self._spool.append(key, value, force):
            self.stats.spooled += 1
            self._spooled_metric.inc()
        else:
            self._drop("spool_full")

    def _drop(self, reason: str) -> None:
        with self._drop_lock:
            self.stats.dropped += 1
            self.stats.drop_reasons[reason] = self.stats.drop_reasons.get(reason, 0) + 1
            now = time.monotonic()
            log_it = now - self._last_drop_log >= DROP_LOG_EVERY_S or self.stats.dropped == 1
            if log_it:
                self._last_drop_log = now
        DROPPED.labels(self.topic, reason).inc()
        if log_it:
            log.warning("meterline: dropped a %s record (%s); %d dropped so far: %s",
                        self.topic, reason, self.stats.dropped, self.stats.drop_reasons)

    def _probe_loop(self) -> None:
        failing_since = None
        while not self._closing.wait(1.0):
            if not self._outage:
                failing_since = None
                continue
            try:
                self._producer.list_topics(self.topic, timeout=1.0)
            except KafkaException:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= STALE_PRODUCER_S and not len(self._producer):
                    self._renew_stale_producer()
                    failing_since = None
                continue
            failing_since = None
            self._outage = False
            log.warning("meterline: Kafka is back; replaying %d spooled bytes for %s", self._spool.bytes, self.topic)

    def _renew_stale_producer(self) -> None:
        # Seen after a broker restart under load: a producer waited in rd_kafka_broker_any_usable (no usable broker)
        # for over 5 min while the broker served the other clients, so its spool never drained. A new producer
        # bootstraps again; it is only made when the old one holds nothing (len 0), so nothing is lost.
        log.info("meterline: no broker answered %s's producer for %.0f s; starting a new one", self.topic, STALE_PRODUCER_S)
        self._reset_producer = True
