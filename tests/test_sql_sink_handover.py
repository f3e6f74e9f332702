"""Two sinks, one consumer group, one ledger: every priced record stored exactly once (issue 17 item 4).

chDB allows one process per data directory, so on chDB the handover is tested in turn: sink A (a
LedgerSink in a subprocess) takes its share of `priced` and stops, cleanly or SIGKILLed right after
an insert and before its offsets are committed; sink B (`meterline sink`, another instance id, the
same group and data directory) resumes from the ledger's offsets. The concurrent case, two sinks each
holding part of the partitions at once, runs as two sinks in one process (threads) on the test's store:
chDB by default, a ClickHouse server container with `pytest --containers` (not run here: no Docker).

Ground truth is read from the produced bytes (count per partition, sum of `cost_usd` as Decimal), not
from the sink or from sql/synth.py's own totals.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import Counter
from decimal import Decimal

import pytest

from meterline.settings import Settings
from meterline.sql.synth import priced_events
from meterline.topics import catalog_by_name
from test_sql_sink import METERLINE, _env, committed_total, group, ledger_sql, produce

N = 24_000  # two or three of sink A's batches at most: A never reaches the end by itself

# Sink A: a LedgerSink whose client runs `action` right after its k-th insert into priced_events returns
# (stop: set the stop event, so run() flushes what it holds, commits and leaves the group; kill: SIGKILL
# itself before the consuming thread commits that insert's offsets).
SINK_A = """
import os, signal, sys, threading
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.sink import LedgerSink

group, action, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings, stop, inserts = Settings(), threading.Event(), [0]

def into_priced(name, args, kwargs):
    first = str(args[0]) if args else str(kwargs.get("table", kwargs.get("cmd", "")))
    return first.startswith("INSERT INTO priced_events") if name == "command" else first == "priced_events"

class Hooked:
    def __init__(self, client):
        self.client = client
    def __getattr__(self, name):
        method = getattr(self.client, name)
        if name not in ("command", "insert", "raw_insert", "insert_arrow", "insert_df"):
            return method
        def call(*args, **kwargs):
            result = method(*args, **kwargs)
            if into_priced(name, args, kwargs):
                inserts[0] += 1
                if inserts[0] == after:
                    print("hook fired", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL) if action == "kill" else stop.set()
            return result
        return call

real = ledger.connect(settings)
ledger.migrate(real)
sink = LedgerSink(settings, client=Hooked(real), group=group, batch_rows=5000,
                  consumer_overrides={"session.timeout.ms": 6000})  # a killed A is out of the group in 6 s
sink.run(stop)
print("stopped", inserts[0], flush=True)
"""


def truth(records: list[bytes]) -> tuple[Counter, Decimal]:
    """Records per partition (produce() places record i on partition i % partitions) and the total cost."""
    partitions = catalog_by_name()["priced"].partitions
    per_partition = Counter(i % partitions for i in range(len(records)))
    return per_partition, sum((Decimal(json.loads(r)["cost_usd"]) for r in records), Decimal(0))


def stored(settings: Settings) -> tuple[Counter, Decimal, dict]:
    rows = ledger_sql(settings, "SELECT _partition AS p, count() AS n FROM priced_events GROUP BY p")
    total = ledger_sql(settings, "SELECT toString(sum(cost_usd)) AS usd, count() AS n, uniqExact(event_id) AS ids, "
                                 "uniqExact(_topic, _partition, _offset) AS coords FROM priced_events")[0]
    return Counter({r["p"]: r["n"] for r in rows}), Decimal(total.pop("usd")), total


def run_sink_a(settings: Settings, action: str, after: int) -> str:
    done = subprocess.run([sys.executable, "-c", SINK_A, group(settings), action, str(after)], env=_env(settings),
                          capture_output=True, text=True, timeout=300)
    assert "hook fired" in done.stdout, done.stdout + done.stderr[-3000:]  # the insert path still passes the hook
    return done.stdout


def sink_b(settings: Settings) -> dict:
    """`meterline sink` as sink B until idle; its counters from its last log line."""
    done = subprocess.run([*METERLINE, "sink", "--group", group(settings), "--instance-id", "sink-b", "--until-idle", "3"],
                          env=_env(settings), capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "sink stopped: " in log, log[-3000:]
    return ast.literal_eval(log.rsplit("sink stopped: ", 1)[1].splitlines()[0])


def watcher_committed(settings: Settings) -> int:
    from confluent_kafka import Consumer

    watcher = Consumer(settings.kafka_config(**{"group.id": group(settings)}))
    try:
        return committed_total(watcher, settings, "priced")
    finally:
        watcher.close()


@pytest.mark.parametrize("action", ["stop", "kill"])
def test_a_second_sink_resumes_from_the_ledger_where_the_first_left_off(settings, action):
    records, _ = priced_events(N, seed=17)
    per_partition, cost = truth(records)
    produce(settings, "priced", records)

    out = run_sink_a(settings, action, after=1)
    held, _, _ = stored(settings)
    committed = watcher_committed(settings)
    assert 0 < sum(held.values()) < N, out                       # A stored part of the stream, not all of it
    if action == "kill":
        assert "stopped" not in out
        assert committed < sum(held.values())                    # stored, not committed: only the ledger knows
    else:
        assert "stopped" in out and committed == sum(held.values())  # a clean stop commits what it stored

    b = sink_b(settings)
    # B started after the ledger's last offset: it read no stored record again (none had to be dropped as a duplicate)
    assert (b["rows"], b["duplicates"]) == (N - sum(held.values()), 0), b
    got, got_cost, counts = stored(settings)
    assert got == per_partition                                  # every partition complete, none doubled
    assert counts == {"n": N, "ids": N, "coords": N}
    assert got_cost == cost


# Two LedgerSinks in one group, each on its own thread and client, at once; each reports its last share of priced.
TWO_SINKS = """
import sys, threading, time
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.sink import LedgerSink

settings, group, expected = Settings(), sys.argv[1], int(sys.argv[2])
client = ledger.connect(settings)
ledger.migrate(client, cluster=settings.clickhouse_cluster)
stop = threading.Event()
sinks = [LedgerSink(settings, group=group, batch_rows=2000, consumer_overrides={"group.instance.id": f"pair-{i}"})
         for i in range(2)]
held = [set() for _ in sinks]
for sink, mine in zip(sinks, held):
    on_assign = sink._on_assign
    def record(consumer, partitions, on_assign=on_assign, mine=mine):
        mine.clear()  # eager rebalancing: each assignment is the member's whole share
        mine.update(tp.partition for tp in partitions if tp.topic.endswith(".priced.v1"))
        on_assign(consumer, partitions)
    sink._on_assign = record
threads = [threading.Thread(target=s.run, args=(stop,)) for s in sinks]
for t in threads:
    t.start()
deadline = time.monotonic() + 240  # a bound on a stuck run, not a speed limit
while client.query("SELECT count() FROM priced_events").result_rows[0][0] < expected and time.monotonic() < deadline:
    time.sleep(0.2)
stop.set()
for t in threads:
    t.join()
print("held", [sorted(h) for h in held], "rows", [s.stats["rows"] for s in sinks], flush=True)
"""


def test_two_sinks_in_one_group_split_the_partitions_and_write_one_ledger_once(settings):
    """Both sinks join before anything is produced, so each holds part of `priced` and writes its share."""
    records, _ = priced_events(N, seed=23)
    per_partition, cost = truth(records)
    proc = subprocess.Popen([sys.executable, "-c", TWO_SINKS, group(settings), str(N)], env=_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_two_members(settings)
    produce(settings, "priced", records)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    held = json.loads(out.split("held")[1].split("rows")[0].strip())
    rows = json.loads(out.split("rows")[1].strip())
    assert all(held) and not set(held[0]) & set(held[1]), out    # a split, no partition held twice
    assert sorted(held[0] + held[1]) == list(range(catalog_by_name()["priced"].partitions))
    assert all(n > 0 for n in rows), out                         # both wrote rows
    got, got_cost, counts = stored(settings)
    assert got == per_partition and counts == {"n": N, "ids": N, "coords": N} and got_cost == cost


def _wait_for_two_members(settings: Settings) -> None:
    """Until the group is stable with two members (bounded: a group that never forms fails the test)."""
    import time

    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin, deadline = AdminClient(settings.kafka_config()), time.monotonic() + 120
    while time.monotonic() < deadline:
        described = admin.describe_consumer_groups([group(settings)])[group(settings)].result(timeout=30)
        if described.state == ConsumerGroupState.STABLE and len(described.members) == 2 and \
                all(m.assignment.topic_partitions for m in described.members):
            return
        time.sleep(0.2)
    pytest.fail("the two sinks never formed a stable group of two")


def test_up_sinks_runs_the_extra_sinks_as_processes_in_the_one_sink_group(settings):
    from meterline.app.up import ProcessComponent, Up

    extra = [c for c in Up(settings, streams=0, allocator=False, sinks=3).supervisor.components
             if isinstance(c, ProcessComponent)]
    assert [c.name for c in extra] == ["sink-2", "sink-3"]
    for c in extra:
        args = c.argv[c.argv.index("sink"):]
        assert args[args.index("--group") + 1] == settings.group("sink")       # the in-process sink's group
    ids = [c.argv[c.argv.index("--instance-id") + 1] for c in extra]
    assert len(set(ids)) == 2                                                  # static members, one id each
    assert not [c for c in Up(settings, streams=0, allocator=False).supervisor.components if isinstance(c, ProcessComponent)]


def test_up_refuses_several_sinks_on_chdb_in_one_line(settings):
    done = subprocess.run([*METERLINE, "up", "--sinks", "2"], env=_env(settings), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --sinks 2 needs a ClickHouse server: embedded chDB allows one process per data directory; "
        "set METERLINE_CLICKHOUSE_DSN=http://... or run one sink"]
