"""The sink's flush against a real embedded chDB (sql/sink.py `_stage`): the per-batch shortcuts taken for speed
(issue 17) keep every row exactly once. In process: records are handed to `_take_many` as the consumer would,
no broker is read; the ledger is a fresh migrated chDB. Ground truth: the ids the test produced."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.sink import LedgerSink
from meterline.sql.writer import duplicate_count
from meterline.sql.synth import priced_events
from meterline.streams.codec import encode_priced_v2

START = datetime(2026, 1, 5, tzinfo=timezone.utc)


class Msg:
    def __init__(self, topic, partition, offset, value):
        self.args = (topic, partition, offset, value)

    def topic(self): return self.args[0]
    def partition(self): return self.args[1]
    def offset(self): return self.args[2]
    def value(self): return self.args[3]
    def key(self): return None
    def error(self): return None
    def headers(self): return None


class LandsThenFails:
    """A real chDB client whose first ledger insert is applied and then reported failed (a timeout after the
    server committed it): the retry must not store the rows twice."""

    def __init__(self, client):
        self.client, self.failed = client, False

    def __getattr__(self, name):
        return getattr(self.client, name)

    def command(self, sql, *args, **kwargs):
        result = self.client.command(sql, *args, **kwargs)
        if sql.startswith("INSERT INTO priced_events") and not self.failed:
            self.failed = True
            raise ConnectionError("read timed out (the insert was applied)")
        return result


@pytest.fixture
def ledger_settings(tmp_path, kafka_bootstrap) -> Settings:
    return Settings(data_dir=tmp_path, kafka_bootstrap=kafka_bootstrap, topic_prefix=f"fl{uuid.uuid4().hex[:8]}",
                    clickhouse_dsn=f"chdb://{tmp_path / 'ch'}")


@pytest.fixture
def client(ledger_settings):
    """A migrated chDB ledger of the test's own."""
    client = ledger.connect(ledger_settings)
    ledger.migrate(client)
    return client


def make_sink(settings: Settings, client) -> LedgerSink:
    sink = LedgerSink(settings, client=client, group="flush-test", max_backoff_s=0.2)
    topic = settings.topic("priced")
    sink.tables = {topic: sink.tables[topic]}
    return sink


def v2_records(n: int, seed: int) -> list[bytes]:
    records, _ = priced_events(n, seed=seed, start=START)
    return [encode_priced_v2(ev.decode(ev.PricedEvent, r)) for r in records]


def take(sink: LedgerSink, records: list[bytes], first_offset: int = 0) -> None:
    topic = sink.settings.topic("priced")
    sink._take_many([Msg(topic, 0, first_offset + i, r) for i, r in enumerate(records)])


def stored(client) -> tuple[int, int]:
    return tuple(client.query("SELECT count(), uniqExact(event_id) FROM priced_events").result_rows[0])


def test_an_insert_that_landed_but_reported_an_error_is_not_stored_twice(ledger_settings, client):
    sink = make_sink(ledger_settings, LandsThenFails(client))
    take(sink, v2_records(200, seed=71))
    sink.flush()
    assert sink.client.failed and sink.stats["retries"] == 1
    assert stored(client) == (200, 200)
    assert_rollup_is_the_ledger_grouped(client, hours=1)  # the view fired with the insert that landed, not with the retry


def test_staging_tables_lost_with_the_session_are_made_again(ledger_settings, client):
    """The staging tables are created once per session; a server restart takes them: the next batch makes them again."""
    sink = make_sink(ledger_settings, client)
    records = v2_records(60, seed=72)
    take(sink, records[:30])
    sink.flush()
    for table in ("stage_priced_events", "typed_priced_events", "stage2_priced_events"):
        client.command(f"DROP TEMPORARY TABLE {table}")  # what a restarted server has
    take(sink, records[30:], first_offset=30)
    sink.flush()
    assert stored(client) == (60, 60) and sink.stats["dead_letters"] == 0


def test_copies_within_a_batch_and_of_stored_ids_are_dropped_and_counted(ledger_settings, client):
    sink = make_sink(ledger_settings, client)
    records = v2_records(14, seed=73)
    take(sink, records[:10])
    sink.flush()
    assert sink.stats["duplicates"] == 0
    # 5 ids stored already, 3 new ids, one new id twice more: 14 distinct ids, 5 + 2 copies to drop
    take(sink, records[:5] + records[10:13] + [records[13]] * 3, first_offset=10)
    sink.flush()
    assert stored(client) == (14, 14)
    assert sink.stats["duplicates"] == 7 and sink.stats["conflicting_duplicates"] == 0


def test_duplicate_count_from_the_repeated_rows():
    """(id, partition, offset, stored): every copy of a stored id, all but one copy of a repeated new id."""
    rows = [("a", 0, 1, True), ("a", 0, 2, True), ("b", 0, 3, False), ("b", 1, 4, False), ("b", 1, 5, False),
            ("c", 0, 6, False), ("c", 0, 7, False)]
    assert duplicate_count(rows) == 2 + 2 + 1
    assert duplicate_count([]) == 0


HIDDEN_CHECKED = [name for name, info in ev.PricedEvent.model_fields.items()
                  if any(getattr(getattr(m, "func", None), "__name__", "") == "_no_hidden_chars" for m in info.metadata)]


def test_a_hidden_character_in_any_checked_field_of_a_v2_row_is_rejected_alone(ledger_settings, client):
    """priced.v2 rows are checked for hidden characters with one regex over all their strings joined by a space
    (sql/checks.py binary_fill): each field still counts alone, and nothing is found across two fields."""
    assert len(HIDDEN_CHECKED) >= 9  # tenant_id, team, project, agent_id, session_id, provider, model, tool, catalog_version
    sink = make_sink(ledger_settings, client)
    clean = [ev.decode(ev.PricedEvent, r).model_dump() for r in priced_events(2 * len(HIDDEN_CHECKED) + 1, seed=74, start=START)[0]]
    bad = {}
    for i, name in enumerate(HIDDEN_CHECKED):  # a bidi override inside the field; a C0 control at its end
        bad[2 * i] = {**clean[2 * i], name: "a\u202eb"}
        bad[2 * i + 1] = {**clean[2 * i + 1], name: (clean[2 * i + 1][name] or "x")[:100] + "\x1f"}
    # the last row: spaces, non-ASCII letters and a field boundary mid-string are no hidden characters
    ok_row = len(clean) - 1
    bad_free = {**clean[ok_row], "team": "re search ü", "project": "", "agent_id": "ä gent", "tool": "\u00e9"}
    records = [encode_priced_v2(bad.get(i, bad_free if i == ok_row else row)) for i, row in enumerate(clean)]
    take(sink, records)
    staged = sink.writer.staged("priced_events")
    rows = sink.batch.tables["priced_events"]
    sink.writer.load(staged, rows, sink.batch.nonce)
    rejected = {offset for _, offset in client.query(staged.rejected()).result_rows}
    assert rejected == set(bad)  # every damaged field caught, the clean row accepted


def test_a_literal_field_with_bytes_that_are_not_utf8_is_rejected(ledger_settings, client):
    """binary_fill checks a Literal field by its IN list alone (no isValidUTF8): bytes that are not UTF-8 never match."""
    sink = make_sink(ledger_settings, client)
    rows = [ev.decode(ev.PricedEvent, r).model_dump() for r in priced_events(2, seed=76, start=START)[0]]
    good, bad = (encode_priced_v2({**row, "status": "timeout"}) for row in rows)
    assert bad.count(b"\x07timeout") == 1
    take(sink, [good, bad.replace(b"\x07timeout", b"\x07timeou\xff")])
    staged = sink.writer.staged("priced_events")
    sink.writer.load(staged, sink.batch.tables["priced_events"], sink.batch.nonce)
    assert client.query(staged.rejected()).result_rows == [(0, 1)]


def test_a_v2_rows_cost_is_checked_typed_without_a_null_branch(ledger_settings, client):
    """cost_usd may be null in the contract (v1 JSON) but never in priced.v2 (typed, not Nullable): binary_fill tests
    no NULL, and a cost below zero or beyond 16 whole digits is still rejected; zero passes."""
    sink = make_sink(ledger_settings, client)
    rows = [ev.decode(ev.PricedEvent, r).model_dump() for r in priced_events(4, seed=77, start=START)[0]]
    costs = (Decimal(0), Decimal("-0.000000000001"), Decimal(10**16), rows[3]["cost_usd"])
    take(sink, [encode_priced_v2({**row, "cost_usd": cost}) for row, cost in zip(rows, costs)])
    staged = sink.writer.staged("priced_events")
    assert "NULL" not in staged.binary_fill("t").split(" AS _ok")[0].rpartition("_batch_start, ")[2]  # the rules
    sink.writer.load(staged, sink.batch.tables["priced_events"], sink.batch.nonce)
    assert sorted(offset for _, offset in client.query(staged.rejected()).result_rows) == [1, 2]


ROLLUP_KEY = "toDateTime64(toStartOfHour(ts), 3, 'UTC'), tenant_id, team, project, agent_id, provider, model, kind"
ROLLUP_SUMS = ("count(), countIf(status != 'ok'), countIf(cost_source = 'unpriced'), sum(input_tokens), sum(output_tokens), "
               "sum(units), toString(sum(cost_usd)), toString(sum(list_cost_usd)), toString(sum(input_cost_usd))")


def test_the_rollup_equals_the_ledger_grouped_after_batches_with_copies(ledger_settings, client):
    """usage_hourly (its view, parts written without collapse-on-insert) read with sum() GROUP BY gives exactly the
    ledger's own sums per key and hour, over batches that cross an hour and carry copies of stored ids."""
    sink = make_sink(ledger_settings, client)
    records = [encode_priced_v2(ev.decode(ev.PricedEvent, r)) for r in priced_events(3000, seed=75, start=START, span_s=7200)[0]]
    take(sink, records[:1200])
    sink.flush()
    take(sink, records[:300] + records[1200:] + records[2000:2100], first_offset=1200)  # copies: stored and in-batch
    sink.flush()
    assert stored(client) == (3000, 3000)
    assert_rollup_is_the_ledger_grouped(client, hours=2)


def assert_rollup_is_the_ledger_grouped(client, hours: int) -> None:
    rollup = client.query("SELECT hour, tenant_id, team, project, agent_id, provider, model, kind, sum(events), "
                          "sum(error_events), sum(unpriced_events), sum(input_tokens), sum(output_tokens), sum(units), "
                          "toString(sum(cost_usd)), toString(sum(list_cost_usd)), toString(sum(input_cost_usd)) "
                          "FROM usage_hourly GROUP BY ALL ORDER BY ALL").result_rows
    truth = client.query(f"SELECT {ROLLUP_KEY}, {ROLLUP_SUMS} FROM priced_events GROUP BY ALL ORDER BY ALL").result_rows
    assert len({r[0] for r in truth}) == hours and rollup == truth
