"""Sizing: per-core figures measured here, and what 10k, 100k and 1M events/s take (BENCHMARKS.md, Sizing).

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.sizing [--events 300000] [--json]

1. The whole pipeline at once (bench/pipeline.py's --end-to-end: a warmed local broker, one stream worker,
   one sink, chDB), CPU per usage event of each process from /proc: events/s per stream-worker core,
   ledger rows/s per sink core, broker CPU per event (its JIT compiler threads reported apart).
2. chDB alone: `INSERT INTO priced_events FORMAT JSONEachRow` of sink-sized batches (rows per CPU second of
   this process, and inserts/s of small batches), the store's own cost per shard.
3. The projection: for each target rate, processes = ceil(rate x CPU per event / (1 core x HEADROOM)), Kafka
   partitions to give every consumer one and room to double, brokers by CPU (x replication) with a floor
   of 3, ClickHouse shards by rows/s per shard (the smaller of chDB's measured and a server's published
   figure), and the sink batch that keeps inserts per shard near ClickHouse's advice (~1 insert/s per table).

Prints markdown (or --json) and appends the markdown to bench/results/sizing.md.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

TARGETS = (10_000, 100_000, 1_000_000)
HEADROOM = 0.6            # plan each core at 60 %: room for bursts, rebalances and catch-up after an outage
REPLICATION = 3           # production topics: replication factor 3 (each record written to 3 brokers)
BROKER_CORES = 8          # a broker machine's cores assumed for the broker count
PARTITION_STEPS = (12, 24, 48, 96, 192, 384)
# Published, not measured here (issue 17 / shared ANCHORS.md's systems): one ClickHouse Kafka-engine consumer
# ~165k rows/s, clickhouse_sinker ~265k rows/s per instance; ClickHouse's docs: batches of 10k-100k rows and
# about one INSERT per second per table (more parts than merges can keep up with otherwise).
SERVER_ROWS_PER_S_PUBLISHED = 165_000
INSERTS_PER_S_PER_TABLE_ADVISED = 1.0
MAX_BATCH_ROWS = 200_000


def measure_pipeline(events: int, sessions: int, broker_warmup_s: float) -> dict:
    from bench.pipeline import make_events, run_end_to_end

    r = run_end_to_end(make_events(events, sessions), workers=1, broker_warmup_s=broker_warmup_s)
    cpu = r["cpu µs/event"]
    return {"events": events, "rate_e2e": r["rate"], "rows": r["rows"], "worker_us": cpu["stream worker 0"],
            "sink_us": cpu["sink"], "broker_us": cpu["broker"], "broker_jit_us": cpu["of it broker JIT"],
            "broker_marginal_us": r["broker µs/event less its idle cost"], "broker_idle_cpu_per_s": r["broker idle CPU s/s"],
            "broker_polling_cpu_per_s": r["broker polling CPU s/s"],
            "broker_warmup": r["broker warm-up"]}


def assumed(worker_us: float, sink_us: float, broker_us: float) -> dict:
    """Per-event CPU given on the command line (e.g. a quiet machine's figures) instead of measured now."""
    return {"events": 0, "rate_e2e": 0.0, "rows": 0, "worker_us": worker_us, "sink_us": sink_us, "broker_us": broker_us,
            "broker_jit_us": 0.0, "broker_marginal_us": broker_us, "broker_idle_cpu_per_s": 0.0, "broker_polling_cpu_per_s": 0.0,
            "broker_warmup": None,
            "assumed": True}


def measure_chdb(rows: int = 200_000, batch: int = 50_000, small: int = 1_000, small_inserts: int = 50) -> dict:
    """chDB's own cost: sink-sized JSONEachRow inserts into priced_events (rows per CPU second of this process,
    chDB's threads included), and how many small inserts per second one table takes."""
    from meterline.settings import Settings
    from meterline.sql import ledger
    from meterline.sql.synth import priced_events

    tmp = Path(tempfile.mkdtemp(prefix="sizing-ch-"))
    try:
        client = ledger.connect(Settings(data_dir=tmp / "data", clickhouse_dsn=f"chdb://{tmp / 'ch'}"))
        ledger.migrate(client)
        records, _ = priced_events(rows + small * small_inserts, seed=31)
        lines = [r[:-1] + b',"_topic":"sizing","_partition":%d,"_offset":%d,"_batch_start":0}' % (i % 12, i)
                 for i, r in enumerate(records)]
        cpu0, t0 = _cpu(), time.perf_counter()
        for lo in range(0, rows, batch):
            client.raw_insert("priced_events", None, b"\n".join(lines[lo:lo + batch]), fmt="JSONEachRow")
        cpu_s, wall_s = _cpu() - cpu0, time.perf_counter() - t0
        t1 = time.perf_counter()
        for k in range(small_inserts):
            lo = rows + k * small
            client.raw_insert("priced_events", None, b"\n".join(lines[lo:lo + small]), fmt="JSONEachRow")
        small_s = time.perf_counter() - t1
        stored = client.query("SELECT count() FROM priced_events").result_rows[0][0]
        client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stored != rows + small * small_inserts:
        raise SystemExit(f"chDB stored {stored:,} rows of {rows + small * small_inserts:,}")
    return {"rows_per_cpu_s": rows / cpu_s, "rows_per_s": rows / wall_s, "batch": batch,
            "small_batch": small, "small_inserts_per_s": small_inserts / small_s}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_core(m: dict, ch: dict) -> dict:
    """What one core does, from CPU per event (robust on a shared machine, unlike a wall-clock rate)."""
    return {"worker_events_per_core": 1e6 / m["worker_us"], "sink_rows_per_core": 1e6 / m["sink_us"],
            # less its JIT; its per-second costs stay in (subtracting the idle rates over-subtracts: a busy consumer's
            # fetches replace its idle ones), so this is an upper bound that falls as the rate rises
            "broker_us_per_event": m["broker_us"] - m["broker_jit_us"],
            "shard_rows_per_s": SERVER_ROWS_PER_S_PUBLISHED}


def plan(rate: int, core: dict) -> dict:
    workers = math.ceil(rate / (core["worker_events_per_core"] * HEADROOM))
    sinks = math.ceil(rate / (core["sink_rows_per_core"] * HEADROOM))
    partitions = next((p for p in PARTITION_STEPS if p >= 2 * max(workers, sinks)), PARTITION_STEPS[-1])
    broker_cores = rate * core["broker_us_per_event"] * 1e-6 * REPLICATION / HEADROOM
    brokers = max(3, math.ceil(broker_cores / BROKER_CORES))
    shards = math.ceil(rate / (core["shard_rows_per_s"] * HEADROOM))
    # Every sink's insert reaches every shard (Distributed, sharded by tenant): sinks / batch_seconds inserts per
    # shard per table each second. A longer batch keeps that near the advice; bounded at 10 s of ledger delay.
    # Bounded by 10 s of ledger delay and by MAX_BATCH_ROWS of sink memory (~1.3 KB a buffered row).
    per_sink = rate / sinks
    batch_seconds = round(min(10.0, MAX_BATCH_ROWS / 1.5 / per_sink, max(1.0, sinks / (INSERTS_PER_S_PER_TABLE_ADVISED * 2))), 1)
    batch_rows = min(MAX_BATCH_ROWS, max(50_000, math.ceil(per_sink * batch_seconds * 1.5 / 10_000) * 10_000))
    return {"rate": rate, "stream_workers": workers, "sinks": sinks, "partitions": partitions, "brokers": brokers,
            "broker_cores": broker_cores, "shards": shards, "batch_seconds": batch_seconds, "batch_rows": batch_rows,
            "inserts_per_shard_per_table": sinks / batch_seconds, "rows_per_shard_insert": per_sink * batch_seconds / shards}


def settings_line(p: dict) -> str:
    if p["sinks"] == 1 and p["stream_workers"] <= (os.cpu_count() or 2):
        return (f"one machine: `meterline up --stream-workers {p['stream_workers']}` (chDB, or a server by "
                "`METERLINE_CLICKHOUSE_DSN=http://...`)")
    cluster = " `METERLINE_CLICKHOUSE_CLUSTER=meterline`, `meterline migrate --cluster meterline`," if p["shards"] > 1 else ""
    return (f"`METERLINE_KAFKA_BOOTSTRAP=<{p['brokers']} brokers>`, `METERLINE_CLICKHOUSE_DSN=http://...`,{cluster} "
            f"usage/gpu/compute/priced at {p['partitions']} partitions; {p['stream_workers']} x `meterline streams "
            f"--instance-id w<i>` (or `meterline up --stream-workers N --sinks M` per machine); {p['sinks']} x "
            f"`meterline sink --instance-id s<i> --batch-seconds {p['batch_seconds']:g} --batch-rows {p['batch_rows']}`")


def markdown(m: dict, ch: dict, core: dict, plans: list[dict], command: str) -> str:
    from bench.common import machine, utc_stamp

    w = m["broker_warmup"] or {}
    if m.get("assumed"):
        return _assumed_markdown(m, core, plans, command)
    lines = [
        f"## Sizing (`bench/sizing.py`), {utc_stamp()}", "",
        f"{machine(' shared with other jobs')} Command: `{command}`. Per-core figures are "
        "1 / CPU per event of each process (from /proc), so a busy machine slows the run more than it moves them.", "",
        "| measured here, per core | value |", "|---|---|",
        f"| stream worker (validate, dedupe, price, spend, detectors, produce, commit) | {core['worker_events_per_core']:,.0f} "
        f"events/s ({m['worker_us']:.1f} µs/event) |",
        f"| ledger sink (stage, check, first write, insert, commit; chDB) | {core['sink_rows_per_core']:,.0f} "
        f"usage events/s ({m['sink_us']:.1f} µs/event) |",
        f"| broker CPU per usage event, whole pipeline, replication 1, less its JIT (per-second costs in: an upper bound) | "
        f"{core['broker_us_per_event']:.1f} µs (all of it {m['broker_us']:.1f}: JIT {m['broker_jit_us']:.1f}; per second "
        f"anyway: pipeline idle {m['broker_idle_cpu_per_s'] * 1000:.0f} ms, bench polling {m['broker_polling_cpu_per_s'] * 1000:.0f} ms "
        f"CPU; warm-up {w.get('rounds', 0)} rounds, "
        f"{w.get('jit_s', 0):.1f} s compiling) |",
        f"| chDB insert, {ch['batch']:,}-row JSONEachRow batches into priced_events | {ch['rows_per_cpu_s']:,.0f} rows per "
        f"CPU second ({ch['rows_per_s']:,.0f} rows/s wall) |",
        f"| chDB, {ch['small_batch']:,}-row inserts, one table | {ch['small_inserts_per_s']:,.0f} inserts/s |",
        f"| end-to-end rate of this run, everything on {os.cpu_count()} shared cores | {m['rate_e2e']:,.0f} events/s "
        f"({m['rows']:,} rows) |",
        f"| *published, not measured here*: one ClickHouse server shard | ~{SERVER_ROWS_PER_S_PUBLISHED:,} rows/s (Kafka "
        "engine; clickhouse_sinker ~265k); ClickHouse docs: 10k-100k rows per insert, ~1 insert/s per table |", "",
        f"Projection (each core planned at {HEADROOM:.0%}; replication {REPLICATION}; {BROKER_CORES}-core brokers; "
        "ClickHouse shards by the published per-server figure):", "", *_plan_table(plans)]
    return "\n".join(lines) + "\n"


def _assumed_markdown(m: dict, core: dict, plans: list[dict], command: str) -> str:
    lines = [f"### Projection from given CPU per event (`{command}`)", "",
             f"Stream worker {m['worker_us']:g} µs, sink {m['sink_us']:g} µs, broker {m['broker_us']:g} µs per usage "
             f"event; each core planned at {HEADROOM:.0%}; replication {REPLICATION}; {BROKER_CORES}-core brokers; "
             f"ClickHouse shards by the published ~{SERVER_ROWS_PER_S_PUBLISHED:,} rows/s per server.", "", *_plan_table(plans)]
    return "\n".join(lines) + "\n"


def _plan_table(plans: list[dict]) -> list[str]:
    lines = [
        "| events/s | stream-worker processes | sinks | partitions (usage, gpu, compute, priced) | brokers | "
        "ClickHouse shards | sink batch | inserts/s per shard per table (rows each) | settings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        lines.append(f"| {p['rate']:,} | {p['stream_workers']} | {p['sinks']} | {p['partitions']} | {p['brokers']} "
                     f"({p['broker_cores']:.1f} cores) | {p['shards']} | {p['batch_seconds']:g} s / ≤{p['batch_rows']:,} rows | "
                     f"{p['inserts_per_shard_per_table']:.1f} ({p['rows_per_shard_insert']:,.0f}) | {settings_line(p)} |")
    return lines


def main() -> None:
    from bench.common import append_result, command as command_line, parser as make_parser, require_local_broker

    parser = make_parser(__doc__)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--broker-warmup-s", type=float, default=120.0, help="warm a local broker's JIT first (0: do not)")
    parser.add_argument("--json", action="store_true", help="print the figures and the plans as JSON")
    parser.add_argument("--assume", nargs=3, type=float, metavar=("WORKER_US", "SINK_US", "BROKER_US"),
                        help="measure nothing: project from these CPU µs per usage event (e.g. a quiet machine's)")
    args = parser.parse_args()
    command = command_line("sizing", f"--events {args.events}", f"--sessions {args.sessions}")
    if args.assume:
        command = f"python -m bench.sizing --assume {' '.join(f'{v:g}' for v in args.assume)}"
        measured, chdb = assumed(*args.assume), {"rows_per_cpu_s": 0.0}
    else:
        require_local_broker("give the figures with --assume")  # its CPU per event would read 0: no broker cores
        measured = measure_pipeline(args.events, args.sessions, args.broker_warmup_s)
        chdb = measure_chdb()
    core = per_core(measured, chdb)
    plans = [plan(rate, core) for rate in TARGETS]
    text = markdown(measured, chdb, core, plans, command)
    append_result("sizing", text, "Sizing benchmark (`bench/sizing.py`)")
    if args.json:
        print(json.dumps({"measured": measured, "chdb": chdb, "per_core": core, "plans": plans, "command": command}, indent=2))
    else:
        print(text)


if __name__ == "__main__":
    main()
