"""The shared half of the sink-intake fuzz tests (tests/test_sql_sink.py draws JSON records, tests/test_priced_v2.py
priced.v2 ones): one drawn batch through the real broker, the real sink and a fresh chDB, judged by the contract.

Oracle: `decode_one` (the pydantic contract, or decode_priced for either wire format). A valid record is stored
exactly once; an invalid one is dead-lettered at its offset; no dead letter is a LedgerCheck (the SQL checks and
the contract disagreeing); the sink exits cleanly.
"""
from __future__ import annotations

import uuid
from typing import Any, Callable

from conftest import delete_topics_with_prefix
from meterline.schemas.events import InvalidEvent
from meterline.settings import Settings
from meterline.topics import catalog_by_name, create_topics


def check_intake(kafka_bootstrap: str, tmp_path_factory: Any, name: str, batch: list[bytes],
                 decode_one: Callable[[bytes], Any]) -> None:
    from test_sql_sink import ledger_sql, produce, sink_until_idle  # lazy: test_sql_sink imports this module

    base = tmp_path_factory.mktemp(name)
    settings = Settings(data_dir=base / "data", kafka_bootstrap=kafka_bootstrap, topic_prefix=f"{name}{uuid.uuid4().hex[:10]}",
                        clickhouse_dsn=f"chdb://{base / 'clickhouse'}")
    create_topics(settings)
    valid = {}
    for i, raw in enumerate(batch):
        try:
            valid[i] = str(decode_one(raw).event_id)
        except InvalidEvent:
            pass
    produce(settings, "priced", batch)
    sink_until_idle(settings)
    stored = ledger_sql(settings, "SELECT toString(event_id) AS id, count() AS n FROM priced_events GROUP BY id")
    assert {r["id"] for r in stored} == set(valid.values()) and all(r["n"] == 1 for r in stored)
    dead = ledger_sql(settings, "SELECT partition, offset, error_type FROM dead_letters WHERE stage = 'sink'")
    assert not [d for d in dead if d["error_type"] == "LedgerCheck"], dead
    partitions = catalog_by_name()["priced"].partitions
    invalid_at = {(i % partitions, i // partitions) for i in range(len(batch)) if i not in valid}
    assert invalid_at <= {(d["partition"], d["offset"]) for d in dead}
    delete_topics_with_prefix(settings)
