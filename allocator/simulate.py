"""A stand-in for the streams job's spend output, for tests, benchmarks and demos.

Costs recorded with `add()` are summed per scope and published every `interval` as
SpendUpdates (window = the interval) for the session and each of its ancestors,
exactly the shape the streams engineer's job produces.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal

from meterline.schemas.events import SpendUpdate, new_id, utcnow

from meterline.schemas.scopes import lineage, tenant_of

PERIOD_START = datetime(2000, 1, 1, tzinfo=timezone.utc)  # stand-in: the allocator keeps its own periods


class SpendReporter:
    def __init__(self, settings, interval: float = 0.02, producer=None, bare_ids: bool = False):
        from confluent_kafka import Producer

        self.settings = settings
        self.interval = interval
        self.bare_ids = bare_ids   # send 's-42' rather than 'acme/t/p/a/s-42', as a tenant-qualified spend job does
        self.producer = producer or Producer(settings.kafka_config(**{"linger.ms": 1, "enable.idempotence": True}))
        self._pending: dict[str, list] = defaultdict(lambda: [Decimal(0), 0])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spend-reporter", daemon=True)
        self._window_start = utcnow()
        self._events: dict[str, int] = defaultdict(int)   # period-to-date, as the streams job sends them

    def start(self) -> SpendReporter:
        self._thread.start()
        return self

    def add(self, session_scope_id: str, cost: Decimal, events: int = 1) -> None:
        with self._lock:
            for _, scope_id in lineage(session_scope_id):
                entry = self._pending[scope_id]
                entry[0] += cost
                entry[1] += events

    def flush(self) -> int:
        """Publish one window now; returns the number of updates sent."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [Decimal(0), 0])
        start, end = self._window_start, utcnow()
        self._window_start = end
        for scope_id, (cost, events) in pending.items():
            self._events[scope_id] += events
            self.producer.produce(self.settings.topic("spend"), key=tenant_of(scope_id).encode(),
                                  value=spend_update(scope_id, start, end, cost, self._events[scope_id], bare=self.bare_ids).to_json())
        self.producer.flush(10)
        return len(pending)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()


def spend_update(scope_id: str, start: datetime, end: datetime, cost: Decimal, events: int = 1,
                 period_start: datetime = PERIOD_START, bare: bool = False) -> SpendUpdate:
    """A window's cost; `events` is period-to-date, as in the contract."""
    scope, sent_id = lineage(scope_id)[-1][0], scope_id
    if bare and scope != "tenant":
        sent_id = scope_id.rsplit("/", 1)[-1]
    return SpendUpdate(update_id=new_id(), ts=end, tenant_id=tenant_of(scope_id), scope=scope, scope_id=sent_id,
                       window_start=start, window_end=end, window_cost_usd=cost, period_start=period_start,
                       period_cost_usd=cost, events=events)
