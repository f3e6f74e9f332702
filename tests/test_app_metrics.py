"""/metrics' Kafka client: one per collector however many threads scrape, closed when `up` stops."""
from __future__ import annotations

import threading

from meterline.app import metrics


class FakeWatermarks:
    """Counts the clients made; the first is slow to make, so a second scrape arrives meanwhile."""

    made: list["FakeWatermarks"] = []
    on_first = None  # called while the first one is being made

    def __init__(self, settings):
        FakeWatermarks.made.append(self)
        self.closed = False
        if len(FakeWatermarks.made) == 1 and FakeWatermarks.on_first:
            FakeWatermarks.on_first()

    def close(self):
        self.closed = True


def collector(monkeypatch):
    FakeWatermarks.made, FakeWatermarks.on_first = [], None
    monkeypatch.setattr(metrics, "KafkaWatermarks", FakeWatermarks)
    return metrics.PipelineCollector(None, {}, lambda: None, dict)


def test_two_concurrent_scrapes_make_one_kafka_client(monkeypatch):
    c = collector(monkeypatch)
    got = []
    second = threading.Thread(target=lambda: got.append(c._watermarks()))

    def scrape_meanwhile():  # unlocked, the second scrape makes its own client here (one leaked)
        second.start()
        second.join(2)  # with the lock it waits for this one: no point waiting longer

    FakeWatermarks.on_first = scrape_meanwhile
    got.append(c._watermarks())
    second.join()
    assert len(FakeWatermarks.made) == 1
    assert got[0] is got[1] is FakeWatermarks.made[0]


def test_stopping_up_closes_the_metrics_kafka_client(monkeypatch, settings):
    from meterline.app.up import Up

    pipeline = Up(settings, streams=0, allocator=False)
    pipeline.collector = collector(monkeypatch)
    client = pipeline.collector._watermarks()
    pipeline._release()
    assert client.closed
    assert "meterline_component_up" in {m.name for m in pipeline.collector.collect()}  # a late scrape still answers ...
    assert len(FakeWatermarks.made) == 1  # ... without a new client
