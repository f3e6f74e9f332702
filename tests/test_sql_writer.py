"""sql/writer.py alone: a batch made by hand (no consumer, no broker, no LedgerSink) into inserts, on a real chDB.
Ground truth: the records the test built, and which of them it damaged or copied."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.batching import Batch
from meterline.sql.sink import BINARY_TAIL
from meterline.sql.synth import priced_events
from meterline.sql.writer import LedgerWriter, json_line
from meterline.streams.codec import encode_priced_v2

START = datetime(2026, 2, 3, tzinfo=timezone.utc)
TOPIC = "w.priced"


class Msg:
    def __init__(self, partition, offset, value):
        self.args = (partition, offset, value)

    def topic(self): return TOPIC
    def partition(self): return self.args[0]
    def offset(self): return self.args[1]
    def value(self): return self.args[2]
    def headers(self): return None


@pytest.fixture
def client(tmp_path):
    client = ledger.connect(Settings(data_dir=tmp_path, clickhouse_dsn=f"chdb://{tmp_path / 'ch'}"))
    ledger.migrate(client)
    return client


class Retries:
    """The sink's part: run each action, once more if it fails; record what was asked."""

    def __init__(self):
        self.asked = []

    def __call__(self, action, what):
        self.asked.append(what)
        try:
            return action()
        except Exception:  # noqa: BLE001
            return action()


def writer(client) -> LedgerWriter:
    return LedgerWriter(client, {"priced_events": TOPIC}, None, {"duplicates": 0, "conflicting_duplicates": 0})


def batch_of(values: list[bytes], first_offset: int = 0) -> Batch:
    """What the sink's intake makes of records on partition 0: priced.v2 as RowBinary + Kafka columns, JSON with them."""
    batch = Batch()
    rows = batch.tables["priced_events"]
    batch.start[(TOPIC, 0)] = first_offset
    for offset, value in enumerate(values, first_offset):
        msg = Msg(0, offset, value)
        if value[:1] == bytes([ev.PRICED_V2_MAGIC]):
            rows.binary.add(len(rows.lines))
            rows.lines.append(value[1:] + BINARY_TAIL(0, offset, first_offset, batch.nonce))
        else:
            rows.lines.append(json_line(value.rstrip(), msg, first_offset))
        rows.msgs.append(msg)
        batch.next_offset[(TOPIC, 0)] = offset + 1
        batch.rows += 1
    return batch


def write(w: LedgerWriter, batch: Batch, retry=None) -> None:
    for _, insert in w.inserts(batch, retry or Retries()):
        insert()


def stored(client) -> dict[str, tuple[str, Decimal]]:
    rows = client.query("SELECT toString(event_id), tenant_id, toString(cost_usd) FROM priced_events").result_rows
    assert len(rows) == len({r[0] for r in rows})  # one row per id
    return {r[0]: (r[1], Decimal(r[2])) for r in rows}


def test_a_batch_keeps_first_writes_only_and_letters_what_the_contract_refuses(client):
    records = [ev.decode(ev.PricedEvent, r) for r in priced_events(12, seed=81, start=START)[0]]
    w = writer(client)
    write(w, batch_of([encode_priced_v2(r) for r in records[:4]]))  # 4 stored before
    assert set(stored(client)) == {str(r.event_id) for r in records[:4]}

    forged = records[5].model_copy(update={"tenant_id": "attacker", "cost_usd": Decimal(0)})
    values = ([encode_priced_v2(r) for r in records[:2]]          # copies of stored ids: duplicates
              + [encode_priced_v2(r) for r in records[4:10]]     # 6 new ids ...
              + [encode_priced_v2(records[4])]                   # ... one of them twice (a duplicate)
              + [encode_priced_v2(forged)]                       # another body for a new id: a conflict
              + [encode_priced_v2(records[10])[:-7]]             # truncated priced.v2: the contract refuses it
              + [records[11].to_json()])                         # v1 JSON beside v2 in one batch
    batch = batch_of(values, first_offset=4)
    write(w, batch)

    expected = {str(r.event_id): (r.tenant_id, r.cost_usd) for r in records[:10] + [records[11]]}
    assert stored(client) == expected  # the forged copy came after the genuine one: the first write is the charge
    reasons = {letter.offset: (letter.error_type, letter.reason) for letter in batch.dead}
    assert set(reasons) == {4 + 9, 4 + 10}
    assert reasons[13][0] == "conflicting_duplicate" and "'attacker'" in reasons[13][1]
    assert reasons[14][0] == "InvalidEvent" and "priced.v2" in reasons[14][1]
    assert [(a.kind, a.severity) for a in batch.anomalies] == [("conflicting_duplicate", "critical")]
    assert w.stats == {"duplicates": 3, "conflicting_duplicates": 1}


def test_every_clickhouse_step_goes_through_the_retry_it_is_given(client):
    """The sink's retry backs off while ClickHouse is down; on revoke it flushes with none (it must not wait)."""
    records = [ev.decode(ev.PricedEvent, r) for r in priced_events(3, seed=82, start=START)[0]]
    w, retry = writer(client), Retries()
    write(w, batch_of([encode_priced_v2(r) for r in records]), retry)
    assert retry.asked == ["check priced_events", "count priced_events", "find repeated ids priced_events"]
    for _, insert in w.inserts(batch_of([encode_priced_v2(r) for r in records], first_offset=3)):  # no retry: once each
        insert()
    assert len(stored(client)) == 3 and w.stats["duplicates"] == 3
