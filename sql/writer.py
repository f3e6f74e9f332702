"""The sink's ClickHouse side: a batch's rows staged, checked, de-duplicated by id, and made into inserts.

Steps 1-2 and 4 of sql/sink.py's flush order, without the consumer: `LedgerWriter.inserts(batch)` loads the
batch's staged rows into ClickHouse (the record's JSON, or priced.v2 as RowBinary), checks them there against
the contract's rules (sql/checks.py), lets the contract settle what ClickHouse rejects (canonical JSON staged
again, or a dead letter with the reason), drops every copy of an id that is not its first write
(sql/firstwrite.py), and returns one insert per staged table and per (table, month) of the others. The sink runs
them in order, retried, then commits; tests/test_sql_writer.py drives this part alone, on a real chDB.
"""
from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable

from confluent_kafka import Message

from meterline.schemas import events as ev
from meterline.streams.anomalies import conflicting_duplicate
from meterline.streams.codec import decode_priced

from . import firstwrite, ledger
from .batching import Batch, TableBatch
from .checks import Staged, canonical_json
from .rows import insert_rows

log = logging.getLogger("meterline.sink")

# Staged tables take the record's JSON as text (sql/checks.py): nothing may be coerced on the way in.
STAGE_SETTINGS = {"input_format_null_as_default": 0, "input_format_skip_unknown_fields": 0,
                  "input_format_json_read_numbers_as_strings": 0, "input_format_json_read_bools_as_numbers": 0,
                  "input_format_json_read_objects_as_strings": 0, "input_format_json_read_arrays_as_strings": 0,
                  "input_format_json_read_bools_as_strings": 0}
# High-volume tables whose row is their contract's JSON: validated, de-duplicated and inserted inside ClickHouse.
STAGED_TABLES = ("priced_events", "spend_updates", "anomalies", "dead_letters")
# An id table's insert: one row per id (deduplicated above), the ids view copies them, the rollup view groups each
# block: collapsing a part on insert (Replacing/SummingMergeTree) finds nothing. Rollups are read with sum() GROUP BY.
UNIQUE_ROWS = {"optimize_on_insert": 0}
DLQ_NAMESPACE = uuid.UUID("5b0d4c2e-8f0e-4f6a-9c57-0d1e5a1f7e11")

Retry = Callable[[Callable[[], Any], str], Any]  # (action, what it does) -> its result


class FramingError(Exception):
    """The batch's priced.v2 rows did not read back one row per record (one is truncated or garbage)."""


def dead_letter(msg: Message, reason: str, error_type: str) -> ev.DeadLetter:
    """The sink's dead letter for `msg`. Deterministic id: the same bad record dead-lettered twice is one row in the
    ledger's history."""
    dlq_id = uuid.uuid5(DLQ_NAMESPACE, f"{msg.topic()}:{msg.partition()}:{msg.offset()}")
    payload, reason = ev.dead_letter_payload(msg.value(), reason)  # always fits the dlq topic
    return ev.DeadLetter(dlq_id=dlq_id, ts=ev.utcnow(), stage="sink", source_topic=msg.topic(), partition=msg.partition(),
                         offset=msg.offset(), reason=reason, error_type=error_type[:ev.MAX_NAME_LEN], payload_b64=payload)


def json_line(body: bytes, msg: Message, start: int) -> bytes:
    """A JSON object with the Kafka columns appended (anything else fails to parse, and is then settled)."""
    return body[:-1] + b',"_topic":"%s","_partition":%d,"_offset":%d,"_batch_start":%d}' % (
        msg.topic().encode(), msg.partition(), msg.offset(), start)


def duplicate_count(repeated: list[tuple[str, int, int, bool]]) -> int:
    """Accepted rows the insert drops, from `Staged.repeated()`'s rows (id, partition, offset, stored): every copy of
    a stored id, and all but one copy of each id that repeats in the batch (every other row is a new, unique id)."""
    return len(repeated) - len({event_id for event_id, _, _, stored in repeated if not stored})


def ledger_table(name: str) -> ledger.LedgerTable:
    return next(t for t in ledger.TABLES if t.name == name)


def decode(model: type, msg: Message) -> ev.Contract:
    """The record by its contract; a priced record in either wire format (streams/codec.py decode_priced)."""
    if model is ev.PricedEvent:
        return decode_priced(msg.value(), msg.headers())
    return ev.decode(model, msg.value())


def _at_once(action: Callable[[], Any], what: str) -> Any:
    return action()


class LedgerWriter:
    """`inserts(batch, retry)` for one ClickHouse session; `stats` is the sink's counters."""

    def __init__(self, client: Any, topics: dict[str, str], cluster: str | None, stats: dict[str, int]) -> None:
        self.client, self.cluster, self.stats = client, cluster, stats
        self.topics = topics  # ledger table -> its topic
        self._staged: dict[str, Staged] = {}
        self._staging_made: set[str] = set()  # staging tables this session has (sql/checks.py Staged.create)

    def inserts(self, batch: Batch, retry: Retry | None = None) -> list[tuple[str, Callable[[], None]]]:
        """One insert per staged table and per (table, month) of the others, after dropping duplicate ids; the dead
        letters and anomalies found on the way are added to the batch. `retry(action, what)` runs each ClickHouse
        step (the sink's backs off while ClickHouse is down and gives up when the partitions are revoked); None: once."""
        retry = retry or _at_once
        out = []
        for name, rows in batch.tables.items():
            target = ledger.write_table(name, self.cluster)
            if rows.lines:
                insert = self._stage(batch, name, target, rows, retry)
                if insert is not None:
                    out.append((f"insert staged rows into {target}", insert))
            fresh = self._fresh_ids(batch, name, rows, retry)
            for month, dict_items in rows.dict_rows.items():
                keep_rows = [r for r, ok in zip(dict_items, fresh.get(month, [True] * len(dict_items))) if ok]
                if keep_rows:
                    out.append((f"insert {len(keep_rows)} rows into {target}", self._dict_insert(target, keep_rows)))
        return out

    # ------------------------------------------------------------------ staged tables (sql/checks.py)

    def staged(self, name: str) -> Staged:
        """The generated staging SQL of a ledger table (its column types read once from ClickHouse)."""
        if name not in self._staged:
            table = ledger_table(name)
            types = {r[0]: r[1] for r in self.client.query(f"DESCRIBE TABLE {ledger.write_table(name, self.cluster)}").result_rows}
            self._staged[name] = Staged(ev.CONTRACTS[table.contract], name, types, table.ts_column, table.id_column)
        return self._staged[name]

    def _stage(self, batch: Batch, name: str, target: str, rows: TableBatch, retry: Retry) -> Callable[[], None] | None:
        """Load the rows into ClickHouse and check them there; the contract settles what ClickHouse rejects.
        Returns the insert of the accepted rows (None when there are none)."""
        staged = self.staged(name)

        def run(action: Callable[[], Any], what: str) -> Any:
            return retry(action, f"{what} {name}")

        try:
            self.load(staged, rows, batch.nonce)
        except FramingError as err:  # a priced.v2 record is truncated or garbage: the contract reads each binary row
            log.info("staging %s: %s; checking each priced.v2 record against the contract", name, err)
            self._settle(batch, staged, rows, sorted(rows.binary))
            run(lambda: self.load(staged, rows, batch.nonce), "stage")
        except Exception as err:  # noqa: BLE001 - a record ClickHouse cannot parse, or ClickHouse is down
            log.info("staging %s failed (%s); checking each record against the contract", name, str(err).splitlines()[0][:200])
            self._settle(batch, staged, rows, range(len(rows.lines)))
            run(lambda: self.load(staged, rows, batch.nonce), "stage")
        rejected = run(lambda: self._rejected(staged, rows), "check")
        if rejected:  # canonical JSON for what the contract accepts, a dead letter for the rest
            self._settle(batch, staged, rows, rejected)
            run(lambda: self.load(staged, rows, batch.nonce), "stage")
            self._settle(batch, staged, rows, run(lambda: self._rejected(staged, rows), "check"), final=True)
        count, lo, hi = run(lambda: self.client.query(staged.accepted_range()).result_rows[0], "count")
        if not count:
            return None
        dedupe, exclude = None, frozenset()
        if name in ledger.ID_TABLES:
            bounds = tuple(f"toDateTime64('{t:%Y-%m-%d %H:%M:%S.%f}', 3, 'UTC')" for t in (lo, hi))
            dedupe = (staged.id_column, ledger.write_table(ledger.ID_TABLES[name], self.cluster), *bounds)
            repeated = run(lambda: self.client.query(staged.repeated(*dedupe)).result_rows, "find repeated ids")
            self.stats["duplicates"] += duplicate_count(repeated)
            if repeated:
                exclude = frozenset(self._staged_first_writes(batch, name, rows, repeated, lo, hi, run))
        query, attempts = staged.insert(target, dedupe, exclude), 0
        settings = {**self._insert_settings(), **(UNIQUE_ROWS if dedupe else {})}

        def insert() -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # a retry: the staging tables went with the session if ClickHouse restarted
                self.load(staged, rows, batch.nonce)
            self.client.command(query, settings=settings)
        return insert

    def load(self, staged: Staged, rows: TableBatch, nonce: int) -> None:
        """Staging tables (per session, created on first use) <- the batch's JSON and its priced.v2 rows (RowBinary,
        no parse); then typed and checked. Raises FramingError when the binary rows do not read back one per record."""
        self._empty_staging(staged)
        binary, lines = rows.binary, rows.lines
        if binary:
            body = b"\n".join(line for i, line in enumerate(lines) if line is not None and i not in binary)
        else:
            body = b"\n".join(line for line in lines if line is not None)
        if body:
            self.client.raw_insert(staged.stage, None, body, settings=STAGE_SETTINGS, fmt="JSONEachRow")
            self.client.command(staged.fill())
        if binary:
            self.load_binary(staged, [lines[i] for i in binary], nonce)

    def _empty_staging(self, staged: Staged) -> None:
        """Truncate the session's staging tables; create them when the session has none (its first batch, or the
        server restarted and took them). Creating them every batch cost ~60 ms (the typed table's SELECT is analysed)."""
        if staged.table in self._staging_made:
            try:
                for statement in staged.truncate():
                    self.client.command(statement)
                return
            except Exception:  # noqa: BLE001 - gone with the session (or ClickHouse is down: the create raises, retried)
                self._staging_made.discard(staged.table)
        for statement in (*staged.create(), *staged.truncate()):
            self.client.command(statement)
        self._staging_made.add(staged.table)

    def load_binary(self, staged: Staged, lines: list[bytes], nonce: int) -> None:
        """priced.v2 rows, each with its Kafka columns and the batch's nonce, as one RowBinary insert. A record that
        does not end where its bytes end shifts every row after it: the count or a nonce then differs."""
        try:
            self.client.raw_insert(staged.stage2, None, b"".join(lines), fmt="RowBinary")
        except Exception as err:  # noqa: BLE001 - cut short (or ClickHouse is down: the JSON path then retries)
            raise FramingError(f"ClickHouse could not read the priced.v2 rows ({str(err).splitlines()[0][:200]})") from err
        count, nonces = self.client.query(staged.binary_framing()).result_rows[0]
        if count != len(lines) or list(nonces) != [nonce]:
            raise FramingError(f"{len(lines)} priced.v2 records read back as {count} rows")
        self.client.command(staged.binary_fill(self.topics[staged.table]))

    def _rejected(self, staged: Staged, rows: TableBatch) -> list[int]:
        found = self.client.query(staged.rejected()).result_rows
        if not found:
            return []
        index = {(m.partition(), m.offset()): i for i, m in enumerate(rows.msgs)}
        return [index[(partition, offset)] for partition, offset in found]

    def _settle(self, batch: Batch, staged: Staged, rows: TableBatch, indices, final: bool = False) -> None:
        """The contract decides: a dead letter with its reason, or (not final) its canonical JSON staged again."""
        for i in indices:
            if rows.lines[i] is None:  # dead-lettered already
                continue
            msg = rows.msgs[i]
            rows.binary.discard(i)  # staged again as canonical JSON, or not at all
            try:
                record = decode(staged.model, msg)
            except ev.InvalidEvent as err:
                reason, error_type = err.reason, type(err).__name__
            else:
                if not final:
                    rows.lines[i] = json_line(canonical_json(record), msg, batch.start[(msg.topic(), msg.partition())])
                    continue
                reason, error_type = ("valid by the contract but rejected by the ledger's SQL checks (sql/checks.py): "
                                      "a bug, please report it with this record"), "LedgerCheck"
            if i not in rows.already_dead:
                batch.dead.append(dead_letter(msg, reason, error_type))
            rows.lines[i] = None

    # ------------------------------------------------------------------ first writes (sql/firstwrite.py)

    def _staged_first_writes(self, batch: Batch, name: str, rows: TableBatch, repeated: list, lo: datetime, hi: datetime,
                             run: Retry) -> set[tuple[int, int]]:
        """The (partition, offset) of every staged copy that is not its id's first write."""
        index = {(m.partition(), m.offset()): i for i, m in enumerate(rows.msgs)}
        copies = []
        table = ledger_table(name)
        for event_id, partition, offset, _ in repeated:
            msg = rows.msgs[index[(partition, offset)]]
            try:
                values = decode(ev.CONTRACTS[table.contract], msg).model_dump()
            except ev.InvalidEvent:  # the SQL checks and the contract disagree: LIMIT 1 BY still keeps one copy
                log.warning("%s[%d]@%d passed the SQL checks but not the contract", msg.topic(), partition, offset)
                continue
            copies.append(firstwrite.Copy(event_id, values, msg.topic(), partition, offset, msg))
        stored_ids = {i for i, _, _, stored in repeated if stored}
        duplicates, conflicts = self._first_writes(batch, name, copies, stored_ids, lo, hi, run)
        self.stats["duplicates"] -= len(conflicts)  # counted by duplicate_count() with the rest
        return {(m.partition(), m.offset()) for m in duplicates + conflicts}

    def _first_writes(self, batch: Batch, name: str, copies: list[firstwrite.Copy], stored_ids: set[str],
                      lo: datetime, hi: datetime, run: Retry) -> tuple[list[Message], list[Message]]:
        """Judge repeated ids (sql/firstwrite.py); a conflicting copy becomes a dead letter and an anomaly.
        Returns the messages of the batch copies to drop: (duplicates, conflicts)."""
        if stored_ids:
            copies = copies + run(lambda: self._stored_copies(name, stored_ids, lo, hi), "read stored copies")
        verdict = firstwrite.judge(name, copies)
        id_name = ledger_table(name).id_column
        for first, copy, differ in verdict.conflicts:
            if (copy.topic, copy.partition, copy.offset) in batch.redelivered:
                continue  # dead-lettered and alerted before a crash: dropped again, not reported again
            reason, anomaly = conflicting_duplicate(id_name, copy.id, (first.tenant, first.where), (copy.tenant, copy.where),
                                                    stage="sink", first_stored=first.index is None, differ=tuple(differ))
            log.warning("%s", reason)
            batch.dead.append(dead_letter(copy.index, reason, "conflicting_duplicate"))
            batch.anomalies.append(anomaly)
        self.stats["conflicting_duplicates"] += len(verdict.conflicts)
        return [c.index for c in verdict.duplicates], [c.index for _, c, _ in verdict.conflicts]

    def _stored_copies(self, name: str, ids: set[str], lo: datetime, hi: datetime) -> list[firstwrite.Copy]:
        table, id_column = ledger.write_table(name, self.cluster), ledger_table(name).id_column
        fields = firstwrite.BODY_FIELDS[name]
        lo_s, hi_s = (t.astimezone(timezone.utc).replace(tzinfo=None) for t in (lo, hi))
        query = (f"SELECT toString({id_column}), {', '.join(fields)}, _topic, _partition, _offset FROM {table} "
                 f"WHERE ts BETWEEN toDateTime64('{lo_s}', 3, 'UTC') AND toDateTime64('{hi_s}', 3, 'UTC') AND {id_column} IN "
                 f"(SELECT id FROM format(TSV, 'id UUID', '{chr(10).join(sorted(ids))}'))")
        return [firstwrite.Copy(r[0], dict(zip(fields, r[1:-3])), r[-3], r[-2], r[-1])
                for r in self.client.query(query, settings={"max_query_size": len(query) + 4096}).result_rows]

    # ------------------------------------------------------------------ the other tables (rows as dicts)

    def _dict_insert(self, table: str, rows: list[dict[str, Any]]) -> Callable[[], None]:
        def insert() -> None:
            for keys in {tuple(r) for r in rows}:  # tombstones carry fewer columns
                insert_rows(self.client, table, [r for r in rows if tuple(r) == keys])
        return insert

    def _insert_settings(self) -> dict[str, Any]:
        return {"distributed_foreground_insert": 1} if self.cluster else {}

    def _fresh_ids(self, batch: Batch, name: str, rows: TableBatch, run: Retry) -> dict[int, list[bool]]:
        """Per month, a keep-flag per row: False for a copy that is not its id's first write."""
        if name not in ledger.ID_TABLES or not rows.ids:
            return {}
        all_ids = [(i, ts) for items in rows.ids.values() for i, ts in items]
        stored = run(lambda: self._stored_ids(name, all_ids), "check duplicate ids")
        counts = Counter(event_id for event_id, _ in all_ids)
        copies = [firstwrite.Copy(event_id, row, row["_topic"], row["_partition"], row["_offset"], msg)
                  for month, items in rows.ids.items()
                  for (event_id, _), row, msg in zip(items, rows.dict_rows[month], rows.dict_msgs[month])
                  if counts[event_id] > 1 or event_id in stored]
        dropped: set[tuple[int, int]] = set()
        if copies:
            lo, hi = min(ts for _, ts in all_ids), max(ts for _, ts in all_ids)
            duplicates, conflicts = self._first_writes(batch, name, copies, stored, lo, hi, run)
            dropped = {(m.partition(), m.offset()) for m in duplicates + conflicts}
            self.stats["duplicates"] += len(duplicates)
        return {month: [(r["_partition"], r["_offset"]) not in dropped for r in rows.dict_rows[month]] for month in rows.ids}

    def _stored_ids(self, name: str, ids: list[tuple[str, datetime]]) -> set[str]:
        table = ledger.write_table(ledger.ID_TABLES[name], self.cluster)
        id_column = ledger_table(name).id_column
        lo = min(ts for _, ts in ids).astimezone(timezone.utc).replace(tzinfo=None)
        hi = max(ts for _, ts in ids).astimezone(timezone.utc).replace(tzinfo=None)
        data = "\n".join(i for i, _ in ids)  # UUID text: no quoting needed
        query = (f"SELECT toString({id_column}) FROM {table} WHERE ts BETWEEN toDateTime64('{lo}', 3, 'UTC') "
                 f"AND toDateTime64('{hi}', 3, 'UTC') AND {id_column} IN "
                 f"(SELECT id FROM format(TSV, 'id UUID', '{data}'))")
        return {r[0] for r in self.client.query(query, settings={"max_query_size": len(query) + 4096}).result_rows}
