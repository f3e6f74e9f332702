"""`meterline dlq list|replay`: what the dead-letter queue holds, and re-driving it once the bug that rejected it
is fixed.

Dead letters are read from the ledger's `dead_letters` table, not the dlq topic: the sink stores every one, SQL does
the filters and the summary, and the replay claims (`dlq_replays`, migration 0021) live beside them, so one store
says what was replayed.

A replay re-produces a record's original bytes to its source topic (its original partition when it had one), so the
worker and the sink validate it again; one that fails again is dead-lettered again. It must never count money
twice, so only topics whose every consumer dedupes by id are replayed (`verdict`):

* priced: the sink keeps the first event_id (priced_event_ids); the stream worker does not read it.
* anomalies: the sink keeps the first anomaly_id (anomaly_ids, 0021). The alerts job posts the anomaly again.
* usage (stage streams): the worker charged nothing for a record it dead-lettered; its event_id window is bounded
  and restarts empty, so a record whose event_id the ledger holds (another copy was charged) is refused.
* gpu, compute, only as dead-lettered by the worker (stage streams): it charged nothing, and the sink keeps the
  first sample_id. One the sink alone refused was charged to live spend by the worker, which keeps no sample_id
  window: a copy would charge it again.
* everything else is refused: spend snapshots have no id (an old one would overwrite newer totals); control,
  budgets, gpu-allocations and scale are latest-per-key (an old copy would override the current value).

Also refused: a truncated payload (not the original), an empty one, and a conflicting duplicate (refused by the
first-write-wins rule, not by a bug). Each record is claimed in `dlq_replays` before it is produced, and only the
first claim of a key is produced: a second `replay --yes` (or a concurrent one) adds nothing.
"""
from __future__ import annotations

import base64
import binascii
import getpass
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from meterline.errors import first_line
from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.topics import catalog_by_name

from . import ledger

# Catalog topics a replay may write to: its consumers count a replayed copy once (module doc). kafka_acl's
# `replay` role writes exactly these.
REPLAYABLE = ("usage", "gpu", "compute", "priced", "anomalies")
WORKER_ONLY = ("usage", "gpu", "compute")  # safe only as dead-lettered by the stream worker: it charged nothing
REFUSED = {
    "spend": "spend snapshots carry no id: an old one would overwrite newer totals",
    "spend-state": "the worker's changelog, latest per scope: an old copy would overwrite newer totals",
    "dlq": "a dead letter of a dead letter: replay the record it names instead",
}
LATEST_PER_KEY = "compacted, latest per key: an old copy would override the current value"
TRUNCATED_NOTE = "[payload truncated:"  # ev.dead_letter_payload's note
REPLAY_HEADER = "meterline-dlq-replay"  # on each re-produced record: the dlq_id it came from


@dataclass
class Letter:
    dlq_id: str
    ts: datetime
    stage: str
    source_topic: str
    partition: int
    offset: int
    reason: str
    error_type: str
    payload_b64: str

    @property
    def key(self) -> str:
        """Where the record came from: one claim per original record, however many dead letters name it."""
        return f"{self.source_topic}:{self.partition}:{self.offset}" if self.offset >= 0 else f"dlq:{self.dlq_id}"

    def payload(self) -> bytes | None:
        try:
            return base64.b64decode(self.payload_b64, validate=True)
        except (binascii.Error, ValueError):
            return None

    def summary(self, action: str) -> dict[str, Any]:
        return {"dlq_id": self.dlq_id, "ts": self.ts, "stage": self.stage, "source_topic": self.source_topic,
                "partition": self.partition, "offset": self.offset, "error_type": self.error_type,
                "reason": first_line(self.reason, 160), "action": action}


@dataclass
class Plan:
    replay: list[Letter] = field(default_factory=list)
    refused: list[tuple[Letter, str]] = field(default_factory=list)
    replayed_before: list[Letter] = field(default_factory=list)


@dataclass(frozen=True)
class Filters:
    stage: str | None = None
    source_topic: str | None = None  # the full topic name
    reason_contains: str | None = None
    since: datetime | None = None

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses, params = ["1"], {}
        for column, value, test in (("stage", self.stage, "stage = {stage:String}"),
                                    ("source_topic", self.source_topic, "source_topic = {source_topic:String}"),
                                    ("reason", self.reason_contains, "positionCaseInsensitiveUTF8(reason, {reason:String}) > 0"),
                                    ("since", self.since, "ts >= {since:DateTime64(3, 'UTC')}")):
            if value is not None:
                clauses.append(test)
                params[column] = value.astimezone(timezone.utc).replace(tzinfo=None) if isinstance(value, datetime) else value
        return " AND ".join(clauses), params


def full_topic(settings: Settings, name: str) -> str:
    """`usage` or the full name: the full name of this prefix."""
    return settings.topic(name) if name in catalog_by_name() else name


def catalog_name(settings: Settings, topic: str) -> str | None:
    return next((name for name in catalog_by_name() if settings.topic(name) == topic), None)


# ---------------------------------------------------------------- reading the ledger


def letters(client, settings: Settings, filters: Filters) -> list[Letter]:
    """The dead letters that match, oldest first, each once (the sink may store one twice after a crash)."""
    where, params = filters.where()
    table = ledger.read_table("dead_letters", settings.clickhouse_cluster)
    rows = client.query(f"SELECT toString(dlq_id), ts, stage, source_topic, partition, offset, reason, error_type, payload_b64 "
                        f"FROM {table} WHERE {where} ORDER BY ts, dlq_id LIMIT 1 BY dlq_id", parameters=params).result_rows
    return [Letter(*row) for row in rows]


def summary(client, settings: Settings, filters: Filters) -> list[dict[str, Any]]:
    """Dead letters per stage, source topic, error type and first line of the reason, with how many were replayed."""
    where, params = filters.where()
    table = ledger.read_table("dead_letters", settings.clickhouse_cluster)
    replays = ledger.read_table("dlq_replays", settings.clickhouse_cluster)
    key = "if(offset >= 0, concat(source_topic, ':', toString(partition), ':', toString(offset)), concat('dlq:', toString(dlq_id)))"
    query = (f"SELECT stage, source_topic, error_type, leftUTF8(splitByChar('\\n', trimBoth(reason))[1], 160) AS reason, "
             f"count() AS letters, countIf({key} IN (SELECT replay_key FROM {replays})) AS replayed, "
             f"min(ts) AS first_ts, max(ts) AS last_ts FROM (SELECT * FROM {table} WHERE {where} LIMIT 1 BY dlq_id) "
             "GROUP BY stage, source_topic, error_type, reason ORDER BY letters DESC, stage, source_topic, reason")
    result = client.query(query, parameters=params)
    return [dict(zip(result.column_names, row)) for row in result.result_rows]


def _present(client, settings: Settings, table: str, column: str, values: list[str], type_: str) -> set[str]:
    """Which of `values` the ledger's `table` holds in `column`."""
    if not values:
        return set()
    rows = client.query(f"SELECT DISTINCT toString({column}) FROM {ledger.read_table(table, settings.clickhouse_cluster)} "
                        f"WHERE {column} IN {{values:Array({type_})}}", parameters={"values": values}).result_rows
    return {r[0] for r in rows}


def claimed_keys(client, settings: Settings, keys: list[str]) -> set[str]:
    return _present(client, settings, "dlq_replays", "replay_key", keys, "String")


def charged_event_ids(client, settings: Settings, ids: list[str]) -> set[str]:
    """The usage event_ids the ledger holds already: another copy was priced, so it was charged."""
    return _present(client, settings, "priced_event_ids", "event_id", ids, "UUID")


# ---------------------------------------------------------------- what is safe


def verdict(letter: Letter, settings: Settings) -> str | None:
    """None when replaying this dead letter counts its record at most once; otherwise why not (one line)."""
    raw = letter.payload()
    if raw is None:
        return "its payload is not base64"
    if not raw:
        return "an empty payload (a tombstone): nothing to replay"
    if TRUNCATED_NOTE in letter.reason or len(raw) >= ev.MAX_DEAD_PAYLOAD_BYTES:
        return "a truncated payload: the dead letter kept only the record's head, not the original"
    if letter.error_type == "conflicting_duplicate":
        return "a conflicting duplicate: refused by first write wins, not by a bug (another copy of its id was counted)"
    name = catalog_name(settings, letter.source_topic)
    if name is None:
        return f"{letter.source_topic} is not a topic of prefix {settings.topic_prefix!r}"
    if name not in REPLAYABLE:
        return f"{name}: {REFUSED.get(name, LATEST_PER_KEY)}"
    if name in WORKER_ONLY and letter.stage != "streams":
        return (f"{name} dead-lettered by the {letter.stage} alone: the stream worker also reads {name} and charged it "
                "to live spend already; it keeps no id window for it, so a copy would charge it again")
    return None


def _usage_event_id(raw: bytes) -> str | None:
    try:
        return str(uuid.UUID(str(json.loads(raw)["event_id"])))
    except (ValueError, TypeError, KeyError):
        return None  # the worker cannot read it either: it is dead-lettered again, never charged


def plan(client, settings: Settings, filters: Filters) -> Plan:
    """What a replay with these filters would do: one record per key, oldest dead letter first."""
    found = letters(client, settings, filters)
    claimed = claimed_keys(client, settings, sorted({letter.key for letter in found}))
    out, keys, refused = Plan(), set(), []
    for letter in found:
        if letter.key in claimed:
            out.replayed_before.append(letter)
        elif letter.key not in keys:
            why = verdict(letter, settings)
            if why is None:
                out.replay.append(letter)
                keys.add(letter.key)
            else:
                refused.append((letter, why))
    out.refused = [(letter, why) for letter, why in refused if letter.key not in keys]  # another letter of it replays
    _refuse_charged_usage(client, settings, out)
    return out


def _refuse_charged_usage(client, settings: Settings, out: Plan) -> None:
    usage = settings.topic("usage")
    ids = {letter.dlq_id: _usage_event_id(letter.payload()) for letter in out.replay if letter.source_topic == usage}
    charged = charged_event_ids(client, settings, sorted({i for i in ids.values() if i}))
    if not charged:
        return
    why = "usage whose event_id the ledger holds: another copy was charged already"
    out.refused += [(letter, why) for letter in out.replay if ids.get(letter.dlq_id) in charged]
    out.replay = [letter for letter in out.replay if ids.get(letter.dlq_id) not in charged]


# ---------------------------------------------------------------- replaying


def claim(client, settings: Settings, chosen: list[Letter], replay_id: str) -> list[Letter]:
    """Claim every record in dlq_replays, then keep those whose first claim is this one (first write wins)."""
    if not chosen:
        return []
    columns = ["replay_key", "dlq_id", "stage", "source_topic", "partition", "offset", "replay_id", "replayed_at", "replayed_by"]
    now, who = ev.utcnow(), _who(settings)
    rows = [[letter.key, uuid.UUID(letter.dlq_id), letter.stage, letter.source_topic, letter.partition, letter.offset,
             uuid.UUID(replay_id), now, who] for letter in chosen]
    cluster = settings.clickhouse_cluster
    client.insert(ledger.write_table("dlq_replays", cluster), rows, column_names=columns,
                  settings={"distributed_foreground_insert": 1} if cluster else None)
    winners = client.query(f"SELECT replay_key, toString(argMin(replay_id, (replayed_at, replay_id))) FROM "
                           f"{ledger.read_table('dlq_replays', cluster)} WHERE replay_key IN {{keys:Array(String)}} "
                           "GROUP BY replay_key", parameters={"keys": [c.key for c in chosen]}).result_rows
    mine = {key for key, winner in winners if winner == replay_id}
    return [letter for letter in chosen if letter.key in mine]


def unclaim(client, settings: Settings, replay_id: str, failed: list[Letter]) -> None:
    """Drop this replay's claims of records Kafka refused outright (never written), so a later replay may send them."""
    if failed:
        table = ledger.write_table("dlq_replays", settings.clickhouse_cluster)
        client.command(f"DELETE FROM {table} WHERE replay_id = {{rid:UUID}} AND replay_key IN {{keys:Array(String)}}",
                       parameters={"rid": replay_id, "keys": [letter.key for letter in failed]})


def _who(settings: Settings) -> str:
    try:
        return settings.kafka_security.sasl_username or getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container): the claim still counts
        return ""


@dataclass
class Delivery:
    delivered: list[Letter] = field(default_factory=list)
    refused: list[tuple[Letter, str]] = field(default_factory=list)  # Kafka said no: not written
    unknown: list[Letter] = field(default_factory=list)  # no answer in time: it may be written, so its claim stays


def produce(settings: Settings, chosen: list[Letter], timeout: float = 60.0) -> Delivery:
    """Re-produce each record's original bytes to its source topic, to its original partition when it had one."""
    from confluent_kafka import KafkaError, Producer

    producer = Producer(settings.kafka_config(**{"enable.idempotence": True, "linger.ms": 20}))
    out, answered = Delivery(), set()
    partitions = {settings.topic(spec.name): spec.partitions for spec in catalog_by_name().values()}

    def report(letter: Letter, err) -> None:
        answered.add(letter.key)
        if err is None:
            out.delivered.append(letter)
        elif err.code() == KafkaError._MSG_TIMED_OUT:  # maybe written
            out.unknown.append(letter)
        else:
            out.refused.append((letter, err.str()))

    for letter in chosen:
        target = {"partition": letter.partition} if 0 <= letter.partition < partitions.get(letter.source_topic, 0) else {}
        while True:
            try:
                producer.produce(letter.source_topic, letter.payload(), headers=[(REPLAY_HEADER, letter.dlq_id.encode())],
                                 on_delivery=lambda err, _msg, letter=letter: report(letter, err), **target)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(timeout)
    out.unknown += [letter for letter in chosen if letter.key not in answered]
    return out
