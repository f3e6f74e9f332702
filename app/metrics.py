"""Prometheus metrics for `up`: computed at scrape time from Kafka and the ledger.

Counting from Kafka's watermarks (rather than a counter in every hot loop) costs
nothing per event: events/s is the growth of the usage topic's end offsets, lag is
end offset minus the committed offset of each consumer group, dead letters are the
records on the DLQ topic.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from meterline.settings import Settings
from meterline.topics import committed_offsets, partition_end

log = logging.getLogger("meterline.app.metrics")

DECISION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class KafkaWatermarks:
    """End offsets and committed offsets, through one metadata-only consumer."""

    def __init__(self, settings: Settings):
        from confluent_kafka import Consumer

        self.settings = settings
        self._lock = threading.Lock()
        self._consumer = Consumer(settings.kafka_config(**{"group.id": "meterline-metrics", "enable.auto.commit": False}))

    def partitions(self, topic: str) -> list:
        from confluent_kafka import TopicPartition

        meta = self._consumer.list_topics(topic, timeout=5).topics.get(topic)
        return [TopicPartition(topic, p) for p in (meta.partitions if meta and meta.error is None else {})]

    def end_offsets(self, topic: str) -> int:
        with self._lock:
            return sum(partition_end(self._consumer, tp, timeout=5) for tp in self.partitions(topic))

    def lag(self, group: str, topic: str) -> int | None:
        """Records on `topic` not yet committed by `group` (None when the group committed nothing)."""
        committed, lag = self.progress(group, [topic])
        return lag if committed is not None else None

    def progress(self, group: str, topics: list[str]) -> tuple[int | None, int]:
        """(sum of the offsets `group` committed on `topics` or None if none, records not yet committed)."""
        from confluent_kafka import Consumer

        with self._lock:
            tps = [tp for topic in topics for tp in self.partitions(topic)]
            ends = {(tp.topic, tp.partition): partition_end(self._consumer, tp, timeout=5) for tp in tps}
        reader = Consumer(self.settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))
        try:
            committed = committed_offsets(reader, tps, timeout=5)
        finally:
            reader.close()
        done = {(tp.topic, tp.partition): tp.offset for tp in committed if tp.offset >= 0}
        lag = sum(end - done.get(key, 0) for key, end in ends.items())
        return (sum(done.values()) if done else None), max(0, lag)

    def close(self) -> None:
        with self._lock:  # not under a read on another thread (a closed client raises; a closing one may crash)
            self._consumer.close()


class PipelineCollector:
    """A prometheus_client collector; each scrape reads Kafka (and the ledger) once."""

    def __init__(self, settings: Settings, groups: dict[str, str], unpriced: Callable[[], int | None],
                 components: Callable[[], dict[str, dict[str, Any]]],
                 scale: Callable[[], list[tuple[str, str, int]]] | None = None):
        self.settings = settings
        self.scale = scale  # latest (provider, model, replicas) per endpoint, from the ledger
        self.groups = groups  # consumer group -> topic it reads
        self.unpriced = unpriced
        self.components = components
        self.kafka: KafkaWatermarks | None = None
        self._last: tuple[float, int] | None = None
        self._lock = threading.Lock()  # the API scrapes on several threads: one client, made once
        self._closed = False

    def _watermarks(self) -> KafkaWatermarks:
        with self._lock:
            if self._closed:
                raise RuntimeError("the metrics collector is closed")
            if self.kafka is None:
                self.kafka = KafkaWatermarks(self.settings)
            return self.kafka

    def close(self) -> None:
        """At shutdown: close the Kafka client; a scrape after this reports no Kafka metrics."""
        with self._lock:
            self._closed = True
            kafka, self.kafka = self.kafka, None
        if kafka is not None:
            kafka.close()

    def collect(self):
        yield from self._component_metrics()
        try:
            yield from self._kafka_metrics()
        except Exception as err:  # noqa: BLE001 - a scrape never fails because Kafka is away
            log.warning("metrics: Kafka unavailable: %s", err)
        unpriced = self._safe(self.unpriced)
        if unpriced is not None:
            yield CounterMetricFamily("meterline_unpriced_events", "Usage events no catalog could price (kept, flagged).", value=unpriced)
        recommended = self._safe(self.scale) if self.scale else None
        if recommended is not None:
            yield self._replicas(recommended)

    @staticmethod
    def _replicas(rows: list[tuple[str, str, int]]) -> GaugeMetricFamily:
        """What an autoscaler reads (KEDA's prometheus trigger, deploy/k8s/README.md): one series per endpoint."""
        gauge = GaugeMetricFamily("meterline_endpoint_recommended_replicas",
                                  "Replicas recommended for a self-hosted inference endpoint (latest `plan endpoints --publish`).",
                                  labels=["provider", "model"])
        for provider, model, replicas in rows:
            gauge.add_metric([provider, model], replicas)
        return gauge

    def _kafka_metrics(self):
        kafka = self._watermarks()
        usage_total = kafka.end_offsets(self.settings.topic("usage"))
        yield CounterMetricFamily("meterline_usage_events", "Usage events accepted by Kafka.", value=usage_total)
        now = time.monotonic()
        rate = 0.0
        if self._last and now > self._last[0]:
            rate = max(0.0, (usage_total - self._last[1]) / (now - self._last[0]))
        self._last = (now, usage_total)
        yield GaugeMetricFamily("meterline_events_per_second", "Usage events per second since the previous scrape.", value=rate)
        yield CounterMetricFamily("meterline_dead_letters", "Records sent to the dead-letter topic.",
                                  value=kafka.end_offsets(self.settings.topic("dlq")))
        lag = GaugeMetricFamily("meterline_consumer_lag", "Records not yet committed by a consumer group.", labels=["group", "topic"])
        for group, topic in self.groups.items():
            value = kafka.lag(group, self.settings.topic(topic))
            if value is not None:
                lag.add_metric([group, self.settings.topic(topic)], value)
        yield lag

    def _component_metrics(self):
        up = GaugeMetricFamily("meterline_component_up", "1 while a supervised component runs.", labels=["component"])
        restarts = CounterMetricFamily("meterline_component_restarts", "Restarts of a supervised component.", labels=["component"])
        progress = GaugeMetricFamily("meterline_component_last_progress_seconds",
                                     "Seconds since a consumer last made progress (0 while it has nothing to read).",
                                     labels=["component"])
        stalled = GaugeMetricFamily("meterline_component_stalled", "1 while a consumer has lag and makes no progress.",
                                    labels=["component"])
        for name, info in self.components().items():
            up.add_metric([name], 1 if info.get("running") else 0)
            restarts.add_metric([name], info.get("restarts", 0))
            if "last_progress_s" in info:
                progress.add_metric([name], info["last_progress_s"])
                stalled.add_metric([name], 1 if info.get("stalled") else 0)
        yield from (up, restarts, progress, stalled)

    @staticmethod
    def _safe(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001
            log.warning("metrics: %s", err)
            return None


def build_registry(collector: PipelineCollector) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(collector)
    latency = Histogram("meterline_decision_latency_seconds", "From a decision's issued_at to `up` reading it on the control topic.",
                        buckets=DECISION_BUCKETS, registry=registry)
    return registry, latency
