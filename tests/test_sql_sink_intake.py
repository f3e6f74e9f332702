"""The sink's batched intake (`LedgerSink._take_many`, its inline fast path) builds exactly the batch that
`_take` builds record by record: same lines with the same Kafka columns, same offsets to commit, same skips
of what the ledger holds, same dead letters. Pure logic: no broker is contacted, no ClickHouse queried."""
from __future__ import annotations

import json
from datetime import datetime, timezone

from confluent_kafka import TopicPartition

from meterline.settings import Settings
from meterline.sql.sink import LedgerSink
from meterline.sql.synth import priced_events


class Msg:
    def __init__(self, topic, partition, offset, value, key=None):
        self.args = (topic, partition, offset, value, key)

    def topic(self): return self.args[0]
    def partition(self): return self.args[1]
    def offset(self): return self.args[2]
    def value(self): return self.args[3]
    def key(self): return self.args[4]
    def error(self): return None
    def headers(self): return [("meterline-changed-by", b"ops")]
    def timestamp(self): return (1, 1_767_225_600_000)


def sink(settings: Settings) -> LedgerSink:
    made = LedgerSink(settings, client=object(), group="intake-test")
    priced, budgets = settings.topic("priced"), settings.topic("budgets")
    made.checkpoint.assign([TopicPartition(priced, 0), TopicPartition(priced, 1), TopicPartition(budgets, 0)],
                           {(priced, 1): (10, 13, {10, 11, 13})})  # the ledger holds 10, 11, 13 of partition 1's last batch
    return made


def messages(settings: Settings) -> list[Msg]:
    records, _ = priced_events(8, seed=3, start=datetime(2026, 1, 5, tzinfo=timezone.utc))
    priced, budgets = settings.topic("priced"), settings.topic("budgets")
    out = [Msg(priced, 0, i, records[i] + b"\n") for i in range(4)]            # new, trailing newline stripped
    out += [Msg(priced, 1, 10 + i, records[4 + i]) for i in range(4)]          # stored, stored, dead-lettered before, stored
    out += [Msg(priced, 1, 14, records[0]), Msg(priced, 0, 2, records[2])]     # past the replay; taken already
    out += [Msg(priced, 0, 4, None)]                                           # a tombstone where none belongs
    policy = {"policy_id": "b1", "tenant_id": "acme", "scope": "tenant", "scope_id": "acme", "amount": "10"}
    out += [Msg(budgets, 0, 0, json.dumps(policy).encode(), b"b1"), Msg(budgets, 0, 1, None, b"b1")]
    return out


def snapshot(made: LedgerSink) -> dict:
    batch = made.batch
    return {"rows": batch.rows, "start": batch.start, "next": batch.next_offset, "redelivered": batch.redelivered,
            "position": made.checkpoint.position, "replay": made.checkpoint.replay,
            "dead": [(d.source_topic, d.partition, d.offset, d.reason) for d in batch.dead],
            "tables": {name: (t.lines, [m.args for m in t.msgs], t.already_dead,
                              {m: [{k: v for k, v in r.items() if k != "created_at"} for r in rows] for m, rows in t.dict_rows.items()})
                       for name, t in batch.tables.items()}}


def test_batched_intake_equals_one_record_at_a_time():
    settings = Settings(topic_prefix="intake")
    one, many = sink(settings), sink(settings)
    for msg in messages(settings):
        one._take(msg)
    many._take_many(messages(settings))
    got, expected = snapshot(many), snapshot(one)
    assert got == expected
    # and the batch is what the checkpoint promises: 4 + 1 + 1 new priced rows, 2 budget rows
    lines = expected["tables"]["priced_events"][0]
    assert len(lines) == 6 and expected["rows"] == 8
    first = json.loads(lines[0])
    assert (first["_topic"], first["_partition"], first["_offset"], first["_batch_start"]) == ("intake.priced.v1", 0, 0, 0)
    assert json.loads(lines[-1])["_batch_start"] == 12                          # partition 1's batch starts at its first new offset
    assert expected["redelivered"] == {("intake.priced.v1", 1, 12)}
    assert expected["next"] == {("intake.priced.v1", 0): 5, ("intake.priced.v1", 1): 15, ("intake.budgets.v1", 0): 2}
    assert [d[:3] for d in expected["dead"]] == [("intake.priced.v1", 0, 4)]
