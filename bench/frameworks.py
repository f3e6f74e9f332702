"""Frameworks side by side: meterline's stream worker, a Faust agent, a quix-streams app and a bare
confluent-kafka consume, on the same produced usage events, in one run.

    .venv/bin/pip install -e '.[bench]'      # quixstreams (Faust is a base dependency)
    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.frameworks [--events 30000] [--sessions 10000]

Each variant runs in its own process on the same topic (12 partitions, `--sessions` sessions, bench.pipeline's
events) from the beginning, and reports its rate and CPU per event over the window from its first to its last
event (start-up excluded, the same for all). The spend work of the Faust and quix variants is the worker's own
per-event core: the contract's fast decode (streams.codec.decode_usage) and SpendBook.add over the five scopes
(tenant > team > project > agent > session), at a fixed cost; the worker does that plus dedupe, pricing,
detectors and producing priced/spend records, so its figure is the conservative one. Writes a section to
bench/results/frameworks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

from meterline.settings import Settings
from meterline.topics import create_topics

from .common import BARE_CONSUMER
from .pipeline import make_events, produce

RESULTS = Path(__file__).with_name("results") / "frameworks.md"
VARIANTS = ("bare", "worker", "quix", "faust")


class Window:
    """Wall and CPU time from the first event to the n-th (the same window for every variant)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.t0, self.c0, self.t1, self.c1 = n, 0, None, 0.0, 0.0, 0.0

    def open(self) -> None:
        if self.t0 is None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

    def tick(self, count: int = 1) -> bool:
        self.open()
        self.seen += count
        self.t1, self.c1 = time.perf_counter(), time.process_time()
        return self.seen >= self.n

    def report(self, name: str) -> None:
        wall, cpu = self.t1 - self.t0, self.c1 - self.c0
        print(json.dumps({"variant": name, "events": self.seen, "wall_s": wall, "cpu_s": cpu}), flush=True)


def spend_work():
    """The per-event spend core shared by the Faust and quix variants."""
    from meterline.streams.codec import decode_usage
    from meterline.streams.spend import SpendBook

    book = SpendBook()

    def work(raw: bytes) -> None:
        e = decode_usage(raw)
        book.add((e.tenant_id, e.team, e.project, e.agent_id, e.session_id), e.ts, 1_000_000, e.input_tokens, e.output_tokens)
    return work


def run_bare(settings: Settings, n: int) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    topic, window = settings.topic("usage"), Window(n)
    consumer = Consumer(settings.kafka_config(**{"group.id": f"bare-{uuid.uuid4().hex}", "enable.auto.commit": False, **BARE_CONSUMER}))
    parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    while True:
        msgs = [m for m in consumer.consume(500, timeout=1.0) if m.error() is None]  # small: the first batch comes free to the window
        if msgs and window.tick(len(msgs)):
            break
    window.report("bare confluent-kafka consume")


def run_worker(settings: Settings, n: int) -> None:
    from meterline.streams.worker import StreamWorker

    worker, window = StreamWorker(settings, group_id=f"bench-{uuid.uuid4().hex[:8]}"), Window(n)
    process = worker.process

    def timed(msgs):  # the window opens at the first batch and closes after the last one, as for the others
        window.open()
        process(msgs)
        window.tick(sum(1 for m in msgs if m.error() is None))

    worker.process = timed
    worker.run(until_caught_up=True)
    window.report("meterline stream worker (full: validate, dedupe, price, spend, detectors, produce)")


def run_faust(settings: Settings, n: int) -> None:
    import faust

    work, window = spend_work(), Window(n)
    app = faust.App(f"bench-faust-{uuid.uuid4().hex[:8]}", broker=f"kafka://{settings.bootstrap}", store="memory://",
                    web_enabled=False, consumer_auto_offset_reset="earliest", datadir=str(settings.data_dir / "faust"))
    topic = app.topic(settings.topic("usage"), value_type=bytes, value_serializer="raw")

    @app.agent(topic)
    async def spend(stream):
        async for raw in stream:
            work(raw)
            if window.tick():
                window.report("faust-streaming agent (same spend work)")
                os._exit(0)  # the figure is out; Faust's shutdown is not part of it

    faust.Worker(app, loglevel="ERROR", quiet=True, redirect_stdouts=False).execute_from_commandline()


def run_quix(settings: Settings, n: int) -> None:
    from quixstreams import Application

    work, window = spend_work(), Window(n)
    app = Application(broker_address=settings.bootstrap, consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
                      auto_offset_reset="earliest", state_dir=str(settings.data_dir / "quix"), loglevel="ERROR")
    sdf = app.dataframe(app.topic(settings.topic("usage"), value_deserializer="bytes"))

    def each(raw: bytes) -> None:
        work(raw)
        if window.tick():
            window.report("quix-streams app (same spend work)")
            os._exit(0)

    sdf.update(each)
    app.run()


def core_alone(events: list[tuple[bytes, bytes]]) -> dict:
    """The Faust and quix variants' spend work with no Kafka and no framework: what is left is their overhead."""
    work, window = spend_work(), Window(len(events))
    window.open()
    for _, raw in events:
        work(raw)
    window.tick(len(events))
    return {"variant": "their spend work alone, no Kafka (in process)", "events": len(events),
            "wall_s": window.t1 - window.t0, "cpu_s": window.c1 - window.c0}


def run_variant(settings: Settings, variant: str, n: int) -> dict:
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(settings.data_dir)}
    cmd = [sys.executable, "-m", "bench.frameworks", "--variant", variant, "--events", str(n)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    lines = [line[line.index('{"variant"'):] for line in out.stdout.splitlines() if '{"variant"' in line]  # after Faust's tty codes
    if not lines:
        raise SystemExit(f"{variant} failed: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def drop_topics(settings: Settings) -> None:
    """The run's topics (its prefix) and the frameworks' own (group-named), so repeated runs leave the broker lean."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_config())
    doomed = [t for t in admin.list_topics(timeout=30).topics if t.startswith((settings.topic_prefix + ".", "bench-faust-"))]
    for future in (admin.delete_topics(doomed, operation_timeout=30) if doomed else {}).values():
        future.result(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000, help="usage events produced and read by each variant")
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args()
    if args.variant:
        {"bare": run_bare, "worker": run_worker, "faust": run_faust, "quix": run_quix}[args.variant](Settings(), args.events)
        return
    base = Settings()
    settings = Settings(kafka_bootstrap=base.bootstrap, topic_prefix=f"fw{uuid.uuid4().hex[:8]}",
                        data_dir=base.data_dir / "bench-frameworks")
    create_topics(settings)
    try:
        events = make_events(args.events, args.sessions)
        produce(settings, settings.topic("usage"), events)
        results = [run_variant(settings, v, args.events) for v in VARIANTS] + [core_alone(events)]
    finally:
        drop_topics(settings)
    bare_rate = results[0]["events"] / results[0]["wall_s"]
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.events} usage events, {args.sessions} sessions, "
             f"12 partitions ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})", "",
             f"`python -m bench.frameworks --events {args.events} --sessions {args.sessions}`", "",
             "| variant | events/s | CPU µs/event | events/s ratio to bare | CPU ratio (bare µs / its µs) |",
             "|---|---:|---:|---:|---:|"]
    bare_us = 1e6 * results[0]["cpu_s"] / results[0]["events"]
    for r in results:  # on shared cores the wall rate moves with the neighbours; CPU per event much less
        rate, us = r["events"] / r["wall_s"], 1e6 * r["cpu_s"] / r["events"]
        lines.append(f"| {r['variant']} | {rate:,.0f} | {us:.1f} | {rate / bare_rate:.3f} | {bare_us / us:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
