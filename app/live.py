"""What is happening now: recent spend per tenant, decisions and anomalies, from Kafka.

A thread consumes the spend, control and anomalies topics (starting a little before
their ends, so a fresh page has some history) and keeps small ring buffers that the
HTTP API, the web page and the demo's terminal view read. It is a view, never the
record: the ledger is the record.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable

from meterline.schemas.events import Anomaly, InvalidEvent, SpendUpdate, ThrottleDecision, decode
from meterline.settings import Settings

log = logging.getLogger("meterline.app.live")

BACKFILL_PER_PARTITION = 200
SERIES_POINTS = 600  # per tenant; one point per update second


class LiveState:
    """Thread-safe ring buffers of the latest spend, decisions and anomalies."""

    def __init__(self, max_items: int = 200):
        self._lock = threading.Lock()
        self.tenant_spend: dict[str, Decimal] = {}
        self.tenant_gpu_cost: dict[str, Decimal] = {}
        self.tenant_month: dict[str, datetime] = {}  # the period (month) tenant_spend is the total of
        self.series: dict[str, deque[tuple[float, Decimal]]] = {}
        self.decisions: deque[ThrottleDecision] = deque(maxlen=max_items)
        self.anomalies: deque[Anomaly] = deque(maxlen=max_items)
        self.decision_counts: Counter[str] = Counter()
        self.anomaly_counts: Counter[str] = Counter()
        self.observers: list[Callable[[str, Any], None]] = []
        self.simulated = False  # the demo sets it: the page then says SIMULATED DATA

    def add_spend(self, update: SpendUpdate) -> None:
        if update.scope != "tenant":
            return
        with self._lock:
            tenant = update.tenant_id
            month = self.tenant_month.setdefault(tenant, update.period_start)
            if update.period_start < month:  # a late update of an earlier month: not this month's spend
                return
            # within a month the highest total wins (updates of one tenant may arrive out of order); a new month starts over
            same = update.period_start == month
            self.tenant_month[tenant] = update.period_start
            self.tenant_spend[tenant] = (max(update.period_cost_usd, self.tenant_spend.get(tenant, Decimal(0))) if same
                                         else update.period_cost_usd)
            self.tenant_gpu_cost[tenant] = update.gpu_cost_usd
            points = self.series.setdefault(tenant, deque(maxlen=SERIES_POINTS))
            second = float(int(update.ts.timestamp()))
            if points and points[-1][0] == second:
                points[-1] = (second, self.tenant_spend[tenant])
            else:
                points.append((second, self.tenant_spend[tenant]))
        self._notify("spend", update)

    def add_decision(self, decision: ThrottleDecision) -> None:
        with self._lock:
            self.decisions.append(decision)
            self.decision_counts[decision.action] += 1
        self._notify("decision", decision)

    def add_anomaly(self, anomaly: Anomaly) -> None:
        with self._lock:
            self.anomalies.append(anomaly)
            self.anomaly_counts[anomaly.kind] += 1
        self._notify("anomaly", anomaly)

    def _notify(self, kind: str, record: Any) -> None:
        for observer in self.observers:
            observer(kind, record)

    def snapshot(self, recent: int = 50, tenant: str | None = None) -> dict[str, Any]:
        """A JSON-ready picture for /api/live (only `tenant`'s when given). Money stays a decimal string."""
        def mine(t: str) -> bool:
            return tenant is None or t == tenant

        with self._lock:
            decisions = [d for d in self.decisions if mine(d.tenant_id)]
            anomalies = [a for a in self.anomalies if mine(a.tenant_id)]
            return {
                "ts": datetime.now(timezone.utc).isoformat(),
                "simulated": self.simulated,
                "tenants": [
                    {"tenant_id": t, "cost_usd": str(c), "gpu_cost_usd": str(self.tenant_gpu_cost.get(t, Decimal(0)))}
                    for t, c in sorted(self.tenant_spend.items(), key=lambda kv: -kv[1]) if mine(t)
                ],
                "series": {t: [[ts, str(c)] for ts, c in pts] for t, pts in self.series.items() if mine(t)},
                # the counts span every tenant; a tenant sees the counts of its own recent records
                "decision_counts": dict(self.decision_counts) if tenant is None else dict(Counter(d.action for d in decisions)),
                "anomaly_counts": dict(self.anomaly_counts) if tenant is None else dict(Counter(a.kind for a in anomalies)),
                "decisions": [_decision_row(d) for d in decisions[-recent:][::-1]],
                "anomalies": [_anomaly_row(a) for a in anomalies[-recent:][::-1]],
            }


def _decision_row(d: ThrottleDecision) -> dict[str, Any]:
    return {
        "issued_at": d.issued_at.isoformat(), "tenant_id": d.tenant_id, "scope": d.scope, "scope_id": d.scope_id,
        "priority": d.priority, "action": d.action, "max_model": d.max_model, "reason": d.reason,
        "budget_remaining_usd": None if d.budget_remaining_usd is None else str(d.budget_remaining_usd),
    }


def _anomaly_row(a: Anomaly) -> dict[str, Any]:
    return {"ts": a.ts.isoformat(), "tenant_id": a.tenant_id, "kind": a.kind, "severity": a.severity,
            "scope": a.scope, "scope_id": a.scope_id, "message": a.message}


class LiveFeed:
    """Consumes spend/control/anomaly topics into a LiveState on a daemon thread."""

    def __init__(self, settings: Settings, state: LiveState | None = None,
                 on_decision_latency: Callable[[float], None] | None = None):
        self.settings = settings
        self.state = state or LiveState()
        self.on_decision_latency = on_decision_latency
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self._live_from: dict[tuple[str, int], int] = {}  # per partition: the first offset past the backfill
        self.topics = {settings.topic("spend"): (SpendUpdate, self.state.add_spend),
                       settings.topic("control"): (ThrottleDecision, self._on_decision),
                       settings.topic("anomalies"): (Anomaly, self.state.add_anomaly)}

    def start(self) -> LiveFeed:
        self._thread = threading.Thread(target=self._run, name="live-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _on_decision(self, decision: ThrottleDecision, backfill: bool = False) -> None:
        # a backfilled decision's age says how long ago it was issued (before a restart), not how late it arrived
        if self.on_decision_latency and not backfill:
            self.on_decision_latency(max(0.0, time.time() - decision.issued_at.timestamp()))
        self.state.add_decision(decision)

    def _run(self) -> None:
        from confluent_kafka import Consumer

        consumer = Consumer(self.settings.kafka_config(**{
            "group.id": f"meterline-live-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False}))
        try:
            consumer.assign(self._start_positions(consumer))
            self.ready.set()
            while not self._stop.is_set():
                for msg in consumer.consume(500, timeout=0.2):
                    if msg.error() is None and msg.value() is not None:
                        backfill = msg.offset() < self._live_from.get((msg.topic(), msg.partition()), 0)
                        self._dispatch(msg.topic(), msg.value(), backfill)
        except Exception:  # noqa: BLE001 - a view must never take `up` down; the supervisor logs it
            log.exception("live feed stopped")
            raise
        finally:
            consumer.close()

    def _dispatch(self, topic: str, raw: bytes, backfill: bool = False) -> None:
        model, handler = self.topics[topic]
        try:
            record = decode(model, raw)
            if model is ThrottleDecision:
                self._on_decision(record, backfill)
            else:
                handler(record)
        except InvalidEvent as err:
            log.debug("live feed skipped a record on %s: %s", topic, err)

    def _start_positions(self, consumer: Any) -> list:
        """The last BACKFILL_PER_PARTITION records of each partition (an offset below the first kept one resets to
        earliest); partition_ends waits out a fresh topic's leader election instead of failing the feed."""
        from confluent_kafka import TopicPartition

        from meterline.topics import partition_ends

        positions = []
        for topic in self.topics:
            for partition, high in partition_ends(consumer, topic).items():
                self._live_from[(topic, partition)] = high
                positions.append(TopicPartition(topic, partition, max(0, high - BACKFILL_PER_PARTITION)))
        return positions
