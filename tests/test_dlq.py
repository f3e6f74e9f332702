"""`meterline dlq list|replay` against the real broker and chDB: a dead letter replayed after the fix lands in the
ledger once, a second replay sends nothing, a dry run changes nothing, and what is unsafe or truncated is refused.

Like tests/test_sql_sink.py, the sink and the CLI run as subprocesses (each owns the chDB directory while it runs)."""
from __future__ import annotations

import json
import subprocess
import uuid
from datetime import timedelta

from confluent_kafka import Consumer, TopicPartition

from meterline.topics import partition_ends
from meterline import kafka_acl
from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.sql import dlq
from meterline.sql.synth import priced_events
from test_sql_sink import METERLINE, _env, ledger_sql, produce, sink_until_idle

LEDGER_CHECK = ("valid by the contract but rejected by the ledger's SQL checks (sql/checks.py): a bug, please report it "
                "with this record")


def _anomaly() -> ev.Anomaly:
    now = ev.utcnow()
    return ev.build(ev.Anomaly, anomaly_id=ev.new_id(), ts=now, kind="unpriced_model", severity="warning", tenant_id="acme",
                    scope="model", scope_id="gpt-x", window_start=now - timedelta(minutes=5), window_end=now,
                    evidence={"calls": "3"}, message="gpt-x has no price")


def _letter(settings: Settings, topic: str, raw: bytes, *, stage: str = "sink", offset: int = 0, partition: int = 0,
            reason: str = LEDGER_CHECK, error_type: str = "LedgerCheck") -> bytes:
    payload, reason = ev.dead_letter_payload(raw, reason)
    return ev.DeadLetter(dlq_id=uuid.uuid4(), ts=ev.utcnow(), stage=stage, source_topic=settings.topic(topic),
                         partition=partition, offset=offset, reason=reason, error_type=error_type,
                         payload_b64=payload).to_json()


def dlq_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*METERLINE, "dlq", *args], env=_env(settings), capture_output=True, text=True)


def ends(settings: Settings, topic: str) -> int:
    """Records on a topic (every partition's high watermark)."""
    consumer = Consumer(settings.kafka_config(**{"group.id": "dlq-test-watermarks"}))
    try:
        return sum(partition_ends(consumer, settings.topic(topic)).values())  # retried while a leader moves
    finally:
        consumer.close()


def test_a_dead_letter_replayed_after_the_fix_lands_once_and_a_second_replay_adds_nothing(settings):
    anomaly = _anomaly()
    [priced], _ = priced_events(1, seed=21)
    produce(settings, "dlq", [_letter(settings, "anomalies", anomaly.to_json(), partition=1, offset=4),
                              _letter(settings, "priced", priced, partition=2, offset=9)])
    sink_until_idle(settings)

    listed = json.loads(dlq_cli(settings, "list", "--json").stdout)
    assert [(r["stage"], r["letters"], r["replayed"]) for r in listed] == [("sink", 1, 0), ("sink", 1, 0)], listed
    assert {r["reason"] for r in listed} == {LEDGER_CHECK}
    later = (ev.utcnow() + timedelta(hours=1)).isoformat()
    assert json.loads(dlq_cli(settings, "list", "--since", later, "--json").stdout) == []
    assert dlq_cli(settings, "list", "--since", "yesterday").returncode == 2

    dry = dlq_cli(settings, "replay", "--reason-contains", "sql checks", "--json")  # the default is a dry run
    assert dry.returncode == 0, dry.stderr
    assert len(json.loads(dry.stdout)["replay"]) == 2
    assert ends(settings, "anomalies") == 0 and ends(settings, "priced") == 0  # nothing sent

    done = dlq_cli(settings, "replay", "--reason-contains", "sql checks", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replayed"] == 2
    assert ends(settings, "anomalies") == 1 and ends(settings, "priced") == 1
    sink_until_idle(settings)
    assert ledger_sql(settings, "SELECT toString(anomaly_id) AS id, scope FROM anomalies") == [
        {"id": str(anomaly.anomaly_id), "scope": "model"}]
    assert ledger_sql(settings, "SELECT count() AS n FROM priced_events") == [{"n": 1}]

    again = dlq_cli(settings, "replay", "--yes", "--json")
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["replayed"], json.loads(again.stdout)["replayed_before"]) == (0, 2)
    assert ends(settings, "anomalies") == 1 and ends(settings, "priced") == 1  # nothing sent again
    assert {r["replayed"] for r in json.loads(dlq_cli(settings, "list", "--json").stdout)} == {1}


def test_a_replayed_anomaly_the_ledger_holds_is_not_stored_twice(settings):
    """The alerts job dead-letters an anomaly its webhook refused; the sink stored that anomaly already. Its replay
    (for the webhook) must not make a second ledger row: the sink keeps the first anomaly_id (migration 0021)."""
    anomaly = _anomaly()
    produce(settings, "anomalies", [anomaly.to_json()])
    produce(settings, "dlq", [_letter(settings, "anomalies", anomaly.to_json(), stage="alerts", reason="webhook: 503",
                                      error_type="HTTPStatusError")])
    sink_until_idle(settings)
    done = dlq_cli(settings, "replay", "--stage", "alerts", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replayed"] == 1 and ends(settings, "anomalies") == 2
    sink_until_idle(settings)
    assert ledger_sql(settings, "SELECT count() AS n FROM anomalies") == [{"n": 1}]


def test_unsafe_topics_truncated_payloads_and_conflicts_are_refused(settings):
    spend = b'{"tenant_id":"acme"}'
    big = b'{"event_id":"' + b"x" * (ev.MAX_DEAD_PAYLOAD_BYTES + 10) + b'"}'
    sample = b'{"sample_id":"00000000-0000-0000-0000-000000000001"}'
    produce(settings, "dlq", [_letter(settings, "spend", spend, offset=1),
                              _letter(settings, "budgets", b'{"policy_id":"b1"}', offset=2),
                              _letter(settings, "gpu", sample, offset=3),  # the sink alone refused it
                              _letter(settings, "priced", big, offset=4),
                              _letter(settings, "usage", b'{"event_id":"1"}', stage="streams", offset=5,
                                      reason="event_id 1 seen before with another body", error_type="conflicting_duplicate")])
    sink_until_idle(settings)
    done = dlq_cli(settings, "replay", "--yes", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert (result["replayed"], result["refused"]) == (0, 5), result
    why = {r["source_topic"].split(".")[1]: r["action"] for r in result["refusals"]}
    assert "no id" in why["spend"] and "latest per key" in why["budgets"]
    assert "charged it to live spend already" in why["gpu"]
    assert "truncated" in why["priced"] and "conflicting duplicate" in why["usage"]
    assert all(ends(settings, topic) == 0 for topic in ("spend", "budgets", "gpu", "priced", "usage"))
    assert "refused 1 dead letters of" in done.stderr and len(done.stderr.strip().splitlines()) == 5


def test_usage_goes_back_to_its_partition_unless_the_ledger_holds_its_event_id(settings):
    [charged, fresh], _ = priced_events(2, seed=5)
    produce(settings, "priced", [charged])  # another copy of the first was priced: it was charged
    usage = [json.dumps({k: v for k, v in json.loads(r).items() if k in ev.UsageEvent.model_fields}).encode()
             for r in (charged, fresh)]
    produce(settings, "dlq", [_letter(settings, "usage", usage[0], stage="streams", partition=3, offset=7,
                                      reason="pricing failed: KeyError", error_type="KeyError"),
                              _letter(settings, "usage", usage[1], stage="streams", partition=5, offset=8,
                                      reason="pricing failed: KeyError", error_type="KeyError")])
    sink_until_idle(settings)
    done = dlq_cli(settings, "replay", "--source-topic", "usage", "--yes", "--json")
    assert done.returncode == 1, done.stderr  # one refused
    result = json.loads(done.stdout)
    assert result["replayed"] == 1 and "another copy was charged" in result["refusals"][0]["action"]
    consumer = Consumer(settings.kafka_config(**{"group.id": "dlq-test-usage", "auto.offset.reset": "earliest"}))
    consumer.assign([TopicPartition(settings.topic("usage"), 5, 0)])
    msg = consumer.poll(30)
    consumer.close()
    assert msg is not None and msg.value() == usage[1]  # the original bytes, on the original partition
    assert ends(settings, "usage") == 1


def test_the_replay_principal_writes_only_the_topics_that_dedupe():
    s = Settings(topic_prefix="p")
    grants = set(kafka_acl.grants("replay", s))
    assert grants == {("topic", s.topic(t), False, "WRITE") for t in dlq.REPLAYABLE}
    assert "replay" not in kafka_acl.ROLES["pipeline"].purpose and not set(dlq.REFUSED) & set(kafka_acl.ROLES["replay"].write)
