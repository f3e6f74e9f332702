"""The whole path under SIGKILL: usage -> stream worker -> priced -> ledger sink -> ClickHouse.

A few hundred thousand usage events (several tenants, teams and models, tool calls, provider
costs, an unpriced model, producer retries that repeat 1 % of them) go through a stream worker
and a sink that are each killed with SIGKILL twice, at different points, and restarted. The
ledger's totals per tenant, team and model must equal the ground truth to the last digit.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from brokers import committed_sum
from meterline.topics import partition_ends
from meterline.schemas.events import UsageEvent, decode, new_id
from meterline.settings import Settings
from meterline.streams.pricing import load_catalog
from meterline.topics import catalog_by_name

EVENTS = int(os.environ.get("METERLINE_TEST_PIPELINE_CRASH_EVENTS", "200000"))
METERLINE = str(Path(sys.executable).with_name("meterline"))
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5"), ("nobody", "mystery-9000")]


def usage_records(n: int, seed: int = 3) -> list[bytes]:
    rng, start = random.Random(seed), datetime.now(timezone.utc) - timedelta(minutes=20)
    out = []
    for i in range(n):
        provider, model = MODELS[i % len(MODELS)]
        record = {"event_id": new_id(), "ts": (start + timedelta(microseconds=i * 3000)).isoformat(),
                  "tenant_id": f"tenant{i % 7}", "team": f"team{i % 3}", "agent_id": f"a{i % 11}", "session_id": f"s{i % 900}",
                  "kind": "llm_call", "provider": provider, "model": model, "input_tokens": rng.randint(100, 9000),
                  "output_tokens": rng.randint(0, 2000)}
        record["cache_read_tokens"] = rng.randint(0, record["input_tokens"] // 2)
        if i % 40 == 0:
            record.update(kind="tool_call", tool="web_search", model="", provider="")
        if i % 53 == 0:
            record["cost_usd"] = f"0.00{rng.randint(1, 999)}"
        out.append(json.dumps(record).encode())
    return out


def ground_truth(records: list[bytes]) -> dict[tuple[str, str, str], Decimal]:
    catalog, truth = load_catalog(), defaultdict(Decimal)
    for raw in records:
        event = decode(UsageEvent, raw)
        truth[(event.tenant_id, event.team, event.model or event.tool)] += catalog.price_usage(event).cost_usd
    return truth


def produce(settings: Settings, records: list[bytes]) -> None:
    producer = Producer(settings.kafka_config(**{"linger.ms": 20, "enable.idempotence": True, "compression.type": "lz4"}))
    for raw in records:
        while True:
            try:
                producer.produce(settings.topic("usage"), raw, json.loads(raw)["tenant_id"].encode())
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


class Pipeline:
    """The stream worker and the sink as `meterline` processes, each startable and killable."""

    def __init__(self, settings: Settings, data_dir: Path):
        self.settings = settings
        self.env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
                    "METERLINE_DATA_DIR": str(data_dir), "METERLINE_CLICKHOUSE_DSN": f"chdb://{data_dir / 'ch'}"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.probe = Consumer(settings.kafka_config(**{"group.id": settings.group("sink")}))

    def start(self, role: str, *args: str) -> None:
        argv = {"streams": ["streams", "--instance-id", "w1", "--checkpoint-interval", "0.5"],
                "sink": ["sink", "--instance-id", "s1", "--batch-seconds", "0.5"]}[role]
        self.procs[role] = subprocess.Popen([METERLINE, *argv, *args], env=self.env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)

    def kill(self, role: str) -> None:
        proc = self.procs.pop(role)  # killed on purpose: `wait` no longer expects it alive
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def finish(self, role: str) -> None:
        proc = self.procs.pop(role)
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err.decode()[-3000:]

    def watermark(self, topic: str) -> tuple[int, int]:
        """(records in the topic, records the sink has committed = in the ledger)."""
        name, parts = self.settings.topic(topic), range(catalog_by_name()[topic].partitions)
        tps = [TopicPartition(name, p) for p in parts]
        ends = sum(partition_ends(self.probe, name).values())  # retried while a leader moves
        return ends, committed_sum(self.probe, tps)

    def wait(self, condition) -> None:
        while not condition():
            for role, proc in self.procs.items():
                assert proc.poll() is None, f"{role} died: {proc.stderr.read().decode()[-3000:]}"
            time.sleep(0.05)

    def sql(self, query: str) -> list[dict]:
        done = subprocess.run([METERLINE, "sql", query, "--format", "json"], env=self.env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def pipeline(settings, tmp_path):
    pipeline = Pipeline(settings, tmp_path)
    yield pipeline
    for proc in pipeline.procs.values():  # a failed test would leave its processes running
        proc.kill()
        proc.wait()


def test_sigkill_of_the_stream_worker_and_the_sink_neither_loses_nor_doubles_a_cent(settings, pipeline):
    records = usage_records(EVENTS)
    truth = ground_truth(records)
    retries = records[::100]  # producer retries: the same events again
    subprocess.run([METERLINE, "migrate"], env=pipeline.env, check=True, capture_output=True)
    third = len(records) // 3
    produce(settings, records[:third])
    pipeline.start("streams")
    pipeline.start("sink")

    pipeline.wait(lambda: pipeline.watermark("priced")[0] > third // 4)       # worker 1/4 through the first third
    pipeline.kill("streams")
    produce(settings, records[third:2 * third] + retries[: len(retries) // 2])
    pipeline.start("streams")
    pipeline.wait(lambda: 0 < pipeline.watermark("priced")[1] < pipeline.watermark("priced")[0])  # sink mid-way
    pipeline.kill("sink")
    pipeline.start("sink")
    pipeline.wait(lambda: pipeline.watermark("priced")[0] > 1.3 * third)
    pipeline.kill("streams")                                                 # second worker kill
    produce(settings, records[2 * third:] + retries[len(retries) // 2:])
    pipeline.wait(lambda: pipeline.watermark("priced")[1] > third)
    pipeline.kill("sink")                                                    # second sink kill

    pipeline.start("streams", "--until-caught-up")
    pipeline.finish("streams")
    pipeline.start("sink", "--until-idle", "3")
    pipeline.finish("sink")

    rows = pipeline.sql("SELECT tenant_id, team, if(model != '', model, tool) AS item, count() AS n, "
                        "toString(sum(cost_usd)) AS usd FROM priced_events GROUP BY tenant_id, team, item")
    ledger = {(r["tenant_id"], r["team"], r["item"]): Decimal(r["usd"]) for r in rows}
    assert ledger == truth                                                    # to the last digit, per tenant/team/model
    assert sum(r["n"] for r in rows) == len(records)                          # each event once: no loss, no double
    totals = pipeline.sql("SELECT toString(sum(cost_usd)) AS usd, sum(events) AS n FROM usage_hourly")[0]
    assert Decimal(totals["usd"]) <= sum(truth.values()) and totals["n"] <= len(records)  # never more than the record
    # A SIGKILL between a raw insert and its materialized views can leave the rollups short (ARCHITECTURE:
    # known limits); the documented recovery after an unclean stop rebuilds them from the raw tables.
    for month in sorted({json.loads(r)["ts"][:7] for r in records}):
        done = subprocess.run([METERLINE, "rebuild-rollups", month], env=pipeline.env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    totals = pipeline.sql("SELECT toString(sum(cost_usd)) AS usd, sum(events) AS n FROM usage_hourly")[0]
    assert Decimal(totals["usd"]) == sum(truth.values()) and totals["n"] == len(records)  # the rollups agree
