"""The ClickHouse ledger schema on real chDB: migrations, exact money, every contract fits."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from meterline.schemas.events import (
    Anomaly,
    BudgetPolicy,
    DeadLetter,
    DecisionLimits,
    GpuSample,
    PricedEvent,
    SpendUpdate,
    ThrottleDecision,
    new_id,
    utcnow,
)
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.rows import contract_row, gpu_sample_row, insert_rows, with_offsets


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory) -> str:
    """One chDB path for this whole test process (chDB allows one per process)."""
    return str(tmp_path_factory.mktemp("ledger"))


@pytest.fixture
def client(chdb_path):
    """A migrated ledger in a database of its own."""
    c = ledger.connect(Settings(clickhouse_dsn=f"chdb://{chdb_path}"), database=f"t_{uuid.uuid4().hex[:12]}")
    ledger.migrate(c)
    return c


def priced(**overrides) -> PricedEvent:
    fields = dict(
        event_id=new_id(), ts=utcnow(), tenant_id="acme", team="search", project="p1", agent_id="a1",
        session_id="s1", kind="llm_call", provider="openai", model="gpt-4o", input_tokens=1200,
        output_tokens=300, cache_read_tokens=1000, cost_usd=Decimal("0.000000123456"),
        input_cost_usd=Decimal("0.000000100000"), output_cost_usd=Decimal("0.000000023456"),
        cost_source="catalog", catalog_version="2025-06-01+abc", priced_at=utcnow(),
        attributes={"gen_ai.conversation.id": "c1"},
    )
    return PricedEvent(**{**fields, **overrides})


def test_migrations_apply_twice_and_record_each_file_once(client):
    assert ledger.migrate(client) == []
    names = [m.name for m in ledger.load_migrations()]
    recorded = client.query("SELECT name FROM schema_migrations ORDER BY version").result_rows
    assert [r[0] for r in recorded] == names
    assert {r["state"] for r in ledger.migration_status(client)} == {"applied"}


def test_money_reads_back_to_the_last_digit(client):
    tiny = Decimal("0.000000123456789012")
    big = Decimal("12345678901234567890.123456789012345678")
    for i, cost in enumerate((tiny, big)):
        row = with_offsets(contract_row(priced()), "priced", 0, i)
        row["cost_usd"] = cost
        insert_rows(client, "priced_events", [row])
    got = client.query("SELECT cost_usd, toString(cost_usd) FROM priced_events ORDER BY _offset").result_rows
    assert [g[0] for g in got] == [tiny, big]
    assert [g[1] for g in got] == ["0.000000123456789012", "12345678901234567890.123456789012345678"]
    rollup = client.query("SELECT sum(cost_usd) FROM usage_hourly").result_rows[0][0]
    assert rollup == Decimal("12345678901234567890.123456912469134690")  # exact; Python's default 28 digits would round


def _ms(value):
    """ClickHouse keeps milliseconds and returns UTC wall time."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).replace(tzinfo=None, microsecond=value.microsecond // 1000 * 1000) \
            if value.tzinfo else value
    return value


def _contract_examples():
    now = utcnow()
    return {
        "spend_updates": SpendUpdate(
            update_id=new_id(), ts=now, tenant_id="acme", scope="team", scope_id="acme/search",
            window_start=now - timedelta(minutes=1), window_end=now, window_cost_usd=Decimal("1.5"),
            period_start=now.replace(day=1), period_cost_usd=Decimal("12.000000000001"), events=3,
            gpu_seconds=Decimal("2.5"), gpu_cost_usd=Decimal("0.01")),
        "anomalies": Anomaly(
            anomaly_id=new_id(), ts=now, kind="spend_spike", severity="warning", tenant_id="acme", scope="tenant",
            scope_id="acme", window_start=now - timedelta(minutes=5), window_end=now, evidence={"ewma": "1.25"},
            message="spend 8x above the tenant's usual rate"),
        "throttle_decisions": ThrottleDecision(
            decision_id=new_id(), tenant_id="acme", scope="agent", scope_id="acme/a1", priority=None, action="downgrade",
            limits=DecisionLimits(tokens_per_min=1000), max_model="gpt-4o-mini", reason="pacing",
            budget_remaining_usd=Decimal("-0.5"), issued_at=now, expires_at=now + timedelta(minutes=1)),
        "budget_policies": BudgetPolicy(
            policy_id="b1", tenant_id="acme", scope="team", scope_id="acme/search", amount=Decimal("100.000000000001")),
        "dead_letters": DeadLetter(
            dlq_id=new_id(), ts=now, stage="sink", source_topic="meterline.priced.v1", partition=3, offset=42,
            reason="invalid PricedEvent: ts: field required", error_type="InvalidEvent", payload_b64="e30="),
    }


@pytest.mark.parametrize("table", ["spend_updates", "anomalies", "throttle_decisions", "budget_policies", "dead_letters"])
def test_each_table_accepts_a_row_from_its_contract(client, table):
    record = _contract_examples()[table]
    insert_rows(client, table, [with_offsets(contract_row(record), "t", 1, 7)])
    result = client.query(f"SELECT * FROM {table}")
    (row,) = [dict(zip(result.column_names, r)) for r in result.result_rows]
    expected = contract_row(record)
    assert {k: _ms(v) for k, v in expected.items()} == {k: _ms(row[k]) for k in expected}
    assert (row["_topic"], row["_partition"], row["_offset"]) == ("t", 1, 7)


def test_priced_and_gpu_tables_accept_contract_rows_and_fill_rollups(client):
    event = priced()
    insert_rows(client, "priced_events", [with_offsets(contract_row(event), "priced", 2, 10)])
    sample = GpuSample(
        sample_id=new_id(), ts=utcnow(), node="n1", level="mig", gpu_index=0, gpu_uuid="GPU-1", gpu_name="H100",
        mig_uuid="MIG-1", mig_profile="3g.40gb", mig_slices=3, mig_total_slices=7, interval_ms=1000,
        tenant_id="acme", session_id="s1", attributed=True, energy_mj_delta=500)
    gpu_row = gpu_sample_row(sample, Decimal("0.428571428571428571"), Decimal("0.000476190476190476"), "v1")
    insert_rows(client, "gpu_samples", [with_offsets(gpu_row, "gpu", 0, 1)])
    usage = client.query("SELECT sum(events), sum(input_tokens), sum(cost_usd) FROM usage_hourly").result_rows[0]
    assert usage == (1, 1200, event.cost_usd)
    gpu = client.query("SELECT sum(samples), sum(gpu_seconds), sum(cost_usd), sum(energy_mj) FROM gpu_hourly").result_rows[0]
    assert gpu == (1, Decimal("0.428571428571428571"), Decimal("0.000476190476190476"), 500)
    ids = client.query("SELECT count() FROM priced_event_ids WHERE event_id = {e:UUID}", parameters={"e": event.event_id})
    assert ids.result_rows[0][0] == 1


def test_tables_have_a_column_for_every_contract_field(client):
    """A contract field added without a migration would make the sink's insert fail."""
    contracts = {t.name: t.contract for t in ledger.TABLES}
    from meterline.schemas.events import CONTRACTS

    for table, contract in contracts.items():
        columns = {r[0] for r in client.query(f"DESCRIBE TABLE {table}").result_rows}
        fields = set(CONTRACTS[contract].model_fields) - ({"limits"} if table == "throttle_decisions" else set())
        fields |= set(DecisionLimits.model_fields) if table == "throttle_decisions" else set()
        if table == "budget_policies":  # the SLO is flattened to a column per objective (sql/rows.py, migration 0014)
            from meterline.schemas.events import Slo

            fields = fields - {"slo"} | {f"slo_{name}" for name in Slo.model_fields}
        assert fields <= columns, f"{table} lacks {fields - columns}"
        assert set(ledger.KAFKA_COLUMNS) <= columns
        money = client.query(f"SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                             f"AND table = '{table}' AND type LIKE '%Float%'").result_rows
        assert money == []


def test_cluster_rendering_makes_replicated_and_distributed_tables():
    sql = ledger.load_migrations()[0].sql
    out = ledger.render_for_cluster(sql, "prod")
    statements = ledger.split_statements(out)
    assert all(" ON CLUSTER 'prod'" in s for s in statements)
    assert "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/priced_events', '{replica}')" in out
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/priced_event_ids', '{replica}')" in out
    assert ("CREATE TABLE IF NOT EXISTS priced_events_all ON CLUSTER 'prod' AS priced_events ENGINE = "
            "Distributed('prod', currentDatabase(), 'priced_events', cityHash64(tenant_id))") in out
    assert len(statements) == len(ledger.split_statements(sql)) + 2  # two Distributed tables
    rollups = ledger.render_for_cluster(ledger.load_migrations()[3].sql, "prod")
    assert "ReplicatedSummingMergeTree(" in rollups and "usage_hourly_all" in rollups
    column = ledger.split_statements(ledger.render_for_cluster(ledger.load_migrations()[4].sql, "prod"))
    assert [s.split(" ADD ")[0] for s in column] == ["ALTER TABLE gpu_samples ON CLUSTER 'prod'",
                                                       "ALTER TABLE gpu_samples_all ON CLUSTER 'prod'"]


def test_readonly_setting_stops_a_write_the_parser_let_through(client):
    with pytest.raises(Exception, match="(?i)readonly"):
        client.command("INSERT INTO dead_letters (dlq_id) VALUES (generateUUIDv4())", settings={"readonly": 1})


def test_rebuild_rollups_puts_one_month_back_in_line_with_the_raw_tables(client):
    now = utcnow()
    earlier = now.replace(day=1) - timedelta(days=3)  # last month: must stay as it is
    hour = now.replace(minute=0, second=0, microsecond=0)
    events = [priced(ts=hour + timedelta(milliseconds=i), cost_usd=Decimal(f"0.{i + 1}")) for i in range(5)] + [priced(ts=earlier)]
    insert_rows(client, "priced_events", [with_offsets(contract_row(e), "priced", 0, i) for i, e in enumerate(events)])
    sample = GpuSample(sample_id=new_id(), ts=now, node="n1", level="gpu", gpu_index=0, gpu_uuid="GPU-1",
                       gpu_name="NVIDIA H100 80GB HBM3", interval_ms=1000)
    insert_rows(client, "gpu_samples", [with_offsets(gpu_sample_row(sample, Decimal(1), Decimal("0.5"), "v"), "gpu", 0, 0)])
    # what a crash between a raw insert and its views leaves: rollup rows the raw tables do not back
    insert_rows(client, "usage_hourly", [{"hour": hour, "tenant_id": "acme", "events": 7, "cost_usd": Decimal(9)}])
    insert_rows(client, "gpu_hourly", [{"hour": hour, "tenant_id": "", "samples": 3, "cost_usd": Decimal(4)}])
    totals = ("SELECT toYYYYMM(hour) AS m, sum(events), toString(sum(cost_usd)) FROM usage_hourly GROUP BY m ORDER BY m",
              "SELECT toYYYYMM(hour) AS m, sum(samples), toString(sum(cost_usd)) FROM gpu_hourly GROUP BY m ORDER BY m")
    before = [client.query(q).result_rows for q in totals]

    month = now.year * 100 + now.month
    assert ledger.rebuild_rollups(client, month) == {"usage_hourly": 1, "gpu_hourly": 1}  # one hour, one key each
    usage, gpu = (client.query(q).result_rows for q in totals)
    assert usage[-1] == (month, 5, "1.5") and usage[:-1] == before[0][:-1]  # last month untouched
    assert gpu == [(month, 1, "0.5")]


def test_compute_samples_keep_exact_quantities_and_costs_and_are_deduplicated_by_their_id_table(client):
    from meterline.schemas.events import ComputeSample
    from meterline.sql.rows import compute_sample_row

    sample = ComputeSample(sample_id=new_id(), ts=utcnow(), node="n1", node_class="n2", level="cgroup",
                           cgroup="/kubepods/pod1/abc", pod_uid="pod1", interval_ms=10_000,
                           cpu_user_seconds=Decimal("1.234567"), cpu_system_seconds=Decimal("0.000001"),
                           memory_bytes=3 << 30, memory_peak_bytes=4 << 30, memory_byte_seconds=Decimal(3 << 30) * 10,
                           tenant_id="acme", session_id="s1", attributed=True)
    row = compute_sample_row(sample, Decimal("0.000010840734"), Decimal("0.000035308333"), "v1")
    assert row["cost_usd"] == Decimal("0.000046149067")
    insert_rows(client, "compute_samples", [with_offsets(row, "compute", 0, 1)])
    got = client.query("SELECT cpu_user_seconds + cpu_system_seconds, memory_byte_seconds, cpu_cost_usd, memory_cost_usd, "
                       "cost_usd, memory_peak_bytes FROM compute_samples").result_rows[0]
    assert got == (Decimal("1.234568"), Decimal(3 << 30) * 10, Decimal("0.000010840734"), Decimal("0.000035308333"),
                   Decimal("0.000046149067"), 4 << 30)
    ids = client.query("SELECT count() FROM compute_sample_ids WHERE sample_id = {s:UUID}", parameters={"s": sample.sample_id})
    assert ids.result_rows[0][0] == 1
