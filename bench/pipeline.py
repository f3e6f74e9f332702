"""Stream worker throughput vs a bare confluent-kafka consume of the same messages, same run.

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.pipeline [--events 300000] [--sessions 100000]

1. Pipeline: `--workers` x `meterline streams` processes (validate, dedupe, price, spend,
   anomalies, produce priced + spend + changelog, commit) in one group on a fresh topic prefix,
   warmed by 5,000 events until each holds partitions, then paused while N usage events
   (msgspec-encoded, keyed by tenant, `--sessions` distinct sessions, 5 models incl. cache tokens
   and 2% tool calls) are produced; the rate is N over the time from resuming them until priced
   holds every result.
2. Baseline: the same N alone in a fresh topic, read by a bare confluent-kafka consumer, the median of 3 reads
   (bench/common.py's BARE_CONSUMER: until 2026-12-04 its fetches paused for 1 s once its queue was full, and
   every ratio this bench printed before then is against those paused reads, ~250k/s instead of ~1.2M/s).
3. CPU per event of each worker and of the local broker while the clock ran (/proc).
4. Ledger (optional, --ledger): `meterline sink` drains the priced topic into embedded
   ClickHouse (chDB) in a subprocess; rows counted afterwards.
5. Memory: RSS of the worker process after the run, and tracemalloc of the worker's state
   (spend, detectors, dedupe) holding `--sessions` active sessions.
6. Per-stage cost per event (one core, no I/O) to show where the time goes.

Writes a section to bench/results/pipeline.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from meterline.schemas.events import new_id
from meterline.settings import Settings
from meterline.topics import COORDINATOR_MOVING, committed_offsets, create_topics

from .common import BARE_CONSUMER, append_result, broker_pid, command, machine, parser as make_parser, require_local_broker, utc_stamp

TITLE = "Stream pipeline benchmark"
SHARED = " (shared with the broker and other engineers' jobs)"
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4-5"),
          ("anthropic", "claude-haiku-4-5"), ("self-hosted", "llama-3.1-70b-instruct")]


def make_events(n: int, sessions: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """n usage events over the last 10 minutes (1 ms apart, or closer for large n: never in the future)."""
    rng, now = random.Random(seed), datetime.now(timezone.utc) - timedelta(minutes=10)
    step = timedelta(microseconds=min(1000, 500_000_000 // max(n, 1)))  # the newest one ~2 minutes ago at most
    out = []
    for i in range(n):
        s = i % sessions
        tenant = f"tenant{s % 50}"
        provider, model = MODELS[i % len(MODELS)]
        inp = rng.randint(200, 20_000)
        read = rng.randint(0, inp // 2)
        record = {"event_id": new_id(), "ts": now + i * step, "tenant_id": tenant, "team": f"team{s % 200}",
                  "project": f"proj{s % 500}", "agent_id": f"agent{s % 2000}", "session_id": f"sess{s}", "kind": "llm_call",
                  "provider": provider, "model": model, "input_tokens": inp, "output_tokens": rng.randint(10, 2000),
                  "cache_read_tokens": read, "latency_ms": rng.randint(100, 9000)}
        if i % 50 == 0:
            record.update(kind="tool_call", tool="web_search", model="", provider="")
        out.append((tenant.encode(), msgspec.json.encode(record)))
    return out


def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    producer = Producer(settings.kafka_config(**{"linger.ms": 20, "compression.type": "lz4", "enable.idempotence": True,
                                                 "queue.buffering.max.messages": 2_000_000, "batch.num.messages": 10_000}))
    t0 = time.perf_counter()
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    return time.perf_counter() - t0


def bare_consume(settings: Settings, topic: str, n: int) -> float:
    """Seconds for a plain batch consumer to read n messages, from assign() (librdkafka prefetches from
    there on: a clock started at the first message would miss what was fetched before it)."""
    consumer = Consumer(settings.kafka_config(**{"group.id": f"bare-{uuid.uuid4().hex}", "enable.auto.commit": False,
                                                 "auto.offset.reset": "earliest", "fetch.min.bytes": 65536, "fetch.wait.max.ms": 50, **BARE_CONSUMER}))
    parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    t0 = time.perf_counter()
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    seen, size = 0, 0
    while seen < n:  # never more than are left: consume() waits its whole timeout for a batch it cannot fill
        for msg in consumer.consume(min(5000, n - seen), timeout=1.0):
            if msg.error():
                continue
            size += len(msg.value())
            seen += 1
    elapsed = time.perf_counter() - t0
    consumer.close()
    return elapsed


def run_workers(settings: Settings, workers: int, data_dir: Path, records: list[tuple[bytes, bytes]],
                warmup: int = 5_000) -> tuple[float, float, list[dict], int, dict[str, float]]:
    """`workers` x `meterline streams` in one consumer group, warm and each holding its partitions before the clock.

    They carry `warmup` events first (imports, state restore and the group's join are behind them), are paused
    (SIGSTOP) while the N events are produced, and the clock runs from SIGCONT until priced holds every result
    (acknowledged by the broker). Started on a full topic instead, the worker that finished importing first took
    every partition until the rebalance: 2 workers measured 50k/s, below one worker's 60k (268k of 300k events
    in one of them). Returns (events/s, produce seconds, each worker's counters, max child RSS KiB, CPU µs per
    event of each worker and of the local broker while the clock ran)."""
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(data_dir)}
    cli = [sys.executable, "-c", "from meterline.cli import main; main()", "streams", "--json"]
    usage = settings.topic("usage")
    produce(settings, usage, make_events(warmup, 500, seed=2))
    procs = [subprocess.Popen([*cli, "--instance-id", f"bench-{i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(workers)]
    try:
        wait_for_members(settings, settings.group("streams"), workers, procs)
        wait_until_in_ledger(settings, None, warmup)
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        produce_s = produce(settings, usage, records)
        cpu0 = [cpu_seconds(p.pid) for p in procs] + [broker_cpu_seconds()]
        t0 = time.perf_counter()
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        wait_until_in_ledger(settings, None, warmup + len(records))
        elapsed = time.perf_counter() - t0
        cpu1 = [cpu_seconds(p.pid) for p in procs] + [broker_cpu_seconds()]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()  # SIGTERM: the worker checkpoints, then prints its counters (--json)
    outputs = [p.communicate(timeout=120) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed: " + " | ".join(err.decode()[-500:] for _, err in outputs))
    stats = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    names = [*(f"worker {i}" for i in range(workers)), "broker"]
    cpu = {name: (b - a) / len(records) * 1e6 for name, a, b in zip(names, cpu0, cpu1)}
    return len(records) / elapsed, produce_s, stats, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, cpu


def wait_for_members(settings: Settings, group: str, workers: int, procs: list, patience: float = 120) -> None:
    """Until the group is stable with `workers` members, each holding partitions of usage."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin, usage, deadline = AdminClient(settings.kafka_config()), settings.topic("usage"), time.monotonic() + patience
    while time.monotonic() < deadline:
        if (exited := next((proc for proc in procs if proc.poll() is not None), None)) is not None:
            raise SystemExit("a worker exited before it joined: " + exited.stderr.read().decode()[-500:])
        try:
            group_info = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
        except KafkaException as exc:  # a fresh broker's coordinator is still loading
            if exc.args[0].code() not in COORDINATOR_MOVING:
                raise
            time.sleep(0.2)
            continue
        holders = [m for m in group_info.members if any(tp.topic == usage for tp in m.assignment.topic_partitions)]
        if group_info.state == ConsumerGroupState.STABLE and len(holders) == workers:
            return
        time.sleep(0.1)
    raise SystemExit(f"the {workers} workers did not all hold partitions of {usage} within {patience:.0f} s")


def state_memory(sessions: int) -> tuple[int, int]:
    """tracemalloc bytes of the worker's state (spend + detectors + dedupe) with `sessions` active sessions."""
    from meterline.streams.anomalies import Detectors
    from meterline.streams.codec import decode_usage
    from meterline.streams.spend import SpendBook
    from meterline.streams.worker import DedupeWindow

    events = [decode_usage(raw) for _, raw in make_events(2 * sessions, sessions, seed=9)]
    tracemalloc.start()
    book, detectors, dedupe = SpendBook(), Detectors(), [DedupeWindow(100_000) for _ in range(12)]
    for i, e in enumerate(events):
        dedupe[i % 12].seen(e.event_id.int)
        book.add((e.tenant_id, e.team, e.project, e.agent_id, e.session_id), e.ts, 1000, e.input_tokens, e.output_tokens)
        detectors.usage(e, 1000, False)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return current, len(book.states)


def stage_costs(n: int = 30_000) -> dict[str, float]:
    """µs per event of each stage, one core, no Kafka."""
    from meterline.schemas.events import UsageEvent
    from meterline.streams.anomalies import Detectors
    from types import SimpleNamespace

    from meterline.streams.codec import decode_usage
    from meterline.streams.worker import StreamWorker
    from meterline.streams.pricing import load_catalog
    from meterline.streams.spend import SpendBook

    raws = [raw for _, raw in make_events(n, 10_000, seed=3)]
    catalog, book, detectors = load_catalog(), SpendBook(), Detectors()

    def timed(fn, items):
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        return (time.perf_counter() - t0) / len(items) * 1e6, out

    pydantic_us, _ = timed(UsageEvent.model_validate_json, raws)
    decode_us, events = timed(decode_usage, raws)
    price_us, prices = timed(catalog.price_pico, events)
    now = datetime.now(timezone.utc)

    shell = SimpleNamespace(catalog=catalog, _suffix_now=None, _suffix="")
    encode_us, _ = timed(lambda e: StreamWorker._priced_json(shell, e, 1000, (400, 500, 100, 0, 1000), "catalog", now), events)
    spend_us, _ = timed(lambda e: book.add((e.tenant_id, e.team, e.project, e.agent_id, e.session_id), e.ts, 1000,
                                           e.input_tokens, e.output_tokens), events)
    detect_us, _ = timed(lambda e: detectors.usage(e, 1000, False), events)
    return {"pydantic decode (reference)": pydantic_us, "decode + validate (msgspec fast path)": decode_us,
            "price (cached rates, integer pico-USD)": price_us, "build + encode PricedEvent": encode_us,
            "spend: 5 scopes": spend_us, "anomaly detectors": detect_us}


def faust_cost(n: int = 5000) -> float | None:
    """µs per event of a Faust agent updating one table through test_context (DESIGN.md's measurement)."""
    try:
        import asyncio

        import faust
    except ImportError:
        return None
    app = faust.App(f"bench-{uuid.uuid4().hex[:6]}", broker="kafka://127.0.0.1:9092", store="memory://")  # test_context never connects
    topic = app.topic("usage", value_type=bytes)
    table = app.Table("spend", default=int)

    @app.agent(topic)
    async def count(stream):
        async for value in stream:
            table[value[:8]] += 1

    async def drive() -> float:
        async with count.test_context() as agent:
            t0 = time.perf_counter()
            for i in range(n):
                await agent.put(b"tenant%02d" % (i % 50))
            return (time.perf_counter() - t0) / n * 1e6

    return asyncio.run(drive())


def run_ledger(settings: Settings, data_dir: Path, expected: int) -> tuple[float, int] | None:
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(data_dir), "METERLINE_CLICKHOUSE_DSN": f"chdb://{data_dir / 'ch'}"}
    cli = [sys.executable, "-c", "from meterline.cli import main; main()"]
    if subprocess.run([*cli, "migrate"], env=env, capture_output=True).returncode != 0:
        return None
    t0 = time.perf_counter()
    try:
        sink = subprocess.run([*cli, "sink", "--until-idle", "3", "--group", f"{settings.topic_prefix}.bench-sink"], env=env,
                              capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        print("the sink did not go idle within 300 s; ledger drain not measured")
        return None
    elapsed = time.perf_counter() - t0 - 3
    if sink.returncode != 0:
        print(sink.stderr.decode()[-1000:])
        return None
    count = subprocess.run([*cli, "sql", "SELECT count() FROM priced_events", "--format", "csv"], env=env, capture_output=True)
    rows = int(count.stdout.decode().split()[-1]) if count.returncode == 0 and count.stdout.strip() else -1
    return elapsed, rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_cpu_seconds() -> float:
    """CPU seconds of the local broker (0 when it runs elsewhere)."""
    pid = broker_pid()
    try:
        return cpu_seconds(pid) if pid else 0.0
    except OSError:
        return 0.0


def broker_jit_seconds() -> float:
    """CPU seconds of the broker JVM's JIT compiler threads (`C1/C2 CompilerThread`): a fresh JVM spends
    tens of seconds compiling its request paths, which a per-record figure must not mistake for request cost."""
    pid, total = broker_pid(), 0.0
    for task in Path(f"/proc/{pid}/task").glob("*") if pid else ():
        try:
            if (task / "comm").read_text().startswith(("C1 Compiler", "C2 Compiler")):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue  # a compiler thread that exited: its time is gone from the sum, as from the process's
    return total


def warm_broker(settings: Settings, max_s: float = 120.0, round_records: int = 100_000) -> dict:
    """Push rounds of pipeline-shaped traffic (idempotent lz4 produce, batch fetch, offset commits, 12 partitions)
    through the local broker until its JIT compiler threads take under 5 % of its CPU in a round, or max_s passes.
    Returns what it did (rounds, seconds, the broker's JIT and total CPU seconds it spent)."""
    if broker_pid() is None:
        return {"rounds": 0, "seconds": 0.0, "jit_s": 0.0, "cpu_s": 0.0}
    scratch = Settings(topic_prefix=f"warm{uuid.uuid4().hex[:8]}")
    create_topics(scratch)
    topic, records = scratch.topic("usage"), make_events(round_records, 1000, seed=5)
    consumer = Consumer(scratch.kafka_config(**{"group.id": scratch.group("warm"), "enable.auto.commit": False,
                                                "auto.offset.reset": "earliest"}))
    consumer.subscribe([topic])
    t0, jit0, cpu0, rounds, seen = time.perf_counter(), broker_jit_seconds(), broker_cpu_seconds(), 0, 0
    while time.perf_counter() - t0 < max_s:
        jit, cpu = broker_jit_seconds(), broker_cpu_seconds()
        produce(scratch, topic, records)
        while seen < round_records * (rounds + 1) and time.perf_counter() - t0 < max_s:
            batch = [m for m in consumer.consume(5000, timeout=1.0) if not m.error()]
            seen += len(batch)
            if batch:
                consumer.commit(asynchronous=True)
        rounds += 1
        if broker_jit_seconds() - jit < 0.05 * max(broker_cpu_seconds() - cpu, 1e-9):
            break
    consumer.close()
    return {"rounds": rounds, "seconds": time.perf_counter() - t0, "jit_s": broker_jit_seconds() - jit0,
            "cpu_s": broker_cpu_seconds() - cpu0}


class _LedgerWatch:
    """What wait_until_in_ledger polls: priced's high watermarks (one batched ListOffsets request; 12 uncached
    watermark calls every 50 ms were ~240 requests/s, a large share of the broker's CPU in a slow run) and the
    sink group's committed offsets (one OffsetFetch)."""

    def __init__(self, settings: Settings, group: str | None = None):
        from confluent_kafka.admin import AdminClient

        topic = settings.topic("priced")
        self.consumer = Consumer(settings.kafka_config(**{"group.id": group or f"watch-{uuid.uuid4().hex}",
                                                          "enable.auto.commit": False}))
        self.admin = AdminClient(settings.kafka_config())
        self.parts = [TopicPartition(topic, p) for p in self.consumer.list_topics(topic, timeout=30).topics[topic].partitions]

    def ends(self) -> list[int]:
        from confluent_kafka.admin import OffsetSpec

        futures = self.admin.list_offsets({tp: OffsetSpec.latest() for tp in self.parts}, request_timeout=30)
        return [futures[tp].result().offset for tp in self.parts]

    def progress(self) -> tuple[list[int], list[int]]:
        return self.ends(), [max(tp.offset, 0) for tp in committed_offsets(self.consumer, self.parts)]

    def close(self) -> None:
        self.consumer.close()


def broker_idle_rates(settings: Settings, group: str, procs: list, seconds: float = 3.0) -> tuple[float, float]:
    """Broker CPU seconds per second that are not per event: (the pipeline attached and idle, this bench's own
    polling with the pipeline paused). In a slow run they were most of the broker's "per event" figure."""
    watch = _LedgerWatch(settings, group)
    cpu0, t0 = broker_cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    pipeline = (broker_cpu_seconds() - cpu0) / (time.perf_counter() - t0)
    for proc in procs:
        proc.send_signal(signal.SIGSTOP)
    cpu0, t0 = broker_cpu_seconds(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        watch.progress()
        time.sleep(0.05)
    polling = (broker_cpu_seconds() - cpu0) / (time.perf_counter() - t0)
    for proc in procs:
        proc.send_signal(signal.SIGCONT)
    watch.close()
    return pipeline, polling


def wait_until_in_ledger(settings: Settings, group: str | None, expected: int, patience: float = 60) -> None:
    """Poll until the priced topic holds `expected` records and the sink group committed all of them
    (the sink commits only after its insert: committed = rows visible in ClickHouse); group None: until priced
    holds them (the stream stage alone). Gives up after `patience` seconds without progress, naming how far it
    got (e.g. events dead-lettered upstream)."""
    watch = _LedgerWatch(settings, group)
    progress, since = None, time.monotonic()
    try:
        while True:
            ends, committed = watch.progress() if group else (watch.ends(), None)
            if sum(ends) >= expected and committed in (None, ends):
                return
            seen = (sum(ends), None if committed is None else sum(committed))
            if seen != progress:
                progress, since = seen, time.monotonic()
            elif time.monotonic() - since > patience:
                ledger = f", {sum(committed):,} in the ledger" if committed is not None else ""
                raise SystemExit(f"stuck: {sum(ends):,} priced records of {expected:,} expected{ledger}; "
                                 f"see the dead letters in {settings.topic('dlq')}")
            time.sleep(0.05)
    finally:
        watch.close()


def run_end_to_end(records: list[tuple[bytes, bytes]], workers: int, warmup: int = 20_000, broker_warmup_s: float = 60.0) -> dict:
    """Sustained rate with the whole pipeline warm: usage -> stream worker(s) -> priced -> sink -> rows in ClickHouse.

    The workers and the sink start on fresh topics and carry `warmup` events end to end (imports, chDB start
    and group joins are behind them); then they are paused (SIGSTOP), the N events are produced, and the clock
    runs from SIGCONT until the sink has committed the last row. Baselines, after the pipeline has gone: a bare
    consumer reading the same topic, and the same N messages produced alone into a fresh topic (the fastest
    of three reads each; the warm-up batches at the head of the pipeline's topic make a plain consumer with
    librdkafka's default fetch sizes read it ~40 % slower, so the fresh topic is the stricter baseline).
    A local broker is warmed first (`warm_broker`): on a fresh JVM the JIT compiler alone cost ~40 µs per event.
    """
    warmed = warm_broker(Settings(), broker_warmup_s) if broker_warmup_s > 0 else None
    settings = Settings(topic_prefix=f"e2e{uuid.uuid4().hex[:8]}")
    create_topics(settings)
    data_dir = Path(f"/tmp/{settings.topic_prefix}")
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(data_dir), "METERLINE_CLICKHOUSE_DSN": f"chdb://{data_dir / 'ch'}"}
    cli = [sys.executable, "-c", "from meterline.cli import main; main()"]
    subprocess.run([*cli, "migrate"], env=env, capture_output=True, check=True)
    group = f"{settings.topic_prefix}.sink"
    produce(settings, settings.topic("usage"), make_events(warmup, 500, seed=2))  # through every stage: their JIT paths too
    procs = [subprocess.Popen([*cli, "streams", "--instance-id", f"e2e-{i}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(workers)]
    procs.append(subprocess.Popen([*cli, "sink", "--group", group], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    names = [*(f"stream worker {i}" for i in range(workers)), "sink"]
    try:
        wait_until_in_ledger(settings, group, warmup)
        idle, polling = broker_idle_rates(settings, group, procs)
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        produce(settings, settings.topic("usage"), records)
        cpu0 = [cpu_seconds(p.pid) for p in procs] + [broker_cpu_seconds(), broker_jit_seconds()]
        t0 = time.perf_counter()
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
        wait_until_in_ledger(settings, group, warmup + len(records))
        elapsed = time.perf_counter() - t0
        cpu1 = [cpu_seconds(p.pid) for p in procs] + [broker_cpu_seconds(), broker_jit_seconds()]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=120)
    fresh = Settings(topic_prefix=f"{settings.topic_prefix}b")
    create_topics(fresh)
    produce(fresh, fresh.topic("usage"), records)
    count = subprocess.run([*cli, "sql", "SELECT count() FROM priced_events", "--format", "csv"], env=env, capture_output=True)
    return {
        "rate": len(records) / elapsed,
        "rows": int(count.stdout.decode().split()[-1]) - warmup,
        "bare same topic": (warmup + len(records)) / min(bare_consume(settings, settings.topic("usage"), warmup + len(records)) for _ in range(3)),
        "bare fresh topic": len(records) / min(bare_consume(fresh, fresh.topic("usage"), len(records)) for _ in range(3)),
        "cpu µs/event": {name: (b - a) / len(records) * 1e6 for name, a, b in zip([*names, "broker", "of it broker JIT"], cpu0, cpu1)},
        "broker warm-up": warmed,
        "broker idle CPU s/s": idle, "broker polling CPU s/s": polling,
        "broker µs/event less its idle cost": ((cpu1[-2] - cpu0[-2]) - (idle + polling) * elapsed) / len(records) * 1e6,
    }


def end_to_end_section(args: argparse.Namespace, r: dict) -> str:
    strict = max(r["bare same topic"], r["bare fresh topic"])
    cpu = ", ".join(f"{name} {us:.1f}" for name, us in r["cpu µs/event"].items())
    return (f"\n## end to end: usage -> {args.workers} stream worker(s) + ledger sink at once -> rows in ClickHouse, "
            f"{utc_stamp()}\n\n{machine()} Command: `"
            f"{command('pipeline', '--end-to-end', *_size_args(args))}`\n\n"
            f"| measure | value |\n|---|---|\n| rows in ClickHouse | {r['rows']:,} of {args.events:,} |\n"
            f"| sustained usage-to-rows-visible rate, warm pipeline, all stages at once (SIGCONT to last row committed) | {r['rate']:,.0f} events/s |\n"
            f"| CPU per event (µs, from /proc) | {cpu} |\n"
            f"| broker, less what it spends per second anyway (a lower bound: busy fetches replace idle ones; measured for "
            f"3 s each before the run: the pipeline idle "
            f"{r['broker idle CPU s/s'] * 1000:.0f} ms CPU/s, this bench's polling {r['broker polling CPU s/s'] * 1000:.0f} ms CPU/s) "
            f"| {max(r['broker µs/event less its idle cost'], 0.0):.1f} µs/event |\n"
            f"| broker warm-up before the run (`--broker-warmup-s {args.broker_warmup_s:g}`) | {_warmed(r['broker warm-up'])} |\n"
            f"| bare confluent-kafka consume of the pipeline's topic (same run) | {r['bare same topic']:,.0f} events/s (ratio {r['rate'] / r['bare same topic']:.2f}) |\n"
            f"| bare confluent-kafka consume of the same messages in a fresh topic (same run) | {r['bare fresh topic']:,.0f} events/s (ratio {r['rate'] / r['bare fresh topic']:.2f}) |\n"
            f"| **ratio to the faster baseline** | **{r['rate'] / strict:.2f}** |\n")


def _warmed(w: dict | None) -> str:
    if w is None:
        return "none (cold JVM: its JIT compiler threads show in the broker's CPU)"
    return (f"{w['rounds']} rounds of 100k records, {w['seconds']:.0f} s; the broker spent {w['cpu_s']:.1f} CPU s, "
            f"{w['jit_s']:.1f} of them compiling")


def _size_args(args: argparse.Namespace) -> list[str]:
    return [f"--events {args.events}", f"--sessions {args.sessions}", f"--workers {args.workers}"]


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes in one consumer group (partitions = parallelism)")
    parser.add_argument("--ledger", action="store_true", help="also drain priced into embedded ClickHouse with `meterline sink`")
    parser.add_argument("--end-to-end", action="store_true",
                        help="only: usage -> stream worker(s) -> priced -> sink -> rows in ClickHouse, all running at once")
    parser.add_argument("--broker-warmup-s", type=float, default=60.0,
                        help="--end-to-end: push traffic through a local broker until its JIT compiler settles (at most this "
                             "long; 0: measure a cold broker as it is)")
    args = parser.parse_args()
    if args.end_to_end:
        if args.broker_warmup_s > 0:  # else the broker's CPU would read 0.0 and its JIT would go unwarmed, silently
            require_local_broker("measure a broker elsewhere with --broker-warmup-s 0 (its CPU then reads 0)")
        section = end_to_end_section(args, run_end_to_end(make_events(args.events, args.sessions), args.workers,
                                                             broker_warmup_s=args.broker_warmup_s))
        print(section)
        append_result("pipeline", section, TITLE)
        return

    settings = Settings(topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    create_topics(settings)
    records = make_events(args.events, args.sessions)
    worker_rate, produce_s, stats, rss_kib, cpu = run_workers(settings, args.workers, Path(f"/tmp/{settings.topic_prefix}"), records)
    bare = Settings(topic_prefix=f"{settings.topic_prefix}b")  # the same N alone in a fresh topic, as before the workers ran
    create_topics(bare)
    produce(bare, bare.topic("usage"), records)
    cpu0, bare_rates = time.process_time(), [args.events / bare_consume(bare, bare.topic("usage"), args.events) for _ in range(3)]
    bare_cpu_us = (time.process_time() - cpu0) / (3 * args.events) * 1e6
    bare_rate = sorted(bare_rates)[1]
    state_bytes, scopes = state_memory(args.sessions)
    stages = stage_costs()
    try:
        faust_us = faust_cost()
    except Exception as err:  # noqa: BLE001 - the comparison is optional
        print(f"faust measurement failed: {err}")
        faust_us = None
    ledger = run_ledger(settings, Path(f"/tmp/{settings.topic_prefix}"), args.events) if args.ledger else None

    lines = [
        f"## stream worker (`bench/pipeline.py`), {utc_stamp()}",
        "",
        f"{machine(SHARED)} Command: "
        f"`{command('pipeline', *_size_args(args), *(['--ledger'] if args.ledger else []))}`. "
        "Worker rate = N / (time from resuming the warm, paused workers until priced holds all N results).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| events | {args.events:,} ({args.sessions:,} sessions, 50 tenants, 5 models + tool calls) |",
        f"| produce (idempotent, lz4) | {args.events / produce_s:,.0f} events/s |",
        f"| bare confluent-kafka consume (baseline; median of {', '.join(f'{r:,.0f}' for r in bare_rates)}; "
        f"{bare_cpu_us:.2f} CPU µs/event) | {bare_rate:,.0f} events/s |",
        f"| {args.workers} stream worker process(es): usage -> priced (+ spend, changelog, anomalies, commit) | {worker_rate:,.0f} events/s |",
        f"| **ratio worker / bare consume** | **{worker_rate / bare_rate:.2f}** |",
        f"| CPU per event while the clock ran (µs, from /proc; the broker's only when it is local) | "
        f"{', '.join(f'{name} {us:.1f}' for name, us in cpu.items())} |",
        f"| worker counters | {' / '.join(', '.join(f'{k}={v}' for k, v in sorted(s.items())) for s in stats)} |",
        f"| worker process max RSS ({args.sessions:,} sessions{' over ' + str(args.workers) + ' workers' if args.workers > 1 else ''}) | {rss_kib / 1024:,.0f} MiB |",
        f"| worker state at {args.sessions:,} active sessions ({scopes:,} scopes; spend + detectors + dedupe, tracemalloc) | "
        f"{state_bytes / 2**20:,.1f} MiB ({state_bytes / args.sessions:,.0f} B per session) |",
    ]
    if ledger:
        lines.append(f"| `meterline sink` priced -> ClickHouse (chDB) drain (the N and the warm-up) | {ledger[1] / ledger[0]:,.0f} events/s, {ledger[1]:,} rows |")
    lines += ["", "Per-stage cost, one core, no Kafka I/O (µs per event):", "", "| stage | µs/event |", "|---|---|"]
    lines += [f"| {name} | {us:.2f} |" for name, us in stages.items()]
    if faust_us is not None:
        lines.append(f"| Faust agent + one table update via test_context (in-memory store, no Kafka I/O; for the choice) | {faust_us:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    append_result("pipeline", text, TITLE)


if __name__ == "__main__":
    main()
