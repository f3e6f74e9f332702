"""The contracts as SQL (sql/checks.py) agree with the pydantic contracts (schemas/events.py).

Every field of every staged contract gets every value of a pool of bad and odd JSON values;
real chDB (in a subprocess: one engine per process) stages each record alone and says whether
its checks accept it. The verdicts must agree with pydantic's, except the lossless leniencies
listed in LENIENT; and the canonical JSON of every record pydantic accepts must pass the SQL
with the same values.
"""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from typing import Literal, get_args, get_origin

import pytest

from meterline.schemas import events as ev
from meterline.sql.checks import canonical_json
from meterline.sql.synth import priced_events

MISSING = object()
POOL = [MISSING, None, True, [], {}, 1.5, -1, 0, 10**12 + 1, 10**19, 10**30, "7", "", "x" * 300, "a\x01b", "ü" * 128,
        "2026-02-30T00:00:00Z", "2026-11-29T10:00:00+02:00", "2026-11-29T10:00:00", "2999-01-01T00:00:00Z", "1e-20",
        "0.1234567890123", "1.500000000000000", "1.5E+2", "-0.5", "12345678901234567", "12.5", "0189a7e2-5b1c-7def-8a00-0123456789ab", "not-a-uuid",
        {"k": "v"}, {"": "v"}, {"k" * 200: "v"}, {"k": "v" * 2000}, {f"k{i}": "v" for i in range(65)}, "llm_call",
        # hidden characters: bidi override, line/paragraph separators, BOM, zero-width space, DEL, C1
        "a\u202eb", "a\u2028b", "a\u2029b", "\ufeffa", "a\u200bb", "a\x7fb", "a\x85b",
        # money beyond 12 places at any magnitude, and exact money in other notations
        "1e-400", "1E-13", "0.0000000000001", "0e-400", "1234567890123456.5",
        # times: Unix seconds as a number or a string, and times that exist only outside UTC's years 1-9999
        1733000000, "1733000000", "0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00",
        "1899-12-31T23:59:59Z", "2300-01-01T00:00:00Z"]

def lenient(model: type, name: str, value: object) -> bool:
    """The two leniencies of ClickHouse's JSON reader: a JSON string that parses as an integer is read as
    that integer ("7" as 7, "" as 0) where the contract wants a JSON number, and a JSON 0 or 1 is read as
    false or true where it wants a bool (the same value; the stream writes true/false)."""
    if name in model.model_fields and model.model_fields[name].annotation is bool and value in (0, 1):
        return type(value) is int
    return isinstance(value, str) and name in model.model_fields and kind_of(model, name) == "int"


SCRIPT = """
import json, sys, clickhouse_connect
from meterline.schemas import events as ev
from meterline.sql import ledger
from meterline.sql.checks import Staged
from meterline.sql.writer import STAGE_SETTINGS

client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
ledger.migrate(client)
verdicts, staged, bodies = {}, {}, {}
for offset, line in enumerate(sys.stdin):
    table, contract, record = json.loads(line)
    if table not in staged:
        types = {r[0]: r[1] for r in client.query(f"DESCRIBE TABLE {table}").result_rows}
        staged[table] = Staged(ev.CONTRACTS[contract], table, types)
        for statement in staged[table].create():
            client.command(statement)
    body = record.encode()[:-1] + b',"_topic":"t","_partition":0,"_offset":%d,"_batch_start":0}' % offset
    verdicts[offset] = None
    bodies.setdefault(table, []).append(body)
# One insert per table, a line ClickHouse cannot parse skipped alone: the verdicts of one insert per record
# (compared over all 5,320 records), in 4 s instead of 79.
for table, rows in bodies.items():
    errors = {"input_format_allow_errors_num": len(rows), "input_format_allow_errors_ratio": 1}
    client.raw_insert(staged[table].stage, None, b"\\n".join(rows), settings={**STAGE_SETTINGS, **errors}, fmt="JSONEachRow")
for s in staged.values():
    client.command(s.fill())
    texts = ", ".join(f"toString(v_{f.name}) AS {f.name}" for f in s.fields if not f.stage_type().startswith("Map"))
    for row in client.query(f"SELECT _offset, {texts} FROM {s.typed} WHERE _ok").named_results():
        verdicts[row.pop("_offset")] = row
print(json.dumps([verdicts[i] for i in range(len(verdicts))], default=str))
"""

TABLES = {ev.PricedEvent: ("priced_events", "priced_event"), ev.SpendUpdate: ("spend_updates", "spend_update"),
          ev.Anomaly: ("anomalies", "anomaly"), ev.DeadLetter: ("dead_letters", "dead_letter")}


def base_records() -> dict[type, dict]:
    now = ev.utcnow()
    priced = json.loads(priced_events(1, seed=5)[0][0])
    priced["attributes"] = {"route": "a"}
    spend = ev.build(ev.SpendUpdate, update_id=ev.new_id(), ts=now, tenant_id="acme", scope="session", scope_id="acme/t/p/a/s",
                     window_start=now - timedelta(minutes=1), window_end=now, window_cost_usd=Decimal("0.25"),
                     period_start=now - timedelta(days=3), period_cost_usd=Decimal("12.5"), events=3)
    anomaly = ev.build(ev.Anomaly, anomaly_id=ev.new_id(), ts=now, kind="spend_spike", severity="warning", tenant_id="acme",
                       scope="tenant", scope_id="acme", window_start=now - timedelta(minutes=1), window_end=now,
                       evidence={"rate": "3.5"}, message="spike")
    dead = ev.build(ev.DeadLetter, dlq_id=ev.new_id(), ts=now, stage="sink", source_topic="priced", partition=1, offset=7,
                    reason="bad", error_type="InvalidEvent", payload_b64="e30=")
    return {ev.PricedEvent: priced, ev.SpendUpdate: json.loads(spend.to_json()), ev.Anomaly: json.loads(anomaly.to_json()),
            ev.DeadLetter: json.loads(dead.to_json())}


def kind_of(model: type, name: str) -> str:
    annotation = str(model.model_fields[name].annotation)
    return "int" if "int" in annotation.lower() and "Decimal" not in annotation else name


def literal_values(annotation: object) -> list[object]:
    """Every value a Literal anywhere in the annotation allows (`Scope | Literal["gpu", "model"]`: all seven)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in literal_values(arg)]


def mutations() -> list[tuple[type, str, object, str]]:
    out = []
    for model, base in base_records().items():
        out.append((model, "(none)", None, json.dumps(base)))
        out.append((model, "(unknown field)", 1, json.dumps({**base, "unknown": 1})))
        for name, info in model.model_fields.items():
            for value in POOL + literal_values(info.annotation):
                record = dict(base)
                if value is MISSING:
                    record.pop(name)
                else:
                    record[name] = value
                out.append((model, name, value, json.dumps(record)))
    return out


def sql_verdicts(tmp_path, records: list[tuple[str, str, str]]) -> list[dict | None]:
    stdin = "\n".join(json.dumps(r) for r in records)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ch")], input=stdin, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.xdist_group("sql_checks")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    cases = mutations()
    valid = {}
    for i, (model, _, _, raw) in enumerate(cases):
        try:
            valid[i] = ev.decode(model, raw.encode())
        except ev.InvalidEvent:
            pass
    records = [(*TABLES[model], raw) for model, _, _, raw in cases]
    records += [(*TABLES[type(record)], canonical_json(record).decode()) for record in valid.values()]
    sql = sql_verdicts(tmp_path_factory.mktemp("checks"), records)
    return cases, valid, sql[:len(cases)], dict(zip(valid, sql[len(cases):]))


def test_the_sql_rejects_what_the_contract_rejects(verdicts):
    cases, valid, sql, _ = verdicts
    assert len(cases) > 1000
    wrongly_accepted = [(model.__name__, name, value) for i, (model, name, value, _) in enumerate(cases)
                        if sql[i] is not None and i not in valid and not lenient(model, name, value)]
    assert wrongly_accepted == [], "\n".join(map(repr, wrongly_accepted))


def test_canonical_json_of_every_valid_record_passes_with_the_contracts_values(verdicts):
    _, valid, _, canonical = verdicts
    assert len(valid) > 50
    for i, record in valid.items():
        row = canonical[i]
        assert row is not None, f"rejected: {canonical_json(record)!r}"
        for name, value in record:
            if name in row and isinstance(value, (int, Decimal, str)) and not isinstance(value, bool):
                assert Decimal(row[name]) == value if isinstance(value, Decimal) else str(row[name]) == str(value), name


def test_the_sql_accepts_the_records_meterline_writes(verdicts):
    cases, _, sql, _ = verdicts
    assert all(sql[i] is not None for i, (_, name, _, _) in enumerate(cases) if name == "(none)")
