"""examples/faust_spend_by_label.py, a user's Faust job on meterline's typed `priced` records, against the real
broker: usage events go through the real stream worker, the job runs as its own process, and its per-label
totals must equal a plain Decimal sum of the priced records the worker wrote."""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.streams.codec import decode_priced
from meterline.streams.worker import StreamWorker

from collectors_kafka import read_topic, topic_size, wait_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "faust_spend_by_label.py"
CUSTOMERS = ("acme", "globex", "initech", "émile & <co>")  # user text as a key and in JSON
pytestmark = pytest.mark.kafka


def usage_events(n: int) -> list[ev.UsageEvent]:
    rng, now = random.Random(17), ev.utcnow()
    out = []
    for i in range(n):
        attrs = {} if i % 7 == 0 else {"customer": rng.choice(CUSTOMERS), "region": "eu"}  # some carry no label
        fields = dict(event_id=ev.new_id(), ts=now, tenant_id=f"tenant{i % 3}", session_id=f"s{i % 11}", attributes=attrs)
        if i % 10 == 3:  # a provider-reported cost, to the pico-dollar
            fields |= dict(kind="llm_call", provider="openai", model="gpt-4o", input_tokens=10, cost_usd=Decimal("0.000000000001") * (i + 1))
        elif i % 10 == 5:
            fields |= dict(kind="tool_call", tool="web_search")
        else:
            inp = rng.randint(50, 9000)
            fields |= dict(kind="llm_call", provider=rng.choice(["openai", "anthropic"]), input_tokens=inp,
                           cache_read_tokens=rng.randint(0, inp // 2), output_tokens=rng.randint(1, 900))
            fields["model"] = "gpt-4o-mini" if fields["provider"] == "openai" else "claude-haiku-4-5"
        out.append(ev.build(ev.UsageEvent, **fields))
    return out


def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(settings.kafka_config())
    for key, value in records:
        producer.produce(settings.topic(topic), value, key)
    assert producer.flush(30) == 0


def drop_job_topics(settings: Settings) -> None:
    """Faust's topics for the job (<prefix>-...: changelogs, leader); the fixture drops <prefix>.* ones."""
    admin = AdminClient(settings.kafka_config())
    doomed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(settings.topic_prefix + "-")]
    for future in (admin.delete_topics(doomed, operation_timeout=30) if doomed else {}).values():
        future.result(60)


def latest_totals(settings: Settings, topic: str, at_least: int) -> dict[str, dict]:
    """The job's output: the last record per key (each is that label's running total)."""
    return {m.key().decode(): json.loads(m.value()) for m in read_topic(settings, topic, at_least)}


def test_the_example_job_totals_spend_per_customer_label_exactly_and_dead_letters_bad_records(settings):
    events = usage_events(240)
    produce(settings, "usage", [(e.tenant_id.encode(), e.to_json()) for e in events])
    StreamWorker(settings, group_id=f"{settings.topic_prefix}-streams").run(until_caught_up=True)
    priced = [decode_priced(m.value()) for m in read_topic(settings, settings.topic("priced"), len(events))]
    assert len(priced) == len(events)
    # Ground truth: a plain sum over what the worker wrote, by the attribute.
    truth, counts = defaultdict(Decimal), Counter()
    for p in priced:
        truth[p.attributes.get("customer", "(none)")] += p.cost_usd
        counts[p.attributes.get("customer", "(none)")] += 1
    assert len(truth) == len(CUSTOMERS) + 1 and sum(truth.values()) > 0
    produce(settings, "priced", [(b"tenant0", b"not json"),
                                 (b"tenant0", priced[0].to_json().replace(b'"cost_usd":"', b'"cost_usd":0.1,"x":"'))])

    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(settings.data_dir)}
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--label", "customer"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out_topic = f"{settings.topic_prefix}.spend-by-customer.v1"
    try:
        def done():
            if proc.poll() is not None:
                pytest.fail(f"the example job exited ({proc.returncode}): {proc.stdout.read()[-3000:]}")
            if (topic_size(settings, out_topic) or 0) < len(truth):
                return False
            try:
                totals = latest_totals(settings, out_topic, len(truth))
            except AssertionError:  # read_topic: more arrived while reading (the job is still at it)
                return False
            return sum(t["events"] for t in totals.values()) == len(events) and totals
        try:
            totals = wait_for(done, "the job's totals to cover every priced event", step=0.5)
        except AssertionError as err:
            proc.kill()
            pytest.fail(f"no totals ({err}); the job said: {proc.communicate()[0][-3000:]}")
        letters = [ev.decode(ev.DeadLetter, m.value()) for m in read_topic(settings, settings.topic("dlq"), 2)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        drop_job_topics(settings)
    assert {k: Decimal(t["cost_usd"]) for k, t in totals.items()} == dict(truth)  # exact, to the pico-dollar
    assert {k: t["events"] for k, t in totals.items()} == dict(counts)
    assert all(t["cost_usd"] == f"{truth[k]:.12f}" for k, t in totals.items())  # written as exact strings
    assert b"not json" in {base64.b64decode(d.payload_b64) for d in letters}  # the original bytes kept
    assert all(d.stage == "faust" and d.source_topic == settings.topic("priced") for d in letters)
    assert any("cost_usd" in d.reason for d in letters) and any("invalid PricedEvent" in d.reason for d in letters)
