"""CPU µs per event of each process's stages, in process, from the same messages (issue 17: where each µs goes).

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.profile [--events 100000] [--cprofile]

- worker: `StreamWorker.process()` over prebuilt usage messages (the bench's events), its producer
  sending to a fresh topic prefix on the real broker, then `producer.flush()`; the clock is
  `time.process_time()` (every thread of this process: librdkafka's included).
- sink: `LedgerSink._take_many()` per 10,000 of the priced records the worker produced (read back from Kafka
  first), then `flush()` per 50,000 rows into a fresh embedded chDB (migrated); chDB's threads count too. Beside
  it `_take()` per record (the intake before session 4); the two alternate, twice each, best of two.
- bare: a plain confluent-kafka consume of the usage topic in the same run, for the ratio.
- floor (--worker-only): the loop's message calls and one produce() per event of its real priced.v2 bytes on
  the worker's producer, no stages: what a worker with every stage native would still pay.

Per stage of the worker: cProfile's cumulative time of its inner calls (decode, digest, price, priced JSON,
detectors, spend, produce), scaled to the unprofiled total. This measures CPU, not wall time, so it is
much less sensitive to a busy machine than a rate; BENCHMARKS.md quotes both.
"""
from __future__ import annotations

import cProfile
import os
import platform
import pstats
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from meterline.settings import Settings
from meterline.topics import create_topics, partition_ends

from .common import code_option, load_code, parser as make_parser
from .fake_kafka import Message as Msg
from .pipeline import make_events, produce

RESULTS = Path(__file__).with_name("results") / "profile.md"


def read_all(settings: Settings, topic: str) -> tuple[list, float]:
    """Every message of `topic` (real Messages) and the process CPU seconds a bare consume of them took."""
    consumer = Consumer(settings.kafka_config(**{"group.id": f"p-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False,
                                                 "fetch.max.bytes": 64 * 1024 * 1024}))
    ends = partition_ends(consumer, topic)
    parts = list(ends)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out, todo, c0 = [], sum(ends.values()), time.process_time()
    while len(out) < todo:
        out += [m for m in consumer.consume(10_000, timeout=1.0) if not m.error()]
    cpu = time.process_time() - c0
    consumer.close()
    return out, cpu


def worker_cost(settings: Settings, msgs: list[Msg], profile: bool) -> tuple[float, pstats.Stats | None]:
    from meterline.streams.worker import StreamWorker

    worker = StreamWorker(settings, checkpoint_interval=3600, publish_interval=3600)
    batches = [msgs[i:i + 5000] for i in range(0, len(msgs), 5000)]
    prof = cProfile.Profile() if profile else None
    c0 = time.process_time()
    if prof:
        prof.enable()
    for batch in batches:
        worker.process(batch)
    worker.publish_spend()
    worker.producer.flush(60)
    if prof:
        prof.disable()
    cpu = time.process_time() - c0
    return cpu / len(msgs) * 1e6, pstats.Stats(prof) if prof else None


def floor_cost(settings: Settings, msgs: list[Msg]) -> float:
    """CPU µs per event of what any one-priced-record-per-event worker must do: the loop's message calls and one
    produce() of the event's real priced.v2 bytes (built before the clock) on the worker's own producer, then
    flush; no decode, pricing, detectors or spend. The part of the worker's cost that native stages cannot remove."""
    from meterline.streams.codec import PricedV2Writer, decode_usage
    from meterline.streams.worker import StreamWorker

    worker = StreamWorker(settings, checkpoint_interval=3600, publish_interval=3600)
    write, price, now = PricedV2Writer().write, worker.catalog.price_pico, datetime.now(timezone.utc)
    bodies = []
    for msg in msgs:
        event = decode_usage(msg.value(), now=now)
        parts = price(event) or (0,) * 5
        bodies.append(write(event, parts[4], parts, "catalog", worker.catalog.version, now))
    produce, topic, usage = worker.producer.produce, worker.topics["priced"], worker.topics["usage"]
    c0 = time.process_time()
    for msg, body in zip(msgs, bodies):
        if msg.error() or msg.topic() != usage:
            continue
        msg.value(), msg.offset(), msg.partition()
        produce(topic, body, msg.key())
    worker.producer.flush(60)
    return (time.process_time() - c0) / len(msgs) * 1e6


def _fresh_ledger(settings: Settings, data: Path, name: str) -> Settings:
    return Settings(topic_prefix=settings.topic_prefix, data_dir=data, clickhouse_dsn=f"chdb://{data / name}")


def sink_cost(settings: Settings, priced: list, profile: bool, batched: bool = True) -> tuple[float, pstats.Stats | None, int]:
    from meterline.sql import ledger
    from meterline.sql.sink import LedgerSink

    client = ledger.connect(settings)
    ledger.migrate(client)
    sink = LedgerSink(settings, client=client, group=f"p-{uuid.uuid4().hex[:6]}")
    prof = cProfile.Profile() if profile else None
    c0 = time.process_time()
    if prof:
        prof.enable()
    for i in range(0, len(priced), 10_000):  # what run() takes per consume() call
        chunk = priced[i:i + 10_000]
        if batched:
            sink._take_many(chunk)
        else:
            for msg in chunk:
                sink._take(msg)
        if (i + len(chunk)) % 50_000 == 0:
            sink.flush()
    sink.flush()
    if prof:
        prof.disable()
    cpu = time.process_time() - c0
    rows = client.query("SELECT count() FROM priced_events").result_rows[0][0]
    sink.consumer.close()
    return cpu / len(priced) * 1e6, pstats.Stats(prof) if prof else None, rows


WORKER_STAGES = {  # cProfile function name -> stage
    "decode_usage": "decode + validate (msgspec)", "usage_digest": "dedupe digest", "price_pico": "price",
    "_priced_json": "priced JSON", "_priced_v2": "priced.v2 encode", "usage": "anomaly detectors", "add": "spend (5 scopes)", "add_many": "spend (5 scopes)",
    "<method 'produce' of 'cimpl.Producer' objects>": "produce()", "publish_spend": "publish spend",
    "<method 'flush' of 'cimpl.Producer' objects>": "producer flush (librdkafka)",
}
SINK_STAGES = {
    "_take_many": "intake (_take_many: offsets, line with Kafka columns)", "load": "stage: truncate + JSONEachRow insert + typed fill",
    "load_binary": "  of which priced.v2: RowBinary insert + framing check + typed fill",
    "_rejected": "checks (rejected rows query)", "insert": "dedupe + insert into the ledger",
    "<method 'query' of 'chdb.state.sqlitelike.Connection' objects>": "(chDB queries, all)",
}


def breakdown(stats: pstats.Stats, names: dict[str, str], total_us: float, n: int) -> list[tuple[str, float]]:
    """µs per event of each named function (cumulative, self-inclusive), from cProfile's table."""
    out: dict[str, float] = {}
    profiled_total = max(stats.total_tt, 1e-9)
    for (_, _, func), (_, _, _, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func in names:
            out[names[func]] = out.get(names[func], 0.0) + cumtime
    scale = total_us / (profiled_total / n * 1e6)  # cProfile's overhead spread evenly
    return [(stage, seconds / n * 1e6 * scale) for stage, seconds in sorted(out.items(), key=lambda kv: -kv[1])]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def state_rss(sessions: int) -> tuple[int, int]:
    """RSS growth of a worker's state (the spend book, detectors and a 12-partition dedupe window, fed as
    process() feeds them: two events per session) with `sessions` active sessions, and its scope count.
    Run in a fresh process per figure (python -m bench.profile --memory N): the input events are built first
    and their memory is not counted."""
    import gc

    from meterline.streams.anomalies import Detectors
    from meterline.streams.codec import decode_usage
    from meterline.streams.spend import SpendBook
    from meterline.streams.worker import DedupeWindow

    events = [decode_usage(raw) for _, raw in make_events(2 * sessions, sessions, seed=9)]
    gc.collect()
    before = rss_bytes()
    book, detectors, dedupe = SpendBook(), Detectors(), DedupeWindow(100_000 * 12)
    for e in events:
        dedupe.seen(e.event_id.int)
        book.add((e.tenant_id, e.team, e.project, e.agent_id, e.session_id), e.ts, 1000, e.input_tokens, e.output_tokens)
        detectors.usage(e, 1000, False)
    gc.collect()
    return rss_bytes() - before, len(book.states)


class DictStore:
    """The session-7 design for comparison: parked tuples in a dict in process memory (what StateStore replaces)."""

    def __init__(self) -> None:
        self.rows: dict = {}
        self.empty = True

    def get(self, key):
        return self.rows.get(key)

    def put_many(self, items) -> int:
        n = len(self.rows)
        self.rows.update(items)
        self.empty = False
        return len(self.rows) - n

    def drop_months_before(self, month: int) -> int:
        n = len(self.rows)
        self.rows = {k: v for k, v in self.rows.items() if v[0] >= month}
        return n - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def aged_rss(sessions: int, waves: int, store_kind: str = "sqlite", sample: int = 10_000) -> dict:
    """A month of sessions that come and go: `sessions` sessions in `waves` hourly waves (2 events each), a
    checkpoint after each wave (drain, detectors' tick, evict_idle with the worker's 1 h idle), so most sessions
    are idle and aged out. Returns the peak RSS growth, what is in memory and in the store, and CPU µs per add()
    of a session read back from the store, of a session in memory and of a new one (`sample` of each)."""
    import gc
    from datetime import timedelta

    from meterline.streams.anomalies import Detectors
    from meterline.streams.codec import decode_usage
    from meterline.streams.spend import SpendBook
    from meterline.streams.state_store import StateStore
    from meterline.streams.worker import DedupeWindow

    events = [decode_usage(raw) for _, raw in make_events(2 * sessions, sessions, seed=9)]
    per_wave = len(events) // waves
    start = events[0].ts.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    for i, e in enumerate(events):  # wave w at hour w, its events over 30 minutes
        e.ts = start + timedelta(hours=i // per_wave, microseconds=(i % per_wave) * 1_800_000_000 // per_wave)
    events.sort(key=lambda e: e.ts)
    gc.collect()
    before, peak = rss_bytes(), 0
    store = StateStore() if store_kind == "sqlite" else DictStore()
    book, detectors, dedupe = SpendBook(store), Detectors(), DedupeWindow(100_000 * 12)  # type: ignore[arg-type]
    for w in range(waves):
        for e in events[w * per_wave:(w + 1) * per_wave]:
            dedupe.seen(e.event_id.int)
            book.add((e.tenant_id, e.team, e.project, e.agent_id, e.session_id), e.ts, 1000, e.input_tokens, e.output_tokens)
            detectors.usage(e, 1000, False)
        now = start + timedelta(hours=w, minutes=31)
        list(book.drain(now))
        detectors.tick(now)
        book.evict_idle(now, timedelta(hours=1))
        peak = max(peak, rss_bytes() - before)
    in_memory = sum(1 for k in book.states if k[1] == "session")
    now = start + timedelta(hours=waves, minutes=1)
    first_wave = {(e.tenant_id, e.team, e.project, e.agent_id, e.session_id) for e in events[:per_wave]}
    returning = [ids for ids in first_wave if (ids[0], "session", path_of(ids)) not in book.states][:sample]
    last_wave = [(e.tenant_id, e.team, e.project, e.agent_id, e.session_id) for e in events[-per_wave:]][:sample]
    new = [(f"tenant{i % 50}", "teamX", "projX", f"agent{i % 2000}", f"new{i}") for i in range(sample)]
    costs = {}
    for name, group in (("returning", returning), ("in memory", last_wave), ("new", new)):
        c0 = time.process_time()
        for ids in group:
            book.add(ids, now, 1)
        costs[name] = (time.process_time() - c0) / max(len(group), 1) * 1e6
    wrong = [ids for ids in returning if book.states[(ids[0], "session", path_of(ids))].period != 2 * 1000 + 1]
    assert not wrong, f"{len(wrong)} returning sessions lost their month-to-date (e.g. {wrong[0]})"
    disk = store.path.stat().st_size if store_kind == "sqlite" else 0
    return {"peak": peak, "in_memory": in_memory, "stored": len(store), "disk": disk, "returned": len(returning), **costs}


def path_of(ids: tuple[str, ...]) -> str:
    from meterline.schemas.scopes import scope_ids

    return scope_ids(*ids)["session"]


def aged_section(counts: list[int], waves: int) -> list[str]:
    import json
    import subprocess
    import sys

    lines = ["", f"Sessions aging out (`--aged`): N sessions in {waves} hourly waves of 2 events each, a checkpoint after each "
             "wave (drain, detectors' tick, evict_idle 1 h), so at most two waves are active; peak RSS growth over the run "
             "(one fresh process per row), CPU µs per add() of 10,000 sessions of each kind, returning = read back from the "
             "store with its totals (checked):", "",
             "| sessions | store | peak RSS growth MiB | sessions in memory at the end | scopes in the store | store file MiB | "
             "µs per returning session | µs per session in memory | µs per new session |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in counts:
        for kind in ("dict", "sqlite"):
            out = subprocess.run([sys.executable, "-c", f"import json; from bench.profile import aged_rss; "
                                  f"print(json.dumps(aged_rss({n}, {waves}, {kind!r})))"], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            label = "SQLite file (StateStore)" if kind == "sqlite" else "dict in memory (session 7)"
            lines.append(f"| {n:,} | {label} | {r['peak'] / 2**20:,.1f} | {r['in_memory']:,} | {r['stored']:,} | "
                         f"{r['disk'] / 2**20:,.1f} | {r['returning']:.1f} | {r['in memory']:.1f} | {r['new']:.1f} |")
    return lines


def memory_section(counts: list[int]) -> list[str]:
    import subprocess
    import sys

    lines = ["", "Worker state in memory (RSS growth, one fresh process per row; 2 events per session, dedupe window "
             "1.2M ids = 12 partitions x 100k):", "", "| active sessions | scopes | RSS growth MiB | bytes per session | "
             "projected at 1,000,000 sessions |", "|---:|---:|---:|---:|---:|"]
    for n in counts:
        out = subprocess.run([sys.executable, "-c", f"from bench.profile import state_rss; print(*state_rss({n}))"],
                             capture_output=True, text=True, check=True).stdout.split()
        grown, scopes = int(out[0]), int(out[1])
        lines.append(f"| {n:,} | {scopes:,} | {grown / 2**20:,.1f} | {grown / n:,.0f} | {grown / n * 1e6 / 2**30:,.2f} GiB |")
    return lines


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--cprofile", action="store_true", help="also break each process's µs down by stage")
    parser.add_argument("--memory", help="only: worker state RSS per active session, for these session counts (10000,100000)")
    parser.add_argument("--aged", help="with --memory: also sessions aging out to the store, for these session counts")
    parser.add_argument("--waves", type=int, default=20, help="--aged: hourly waves the sessions come in")
    parser.add_argument("--worker-only", action="store_true", help="bare consume and stream worker only (no sink, no chDB)")
    parser.add_argument("--repeat", type=int, default=1, help="measure the worker this many times (fresh worker each)")
    code_option(parser, "streams")
    args = parser.parse_args()
    load_code("streams", args.code)  # before any streams module is imported (they are, inside the functions below)
    if args.memory:
        text = "\n".join([f"## Worker memory per active session ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
                          f"Machine: `{platform.machine()}`, Python {platform.python_version()}. Command: "
                          f"`.venv/bin/python -m bench.profile --memory {args.memory}"
                          f"{f' --aged {args.aged} --waves {args.waves}' if args.aged else ''}`",
                          *memory_section([int(n) for n in args.memory.split(",") if n]),
                          *(aged_section([int(n) for n in args.aged.split(",")], args.waves) if args.aged else [])]) + "\n"
        print(text)
        RESULTS.write_text(RESULTS.read_text().rstrip() + "\n\n" + text if RESULTS.exists() else text)
        return
    data = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    settings = Settings(topic_prefix=f"prof{uuid.uuid4().hex[:8]}", data_dir=data, clickhouse_dsn=f"chdb://{data / 'ch'}")
    create_topics(settings)
    produce(settings, settings.topic("usage"), make_events(args.events, args.sessions))
    usage, bare_cpu = read_all(settings, settings.topic("usage"))
    msgs = [Msg(m.topic(), m.partition(), m.offset(), m.key(), m.value()) for m in usage]
    del usage
    runs = [worker_cost(settings, msgs, profile=False)[0] for _ in range(args.repeat)]
    worker_us = min(runs)
    floor_us = min(floor_cost(settings, msgs) for _ in range(args.repeat)) if args.worker_only else None
    bare_us = bare_cpu / args.events * 1e6
    head = [f"## CPU per event, in process ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
            f"Machine: `{platform.machine()}`, {os.cpu_count()} cores, Python {platform.python_version()}, load average "
            f"{os.getloadavg()[0]:.2f}. Command: `.venv/bin/python -m bench.profile --events {args.events} --sessions {args.sessions}"
            f"{' --cprofile' if args.cprofile else ''}{' --worker-only' if args.worker_only else ''}"
            f"{f' --repeat {args.repeat}' if args.repeat > 1 else ''}{f' --code {args.code}' if args.code else ''}`", "",
            "| process | CPU µs/event | ratio to a bare consume's CPU | events/s on one core |", "|---|---:|---:|---:|",
            f"| bare confluent-kafka consume of the usage topic | {bare_us:.2f} | 1 | {1e6 / bare_us:,.0f} |",
            f"| stream worker: process() + publish + producer flush (best of {', '.join(f'{r:.2f}' for r in runs)}) | "
            f"{worker_us:.2f} | {bare_us / worker_us:.3f} | {1e6 / worker_us:,.0f} |"]
    if args.worker_only:
        lines = head + [f"| floor: the loop's message calls + one produce() of each event's priced.v2 bytes, no stages "
                        f"(`floor_cost`) | {floor_us:.2f} | {bare_us / floor_us:.3f} | {1e6 / floor_us:,.0f} |"]
        if args.cprofile:
            lines += _worker_breakdown(args, settings, data, msgs, worker_us)
        _write(lines)
        return
    priced, _ = read_all(settings, settings.topic("priced"))
    # alternated, best of two each, each into a fresh database: measured once each, the first paid chDB's own
    # warm-up and the batched intake read ~20 % slower than the per-record one (13.9 vs 11.4, 12.4 vs 10.0 µs/row)
    sink_runs, one_runs = [], []
    for i in range(2):
        sink_us, _, rows = sink_cost(_fresh_ledger(settings, data, f"ch-batched{i}"), priced, profile=False)
        sink_runs.append(sink_us)
        one_runs.append(sink_cost(_fresh_ledger(settings, data, f"ch-one{i}"), priced, profile=False, batched=False)[0])
    sink_us, one_us = min(sink_runs), min(one_runs)
    lines = [f"## CPU per event, in process ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"Machine: `{platform.machine()}`, {os.cpu_count()} cores, Python {platform.python_version()}, load average "
             f"{os.getloadavg()[0]:.2f}. Command: `.venv/bin/python -m bench.profile --events {args.events} --sessions {args.sessions}"
             f"{' --cprofile' if args.cprofile else ''}`", "",
             "| process | CPU µs/event | ratio to a bare consume's CPU |", "|---|---:|---:|",
             f"| bare confluent-kafka consume of the usage topic | {bare_us:.2f} | 1 |",
             f"| stream worker: process() + publish + producer flush | {worker_us:.2f} | {worker_us / bare_us:.1f} |",
             f"| sink: _take_many() + flush() into chDB ({rows:,} rows), as `run()` does (best of "
             f"{', '.join(f'{r:.2f}' for r in sink_runs)}) | {sink_us:.2f} | {sink_us / bare_us:.1f} |",
             f"| sink, same records, `_take()` one at a time (the intake before session 4) + flush() (best of "
             f"{', '.join(f'{r:.2f}' for r in one_runs)}) | {one_us:.2f} | {one_us / bare_us:.1f} |"]
    if args.cprofile:
        settings2 = Settings(topic_prefix=f"prof{uuid.uuid4().hex[:8]}", data_dir=data, clickhouse_dsn=f"chdb://{data / 'ch2'}")
        create_topics(settings2)
        _, wstats = worker_cost(settings2, [Msg(m._topic.replace(settings.topic_prefix, settings2.topic_prefix), m._partition,
                                                m._offset, m._key, m._value) for m in msgs], profile=True)
        priced2, _ = read_all(settings2, settings2.topic("priced"))
        _, sstats, _ = sink_cost(settings2, priced2, profile=True)
        lines += ["", "Where it goes (cProfile cumulative, scaled to the unprofiled totals; stages nest, so they do not sum):", "",
                  "| process | stage | µs/event |", "|---|---|---:|"]
        lines += [f"| worker | {stage} | {us:.2f} |" for stage, us in breakdown(wstats, WORKER_STAGES, worker_us, args.events)]
        lines += [f"| sink | {stage} | {us:.2f} |" for stage, us in breakdown(sstats, SINK_STAGES, sink_us, args.events)]
    _write(lines)


def _worker_breakdown(args, settings: Settings, data: Path, msgs: list[Msg], worker_us: float) -> list[str]:
    settings2 = Settings(topic_prefix=f"prof{uuid.uuid4().hex[:8]}", data_dir=data, clickhouse_dsn=f"chdb://{data / 'ch2'}")
    create_topics(settings2)
    _, wstats = worker_cost(settings2, [Msg(m._topic.replace(settings.topic_prefix, settings2.topic_prefix), m._partition,
                                            m._offset, m._key, m._value) for m in msgs], profile=True)
    return ["", "Where it goes (cProfile cumulative, scaled to the unprofiled total; stages nest, so they do not sum):", "",
            "| process | stage | µs/event |", "|---|---|---:|",
            *[f"| worker | {stage} | {us:.2f} |" for stage, us in breakdown(wstats, WORKER_STAGES, worker_us, args.events)]]


def _write(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = RESULTS.read_text() if RESULTS.exists() else "# Per-process CPU profile\n"
    RESULTS.write_text(previous.rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
