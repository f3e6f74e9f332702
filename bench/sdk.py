"""SDK overhead per recorded call vs a bare confluent-kafka produce() of the same payload, same run.

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.sdk [--calls 50000] [--rounds 3]

Both sides talk to the real broker with the same producer settings (idempotent, acks=all,
linger 20 ms, lz4). Per call: `perf_counter_ns` around `meter.record_llm(...)` (validation,
UUIDv7, timestamp, msgspec encoding, enqueue; the background thread produces concurrently
and competes for the GIL, which is included) and around `producer.produce(topic, payload, key)`.
Also reported: CPU seconds per event for the whole path including delivery (process CPU
time over N calls plus the final flush), since work moved off the hot path is not free.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

from meterline.collectors import Meter
from meterline.collectors.sdk import encode_queued
from meterline.settings import Settings
from meterline.topics import create_topics

RESULTS = Path(__file__).resolve().parent / "results" / "sdk.md"
PRODUCER_CONF = {"enable.idempotence": True, "acks": "all", "linger.ms": 20, "compression.type": "lz4"}


def percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # ns -> µs


def bench_sdk(meter: Meter, calls: int) -> tuple[list[int], float]:
    timings, clock, record = [], time.perf_counter_ns, meter.record_llm
    cpu0 = time.process_time()
    for i in range(calls):
        t0 = clock()
        record("openai", "gpt-4o", 1200, 80, 1000, 0, 950, "ok", None)
        timings.append(clock() - t0)
    assert meter.flush(120), "the broker should take every event"
    return timings, (time.process_time() - cpu0) / calls


def bench_bare(settings: Settings, topic: str, payload: bytes, calls: int) -> tuple[list[int], float]:
    producer = Producer(settings.kafka_config(**PRODUCER_CONF))
    timings, clock, produce, poll = [], time.perf_counter_ns, producer.produce, producer.poll
    cpu0 = time.process_time()
    for i in range(calls):
        t0 = clock()
        produce(topic, payload, b"acme")
        timings.append(clock() - t0)
        if i % 1000 == 999:
            poll(0)  # serve delivery reports as any real producer loop must (not timed)
    assert producer.flush(120) == 0
    return timings, (time.process_time() - cpu0) / calls


def bench_context_manager(meter: Meter, calls: int) -> list[int]:
    timings, clock = [], time.perf_counter_ns
    for _ in range(calls):
        t0 = clock()
        with meter.llm_call("openai", "gpt-4o") as call:
            call.usage(1200, 80, 1000)
        timings.append(clock() - t0)
    meter.flush(120)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="meterline-bench-")), topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    create_topics(settings)
    topic = settings.topic("usage")
    meter = Meter(settings, tenant_id="acme", team="search", project="rag", agent_id="planner", session_id="bench-session")
    captured: list[tuple] = []
    meter._submit = captured.append  # one real payload for the baseline, exactly as the sender thread encodes it
    meter.record_llm("openai", "gpt-4o", 1200, 80, 1000, 0, 950, "ok", None)
    meter._submit = meter.sender.submit
    payload = encode_queued(captured[0])[1]

    bench_sdk(meter, 2000)  # warm-up: caches, connections
    bench_bare(settings, topic, payload, 2000)
    rows, sdk_all, bare_all = [], [], []
    for round_no in range(1, args.rounds + 1):
        sdk, sdk_cpu = bench_sdk(meter, args.calls)
        bare, bare_cpu = bench_bare(settings, topic, payload, args.calls)
        sdk_all += sdk
        bare_all += bare
        rows.append((round_no, statistics.median(sdk) / 1000, percentile(sdk, 0.99), statistics.median(bare) / 1000,
                     percentile(bare, 0.99), sdk_cpu * 1e6, bare_cpu * 1e6))
    ctx = bench_context_manager(meter, args.calls)
    meter.close()
    assert meter.stats.dropped == 0 and meter.stats.spooled == 0

    sdk_med, bare_med = statistics.median(sdk_all) / 1000, statistics.median(bare_all) / 1000
    report = render(args, payload, rows, sdk_med, percentile(sdk_all, 0.99), bare_med, percentile(bare_all, 0.99),
                    statistics.median(ctx) / 1000, percentile(ctx, 0.99))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)


def render(args, payload, rows, sdk_med, sdk_p99, bare_med, bare_p99, ctx_med, ctx_p99) -> str:
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    lines = [
        "## SDK overhead per recorded call (bench/sdk.py)",
        "",
        f"Machine: `{platform.machine()}`, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"librdkafka {__import__('confluent_kafka').libversion()[0]}; broker: the shared single-node dev broker.",
        f"Command: `METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.sdk --calls {args.calls} --rounds {args.rounds}`",
        f"Payload: one usage event, {len(payload)} bytes of JSON, key = tenant_id.",
        "",
        "| | median µs | p99 µs |",
        "|---|---:|---:|",
        f"| `meter.record_llm(...)` (validate + timestamp + enqueue; id and JSON on the sender thread) | {sdk_med:.2f} | {sdk_p99:.2f} |",
        f"| bare `producer.produce(topic, payload, key)` (baseline) | {bare_med:.2f} | {bare_p99:.2f} |",
        f"| **ratio SDK / bare produce** | **{sdk_med / bare_med:.2f}** | {sdk_p99 / bare_p99:.2f} |",
        f"| `with meter.llm_call(...) as c: c.usage(...)` (timing context manager) | {ctx_med:.2f} | {ctx_p99:.2f} |",
        "",
        "Per round (median / p99 in µs; CPU µs per event = process CPU time of the whole path, delivery included):",
        "",
        "| round | SDK median | SDK p99 | bare median | bare p99 | SDK CPU/event | bare CPU/event |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.1f} |" for r in rows),
        "",
        "Targets: median <= 10 µs and ratio <= 3 (per call, on the agent's thread). The SDK's background thread makes the "
        "UUIDv7, encodes and produces while the timed calls run, so GIL contention is inside the SDK numbers. That work is "
        "not free: the CPU column is the whole path per event (the SDK also serves a delivery callback per record, which "
        "the bare baseline skips), i.e. what a busy agent process pays in total. "
        "The machine is shared (2 cores, other engineers' jobs), so p99 is noisy; medians are stable across rounds.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
