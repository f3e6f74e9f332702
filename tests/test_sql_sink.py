"""The ledger sink against the real broker and real chDB.

The sink runs as `meterline sink` in a subprocess (it owns the chDB data directory while it
runs); the ledger is read afterwards with `meterline sql` in another subprocess, so this
test process never opens a chDB engine of its own.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from brokers import committed_sum
from meterline.schemas.events import DeadLetter, GpuSample, PricedEvent, ThrottleDecision, decode, new_id, utcnow
from meterline.settings import Settings
from meterline.sql.synth import priced_events
from meterline.topics import catalog_by_name, create_topics
from sink_fuzz import check_intake

METERLINE = [str(Path(sys.executable).with_name("meterline"))]
CRASH_EVENTS = int(os.environ.get("METERLINE_TEST_CRASH_EVENTS", "100000"))


def _env(settings: Settings) -> dict[str, str]:
    return {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
            "METERLINE_CLICKHOUSE_DSN": settings.dsn, "METERLINE_DATA_DIR": str(settings.data_dir)}


def group(settings: Settings) -> str:
    return f"ledger-{settings.topic_prefix}"  # a group per test: members of other tests never share it


def start_sink(settings: Settings, *args: str) -> subprocess.Popen:
    cmd = [*METERLINE, "sink", "--group", group(settings), "--instance-id", "sink-1", *args]
    return subprocess.Popen(cmd, env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sink_until_idle(settings: Settings, *args: str) -> str:
    proc = start_sink(settings, "--until-idle", "3", *args)
    out, _ = proc.communicate()
    assert proc.returncode == 0, out
    return out


def ledger_sql(settings: Settings, query: str) -> list[dict]:
    done = subprocess.run([*METERLINE, "sql", query, "--format", "json"], env=_env(settings), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def produce(settings: Settings, topic: str, records: list[bytes | None], keys: list[bytes] | None = None) -> None:
    producer = Producer(settings.kafka_config(**{"linger.ms": 50, "enable.idempotence": True}))
    name, partitions = settings.topic(topic), catalog_by_name()[topic].partitions
    for i, value in enumerate(records):
        while True:
            try:
                producer.produce(name, value, key=keys[i] if keys else None, partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def committed_total(consumer: Consumer, settings: Settings, topic: str) -> int:
    tps = [TopicPartition(settings.topic(topic), p) for p in range(catalog_by_name()[topic].partitions)]
    return committed_sum(consumer, tps)


def _usd(units: int) -> Decimal:
    return Decimal(units).scaleb(-12)


def test_sigkill_anywhere_neither_loses_nor_doubles_a_row(settings):
    records, truth = priced_events(CRASH_EVENTS, seed=11)
    produce(settings, "priced", records)
    # Kill the sink at several points: right after start, and each time more rows are committed.
    watcher = Consumer(settings.kafka_config(**{"group.id": group(settings)}))
    for fraction in (0.0, 0.2, 0.45, 0.7):
        proc = start_sink(settings, "--batch-rows", "7000")
        target = int(CRASH_EVENTS * fraction)
        while proc.poll() is None and committed_total(watcher, settings, "priced") < target:
            pass  # Kafka's committed offsets trail the ledger: these rows are stored
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    watcher.close()
    sink_until_idle(settings)

    stored = ledger_sql(settings, "SELECT count() AS n, uniqExact(_topic, _partition, _offset) AS coords, "
                                  "uniqExact(event_id) AS ids FROM priced_events")[0]
    assert stored == {"n": CRASH_EVENTS, "coords": CRASH_EVENTS, "ids": CRASH_EVENTS}
    for column, expected in (("tenant_id", truth.by_tenant), ("model", truth.by_model)):
        for source in ("priced_events", "usage_hourly"):
            rows = ledger_sql(settings, f"SELECT {column} AS k, toString(sum(cost_usd)) AS usd FROM {source} GROUP BY k")
            assert {r["k"]: Decimal(r["usd"]) for r in rows} == {k: _usd(v) for k, v in expected.items()}, source
    rows = ledger_sql(settings, "SELECT tenant_id, team, toString(sum(cost_usd)) AS usd FROM priced_events GROUP BY 1, 2")
    assert {(r["tenant_id"], r["team"]): Decimal(r["usd"]) for r in rows} == {k: _usd(v) for k, v in truth.by_team.items()}


def test_duplicate_event_ids_never_reach_the_rollups(settings):
    records, truth = priced_events(3000, seed=5)
    produce(settings, "priced", records + records[:500])  # duplicates inside one batch
    sink_until_idle(settings)
    produce(settings, "priced", records[1000:1600])  # duplicates of rows already in the ledger
    sink_until_idle(settings)
    total = sum(truth.by_tenant.values())
    got = ledger_sql(settings, "SELECT (SELECT count() FROM priced_events) AS n, "
                               "(SELECT toString(sum(cost_usd)) FROM priced_events) AS raw, "
                               "(SELECT toString(sum(cost_usd)) FROM usage_hourly) AS rollup, "
                               "(SELECT sum(events) FROM usage_hourly) AS events")[0]
    assert got["n"] == 3000 and got["events"] == 3000
    assert Decimal(got["raw"]) == Decimal(got["rollup"]) == _usd(total)


def test_malformed_records_go_to_the_dlq_and_their_neighbours_land(settings):
    records, truth = priced_events(200, seed=3)
    bad = [b'{"broken', b"[]", records[0].replace(b'"input_tokens":', b'"input_tokens":-'),
           records[1].replace(b'"kind":"llm_call"', b'"kind":"teleport"'), b"\xff\xfe"]
    produce(settings, "priced", records[:100] + bad + records[100:])
    sink_until_idle(settings)

    consumer = Consumer(settings.kafka_config(**{"group.id": "dlq-reader", "auto.offset.reset": "earliest"}))
    consumer.subscribe([settings.topic("dlq")])
    letters: list[DeadLetter] = []
    while len(letters) < len(bad):
        msg = consumer.poll(10)
        assert msg is not None, f"only {len(letters)} dead letters arrived"
        letters.append(decode(DeadLetter, msg.value()))
    consumer.close()

    assert sorted(base64.b64decode(d.payload_b64) for d in letters) == sorted(bad)
    assert all(d.reason and d.source_topic == settings.topic("priced") for d in letters)
    assert any("input_tokens" in d.reason for d in letters) and any("kind" in d.reason for d in letters)
    got = ledger_sql(settings, "SELECT (SELECT count() FROM priced_events) AS n, "
                               "(SELECT toString(sum(cost_usd)) FROM priced_events) AS usd")[0]
    assert got["n"] == 200 and Decimal(got["usd"]) == _usd(sum(truth.by_tenant.values()))


def test_gpu_samples_are_priced_with_the_catalog_and_rolled_up(settings):
    from meterline.streams.pricing import load_catalog

    samples = [GpuSample(sample_id=new_id(), ts=utcnow(), node="n1", level="mig", gpu_index=0, gpu_uuid="GPU-1",
                         gpu_name="NVIDIA H100 80GB HBM3", mig_slices=3, mig_total_slices=7, interval_ms=1000,
                         tenant_id="acme", session_id=f"s{i % 3}", attributed=True) for i in range(30)]
    produce(settings, "gpu", [s.to_json() for s in samples] + [samples[0].to_json()])  # one duplicate
    sink_until_idle(settings)
    catalog = load_catalog()
    seconds, cost = catalog.gpu_sample_cost(samples[0])
    got = ledger_sql(settings, "SELECT sum(samples) AS n, toString(sum(gpu_seconds)) AS s, toString(sum(cost_usd)) AS usd "
                               "FROM gpu_hourly WHERE tenant_id = 'acme'")[0]
    assert got["n"] == 30 and Decimal(got["s"]) == 30 * seconds and Decimal(got["usd"]) == 30 * cost
    versions = ledger_sql(settings, "SELECT DISTINCT catalog_version AS v FROM gpu_samples")
    assert versions == [{"v": catalog.version}]


def test_compute_samples_are_priced_at_ingest_and_an_unknown_node_class_is_kept_unpriced(settings):
    from meterline.schemas.events import ComputeSample
    from meterline.streams.pricing import load_catalog

    samples = [ComputeSample(sample_id=new_id(), ts=utcnow(), node="n1", node_class="n2", level="process", pid=100 + i,
                             interval_ms=10_000, cpu_user_seconds=Decimal("1.5"), cpu_system_seconds=Decimal("0.25"),
                             memory_bytes=1 << 30, memory_peak_bytes=1 << 30, memory_byte_seconds=Decimal(10 << 30),
                             tenant_id="acme", session_id=f"s{i % 2}", attributed=True,
                             cpu_limit_cores=Decimal("1.5") if i == 3 else None) for i in range(10)]
    stray = ComputeSample(**{**samples[0].model_dump(), "sample_id": new_id(), "node_class": "no-such-class",
                             "tenant_id": "", "session_id": "", "attributed": False})
    produce(settings, "compute", [s.to_json() for s in (*samples, stray, samples[0])])  # one duplicate
    sink_until_idle(settings)
    cpu, memory = load_catalog().compute_sample_cost(samples[0])
    got = ledger_sql(settings, "SELECT count() AS n, toString(sum(cpu_cost_usd)) AS cpu, toString(sum(memory_cost_usd)) AS mem, "
                               "toString(sum(cost_usd)) AS usd FROM compute_samples WHERE tenant_id = 'acme'")[0]
    assert got["n"] == 10 and Decimal(got["cpu"]) == 10 * cpu and Decimal(got["mem"]) == 10 * memory
    assert Decimal(got["usd"]) == 10 * (cpu + memory) and cpu > 0 and memory > 0
    kept = ledger_sql(settings, "SELECT catalog_version AS v, toString(cost_usd) AS usd, attributed FROM compute_samples "
                                "WHERE node_class = 'no-such-class'")
    assert kept == [{"v": "unpriced", "usd": "0", "attributed": False}]  # kept with its usage, never a made-up price
    limits = ledger_sql(settings, "SELECT pid, toString(cpu_limit_cores) AS cores FROM compute_samples "
                                  "WHERE cpu_limit_cores IS NOT NULL")
    assert limits == [{"pid": 103, "cores": "1.5"}]  # a cgroup's cpu.max (migration 0017), NULL for the rest


def test_collect_node_publishes_attributed_samples_that_reach_the_ledger_priced(settings):
    """`meterline collect node` end to end: its own process runs in a session (METERLINE_* in its environment),
    so at least its own row is attributed; every other process on this machine is there too, unattributed."""
    env = {**_env(settings), "METERLINE_TENANT_ID": "acme", "METERLINE_SESSION_ID": "s-collector", "METERLINE_TEAM": "ops"}
    done = subprocess.run([*METERLINE, "collect", "node", "--once", "--interval", "0.5", "--node", "n-test", "--node-class", "n2"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sink_until_idle(settings)
    rows = ledger_sql(settings, "SELECT attributed, tenant_id, team, session_id, count() AS n, toString(sum(cost_usd)) AS usd, "
                                "toString(sum(memory_cost_usd)) AS mem, any(catalog_version) AS v FROM compute_samples "
                                "WHERE node = 'n-test' GROUP BY attributed, tenant_id, team, session_id ORDER BY attributed")
    mine = [r for r in rows if r["session_id"] == "s-collector"]  # (other sessions' agents on this machine are theirs)
    assert [(r["attributed"], r["tenant_id"], r["team"]) for r in mine] == [(True, "acme", "ops")]
    assert Decimal(mine[0]["mem"]) > 0 and mine[0]["v"] != "unpriced"  # it holds memory, priced as n2
    assert rows[0]["attributed"] is False and rows[0]["n"] >= 1  # the rest of the machine: kept, unattributed


def test_reasoning_tokens_and_missing_usage_reach_the_ledger(settings):
    first, second = priced_events(2, seed=9)[0]
    reasoning = json.loads(first)
    reasoning["reasoning_tokens"] = reasoning["output_tokens"] // 2
    missing = {**json.loads(second), "input_tokens": 0, "output_tokens": 0, "usage": "missing"}
    broken = {**json.loads(second), "event_id": str(new_id()), "reasoning_tokens": json.loads(second)["output_tokens"] + 1}
    produce(settings, "priced", [json.dumps(r).encode() for r in (reasoning, missing, broken)])
    sink_until_idle(settings)
    rows = ledger_sql(settings, "SELECT reasoning_tokens, usage FROM priced_events ORDER BY usage DESC")
    assert [(r["reasoning_tokens"], r["usage"]) for r in rows] == [(reasoning["reasoning_tokens"], "reported"), (0, "missing")]
    letters = ledger_sql(settings, "SELECT reason FROM dead_letters")
    assert len(letters) == 1 and "reasoning_tokens" in letters[0]["reason"]  # more reasoning than output: refused


def test_budget_tombstones_are_kept_as_deleted_history(settings):
    policy = b'{"policy_id":"b1","tenant_id":"acme","scope":"tenant","scope_id":"acme","amount":"10"}'
    produce(settings, "budgets", [policy, None], keys=[b"b1", b"b1"])
    sink_until_idle(settings)
    rows = ledger_sql(settings, "SELECT policy_id, deleted, toString(amount) AS amount FROM budget_policies ORDER BY _offset")
    assert [(r["policy_id"], r["deleted"]) for r in rows] == [("b1", False), ("b1", True)]
    assert Decimal(rows[0]["amount"]) == 10



def test_a_retired_decision_s_tombstone_is_no_dead_letter(settings):
    """The allocator retires a decision with a tombstone on the compacted control topic: the sink stores the
    decision and skips its retirement (each demo run dead-lettered a few); a tombstone on priced is still bad input."""
    now = utcnow()
    decision = ThrottleDecision(decision_id=new_id(), tenant_id="acme", scope="tenant", scope_id="acme", priority="normal",
                                action="throttle", reason="pacing", issued_at=now, expires_at=now + timedelta(minutes=1))
    key = b"tenant:acme:normal"
    produce(settings, "control", [decision.to_json(), None], keys=[key, key])
    produce(settings, "priced", [None])
    out = sink_until_idle(settings)
    assert [r["decision_id"] for r in ledger_sql(settings, "SELECT toString(decision_id) AS decision_id FROM throttle_decisions")] \
        == [str(decision.decision_id)]
    letters = ledger_sql(settings, "SELECT source_topic, reason FROM dead_letters")
    assert [r["source_topic"] for r in letters] == [settings.topic("priced")] and "tombstone" in letters[0]["reason"], letters
    assert "'tombstones': 1" in out, out[-2000:]


OUTAGE_SCRIPT = """
import sys, threading
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.sink import LedgerSink

class DownForAWhile:
    '''A real chDB client whose first `failures` calls of the kinds in `calls` fail, as when the server is down.
    A kind is a method name, or a method name and the start of its SQL ("command:INSERT INTO priced_events").'''
    def __init__(self, client, failures, calls):
        self.client, self.failures, self.calls = client, failures, calls.split(",")
    def __getattr__(self, name):
        method = getattr(self.client, name)
        def call(*args, **kwargs):
            sql = args[0] if args and isinstance(args[0], str) else ""
            hit = any(kind == name or (kind.startswith(name + ":") and sql.startswith(kind.split(":", 1)[1])) for kind in self.calls)
            if hit and self.failures > 0:
                self.failures -= 1
                raise ConnectionError("Connection refused (ClickHouse is down)")
            return method(*args, **kwargs)
        return call if callable(method) else method

settings = Settings()
real = ledger.connect(settings)
ledger.migrate(real)
sink = LedgerSink(settings, client=DownForAWhile(real, int(sys.argv[1]), sys.argv[3]), group=sys.argv[2], max_backoff_s=0.4)
sink.run(threading.Event(), idle_exit_s=3)
print("retries", sink.stats["retries"])
"""


@pytest.mark.parametrize("calls", ["insert,raw_insert,query", "command:INSERT INTO priced_events"],
                         ids=["down from the start", "down during the final insert"])
def test_clickhouse_down_is_retried_with_backoff_and_nothing_is_lost(settings, calls):
    records, truth = priced_events(3000, seed=5)
    produce(settings, "priced", records)
    failures = "6" if "," in calls else "2"
    done = subprocess.run([sys.executable, "-c", OUTAGE_SCRIPT, failures, group(settings), calls], env=_env(settings),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split("retries")[-1]) >= int(failures)  # every failed call was retried
    assert "ledger unavailable" in done.stderr                  # and the outage was logged, with the lag
    got = ledger_sql(settings, "SELECT count() AS n, uniqExact(event_id) AS ids, toString(sum(cost_usd)) AS usd FROM priced_events")[0]
    assert got["n"] == got["ids"] == 3000
    assert Decimal(got["usd"]) == _usd(sum(truth.by_tenant.values()))


CHECK_BUG_SCRIPT = """
import sys, threading
from meterline.schemas import events as ev
from meterline.settings import Settings
from meterline.sql import checks, ledger
from meterline.sql.sink import LedgerSink

checks.RULES[ev.UsageEvent] += ("v_output_tokens != 7",)  # a bug in the SQL checks: rejects a valid record
settings = Settings()
client = ledger.connect(settings)
ledger.migrate(client)
sink = LedgerSink(settings, client=client, group=sys.argv[1])
sink.run(threading.Event(), idle_exit_s=3)
print("ledger_check_rejections", sink.stats["ledger_check_rejections"])
"""


def test_a_valid_record_the_sql_checks_wrongly_reject_is_dead_lettered_not_lost(settings):
    """The safety net under sql/checks.py: if its rules ever disagree with the contract, the record is kept
    in the dead-letter topic with a reason saying so, and its neighbours still land. It is counted and logged as
    an error naming it (as every GPU- or model-scoped anomaly was, unseen, among routine dead letters)."""
    records, _ = priced_events(50, seed=9)
    odd = json.loads(records[0])
    odd.update(output_tokens=7, output_cost_usd="0")
    produce(settings, "priced", [json.dumps(odd).encode(), *records[1:]])
    done = subprocess.run([sys.executable, "-c", CHECK_BUG_SCRIPT, group(settings)], env=_env(settings),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ledger_check_rejections 1" in done.stdout, done.stdout[-2000:]
    assert f"meterline bug, please report it; they are kept on {settings.topic('dlq')}" in done.stderr, done.stderr[-3000:]
    assert f"first {settings.topic('priced')}[" in done.stderr
    consumer = Consumer(settings.kafka_config(**{"group.id": "dlq-reader", "auto.offset.reset": "earliest"}))
    consumer.subscribe([settings.topic("dlq")])
    msg = consumer.poll(30)
    consumer.close()
    letter = decode(DeadLetter, msg.value())
    assert letter.error_type == "LedgerCheck" and "sql/checks.py" in letter.reason
    assert json.loads(base64.b64decode(letter.payload_b64)) == odd
    assert ledger_sql(settings, "SELECT count() AS n FROM priced_events")[0]["n"] == 49


SLOW_FETCH_SCRIPT = """
import sys, threading
from meterline.settings import Settings
from meterline.sql.sink import LedgerSink

# The broker holds each fetch 4 s (it waits for more bytes than there are): the first records
# arrive well after the 1 s of idleness allowed, as on a machine too busy to fetch at once.
sink = LedgerSink(Settings(), group=sys.argv[1], consumer_overrides={"fetch.min.bytes": 100_000_000, "fetch.wait.max.ms": 4000})
sink.run(threading.Event(), idle_exit_s=1)
"""


def test_until_idle_never_exits_while_an_assigned_partition_has_unread_records(settings):
    """The crash test's flake: a draining sink took a slow first fetch for the end of the data and left
    records out of the ledger."""
    records, truth = priced_events(300, seed=13)
    produce(settings, "priced", records)
    migrated = subprocess.run([*METERLINE, "migrate"], env=_env(settings), capture_output=True, text=True)
    assert migrated.returncode == 0, migrated.stderr
    done = subprocess.run([sys.executable, "-c", SLOW_FETCH_SCRIPT, group(settings)], env=_env(settings),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = ledger_sql(settings, "SELECT count() AS n, toString(sum(cost_usd)) AS usd FROM priced_events")[0]
    assert got["n"] == 300 and Decimal(got["usd"]) == _usd(sum(truth.by_tenant.values()))


REBALANCE_SCRIPT = """
import sys, threading, time
from confluent_kafka import Consumer
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.sink import LedgerSink
from meterline.sql.synth import priced_events
from tests_produce import produce

settings, group = Settings(), sys.argv[1]
revoked, blocking, armed = threading.Event(), threading.Event(), threading.Event()

class SlowInsert:
    '''The ledger's insert, held (once, when armed) until the group rebalances: an insert in flight.'''
    def __init__(self, client):
        self.client = client
    def __getattr__(self, name):
        method = getattr(self.client, name)
        def call(*args, **kwargs):
            if name == "command" and str(args[0]).startswith("INSERT INTO priced_events") and armed.is_set():
                armed.clear(); blocking.set(); revoked.wait(60)
            return method(*args, **kwargs)
        return call if callable(method) else method

real = ledger.connect(settings)
ledger.migrate(real)
sink = LedgerSink(settings, client=SlowInsert(real), group=group)
on_revoke = sink._on_revoke
sink._on_revoke = lambda consumer, partitions: (revoked.set(), on_revoke(consumer, partitions))
stop = threading.Event()
runner = threading.Thread(target=sink.run, args=(stop,))
runner.start()

reader = ledger.connect(settings)

def wait_rows(n, within):
    deadline = time.monotonic() + within
    while (rows := reader.query("SELECT count() FROM priced_events").result_rows[0][0]) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return rows

records, _ = priced_events(300, seed=21)
produce(settings, "priced", records[:100])
assert wait_rows(100, 60) == 100
armed.set()
produce(settings, "priced", records[100:200])   # their insert is held: the sink pauses and polls
assert blocking.wait(60)
produce(settings, "priced", records[200:250])
time.sleep(1.5)                                   # the next flush waits for the held one, partitions paused
other = Consumer(settings.kafka_config(**{"group.id": group, "auto.offset.reset": "latest"}))
other.subscribe(list(sink.tables))               # a second member joins: the sink's partitions are revoked
deadline = time.monotonic() + 60
while not other.assignment() and time.monotonic() < deadline:
    other.poll(0.2)
other.close()                                     # ... and leaves: every partition goes back to the sink
produce(settings, "priced", records[250:])
print("rows", wait_rows(300, 90), "revoked", revoked.is_set())
stop.set()
runner.join()
"""


def test_a_rebalance_during_an_insert_in_flight_leaves_no_partition_paused(settings, tmp_path):
    """The sink froze after a broker outage (issue 10): while an insert was in flight it paused its partitions
    and polled; a rebalance then revoked and re-assigned them, and librdkafka keeps a partition's pause
    across assignments, so they stayed paused for good, with the sink alive and its lag growing."""
    (tmp_path / "tests_produce.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom test_sql_sink import produce\n")
    env = {**_env(settings), "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", REBALANCE_SCRIPT, group(settings)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "revoked True" in done.stdout, done.stdout            # the rebalance did hit the held insert
    assert done.stdout.split("rows")[-1].split()[0] == "300", done.stdout + done.stderr[-2000:]
    got = ledger_sql(settings, "SELECT count() AS n, uniqExact(event_id) AS ids FROM priced_events")[0]
    assert got["n"] == got["ids"] == 300


def _produce_at(settings: Settings, topic: str, placed: list[tuple[int, bytes]]) -> None:
    """Each record on the partition given, in this order."""
    producer = Producer(settings.kafka_config(**{"enable.idempotence": True}))
    for partition, value in placed:
        producer.produce(settings.topic(topic), value, partition=partition)
        producer.flush(30)  # one at a time: the order of the list is the order they are acknowledged


def test_first_write_wins_and_a_conflicting_copy_is_dead_lettered_never_stored(settings):
    """Issue 10: two copies of an event_id in one batch, the forged one (another tenant, $0) on a lower
    partition, used to be stored instead of the genuine copy acknowledged first. Now the first write is the
    charge, in a batch and across batches; a same-body copy is a duplicate; a different body is a
    conflicting_duplicate dead letter naming both copies, and an anomaly (critical for another tenant)."""
    records, truth = priced_events(20, seed=31)
    genuine = json.loads(records[0])
    later = (datetime.fromisoformat(genuine["priced_at"]) + timedelta(seconds=1)).isoformat()
    forged = {**genuine, "tenant_id": "attacker", "cost_usd": "0", "priced_at": later}
    repriced = {**genuine, "priced_at": later}  # the same event priced again after a crash: not a conflict
    _produce_at(settings, "priced", [(7, records[0]), (2, json.dumps(forged).encode()), (7, json.dumps(repriced).encode()),
                                     *[(i % 12, r) for i, r in enumerate(records[1:])]])
    sink_until_idle(settings)
    stored = ledger_sql(settings, f"SELECT tenant_id, toString(cost_usd) AS usd FROM priced_events WHERE event_id = '{genuine['event_id']}'")
    assert [(r["tenant_id"], Decimal(r["usd"])) for r in stored] == [(genuine["tenant_id"], Decimal(genuine["cost_usd"]))]
    got = ledger_sql(settings, "SELECT count() AS n, toString(sum(cost_usd)) AS usd FROM priced_events")[0]
    assert got["n"] == 20 and Decimal(got["usd"]) == _usd(sum(truth.by_tenant.values()))

    # across batches: a copy for the same tenant with another cost, after the original is stored
    _produce_at(settings, "priced", [(5, json.dumps({**genuine, "cost_usd": "99"}).encode())])
    sink_until_idle(settings)
    assert ledger_sql(settings, "SELECT count() AS n FROM priced_events")[0]["n"] == 20
    letters = ledger_sql(settings, "SELECT reason FROM dead_letters WHERE error_type = 'conflicting_duplicate' ORDER BY reason")
    assert len(letters) == 2
    in_batch = next(r["reason"] for r in letters if "'attacker'" in r["reason"])
    assert f"tenant {genuine['tenant_id']!r}" in in_batch and "priced.v1[7]@0" in in_batch and "priced.v1[2]@0" in in_batch
    assert "differs in tenant_id, cost_usd" in in_batch
    across = next(r["reason"] for r in letters if "'attacker'" not in r["reason"])
    assert "first stored" in across and "priced.v1[7]@0" in across and "priced.v1[5]@" in across and "differs in cost_usd" in across
    alerts = ledger_sql(settings, "SELECT severity, tenant_id, evidence['copy_tenant'] AS copy FROM anomalies "
                                  "WHERE kind = 'conflicting_duplicate' ORDER BY severity")
    assert alerts == [{"severity": "critical", "tenant_id": genuine["tenant_id"], "copy": "attacker"},
                      {"severity": "warning", "tenant_id": genuine["tenant_id"], "copy": genuine["tenant_id"]}]


def _fuzzed_priced(records: list[bytes]):
    """Priced events with arbitrary values in random fields, or arbitrary bytes (hypothesis draws the batch)."""
    from hypothesis import strategies as st
    from test_sql_checks import MISSING, POOL

    field = st.sampled_from(sorted(json.loads(records[0])))
    value = st.one_of(st.sampled_from([v for v in POOL if v is not MISSING]), st.none(), st.booleans(), st.integers(),
                      st.floats(), st.text(max_size=40), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    mutation = st.one_of(st.dictionaries(field, value, min_size=1, max_size=3), st.binary(max_size=200), st.just({}))
    return st.lists(mutation, min_size=len(records), max_size=len(records))


def test_fuzz_every_record_is_stored_once_or_dead_lettered_and_the_sink_never_stops(kafka_bootstrap, tmp_path_factory):
    """Hypothesis draws batches of priced events with arbitrary JSON values in any field (or arbitrary bytes),
    through the real sink and chDB. Oracle: the pydantic contract. Valid -> stored once; invalid -> a dead letter
    naming its offset; never a LedgerCheck (the SQL and the contract disagreeing); the sink exits cleanly."""
    from hypothesis import HealthCheck, given, settings as hsettings

    records, _ = priced_events(120, seed=41)

    @hsettings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_fuzzed_priced(records))
    def run(mutations):
        batch = []
        for raw, mutation in zip(records, mutations):
            if isinstance(mutation, bytes):
                batch.append(mutation)
            else:
                record = {**json.loads(raw), "event_id": new_id(), **mutation}
                batch.append(json.dumps(record, default=str).encode())
        check_intake(kafka_bootstrap, tmp_path_factory, "fz", batch, lambda raw: decode(PricedEvent, raw))

    run()


def test_gpu_assign_reaches_the_ledger_and_a_bad_range_is_refused(settings):
    """`meterline gpu assign` -> the compacted gpu-allocations topic -> the sink -> gpu_allocations."""
    create_topics(settings)
    assign = [*METERLINE, "gpu", "assign", "--node", "n1", "--gpu", "GPU-1", "--tenant", "acme", "--team", "ops"]
    done = subprocess.run([*assign, "--since", "2026-01-01T00:00:00"], env=_env(settings), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([*assign, "--since", "2026-02-01", "--until", "2026-01-01"], env=_env(settings),
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "valid_until must be after valid_from" in bad.stderr and "Traceback" not in bad.stderr
    sink_until_idle(settings)
    rows = ledger_sql(settings, "SELECT node, gpu_uuid, mig_uuid, tenant_id, team, toString(valid_from) AS since, "
                                "valid_until FROM gpu_allocations")
    assert rows == [{"node": "n1", "gpu_uuid": "GPU-1", "mig_uuid": "", "tenant_id": "acme", "team": "ops",
                     "since": "2026-01-01 00:00:00.000", "valid_until": None}]


def test_published_scale_recommendations_reach_the_ledger_latest_per_endpoint(settings):
    """`plan endpoints --publish` -> the compacted scale topic -> the sink -> scale_recommendations, read by /metrics."""
    now = utcnow().replace(microsecond=0)
    events = [PricedEvent(event_id=new_id(), ts=now - timedelta(seconds=30) + timedelta(milliseconds=50 * i), tenant_id="acme",
                          kind="llm_call", provider="selfhosted", model="llama", latency_ms=500, cost_usd=Decimal(0),
                          list_cost_usd=Decimal(0), cost_source="catalog", catalog_version="v", priced_at=now)
              for i in range(300)]  # 10/s over the last 30 s (+ the command's own clock)
    produce(settings, "priced", [e.to_json() for e in events])
    sink_until_idle(settings)
    window = ["--since", (now - timedelta(seconds=30)).isoformat(), "--until", now.isoformat()]
    for slo in ("10000", "800"):  # 7 replicas, then 8 (tests/test_allocator_endpoints.py)
        done = subprocess.run([*METERLINE, "plan", "endpoints", *window, "--target-util", "0.8", "--slo-ms", slo, "--publish"],
                              env=_env(settings), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "published 1" in done.stdout
    sink_until_idle(settings)
    rows = ledger_sql(settings, "SELECT endpoint, recommended_replicas AS r FROM scale_recommendations ORDER BY ts")
    assert [(r["endpoint"], int(r["r"])) for r in rows] == [("selfhosted/llama", 7), ("selfhosted/llama", 8)]
    query = (Path(__file__).parents[1] / "sql/queries/scale_latest.sql").read_text()
    latest = ledger_sql(settings, query.split("\n", 1)[1])  # without its comment line (not a CLI option)
    assert [(r["model"], int(r["replicas"])) for r in latest] == [("llama", 8)]
