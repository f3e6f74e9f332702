"""Allocator benchmark: decision latency under load, and the guard's check cost.

    .venv/bin/python -m bench.allocator [--trials 60] [--load 5000] [--seconds-warmup 3]

1. Decision latency: the allocator runs in its own process; a second process produces a
   background load of spend updates (several thousand per second, tenants without budgets).
   For each trial a spend update that crosses a hard budget's line is produced; the time
   until this process's DecisionFeed holds the resulting `deny` is measured (p50, p99).
2. Guard check cost per call (median of batches): the allow fast path and a check that
   debits a spend lease, against a baseline of one dict lookup, in the same run.

Results go to bench/results/allocator.md. Needs a Kafka broker (METERLINE_KAFKA_BOOTSTRAP,
default 127.0.0.1:9092); uses fresh topics under a random prefix.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "allocator.md"


def _settings(bootstrap: str, prefix: str):
    from meterline.settings import Settings

    return Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)


def run_allocator(bootstrap: str, prefix: str, stop) -> None:
    from meterline.allocator.service import AllocatorService

    AllocatorService(_settings(bootstrap, prefix), tick=0.02).run(stop)


def run_load(bootstrap: str, prefix: str, rate: int, stop, sent) -> None:
    """Spend updates for 100 budget-less tenants x 20 sessions at `rate` per second."""
    from confluent_kafka import Producer

    from meterline.allocator.simulate import spend_update
    from meterline.schemas.events import utcnow

    settings = _settings(bootstrap, prefix)
    producer = Producer(settings.kafka_config(**{"linger.ms": 5, "queue.buffering.max.messages": 200000}))
    topic, tick, n = settings.topic("spend"), 0.05, 0
    counts: dict[str, int] = {}
    next_at = time.monotonic()
    while not stop.is_set():
        now = utcnow()
        for _ in range(int(rate * tick)):
            sid = f"bg{n % 100}/t/p/a/s{n % 2000}"
            counts[sid] = counts.get(sid, 0) + 1
            producer.produce(topic, key=sid.split("/")[0].encode(),
                             value=spend_update(sid, now - timedelta(seconds=1), now, Decimal("0.001"), counts[sid]).to_json())
            n += 1
        producer.poll(0)
        sent.value = n
        next_at += tick
        time.sleep(max(0.0, next_at - time.monotonic()))
    producer.flush(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def measure_latency(settings, feed, trials: int) -> list[float]:
    from confluent_kafka import Producer

    from meterline.allocator.budgets import publish_policy
    from meterline.allocator.simulate import spend_update
    from meterline.schemas.events import PRIORITIES, BudgetPolicy, utcnow

    for k in range(trials):
        publish_policy(settings, BudgetPolicy(policy_id=f"lat{k}", tenant_id=f"lat{k}", scope="tenant", scope_id=f"lat{k}",
                                              amount=Decimal(10), actions={p: "deny" for p in PRIORITIES}))
    keys = [f"tenant:lat{k}:normal" for k in range(trials)]
    _wait(lambda: all(k in feed.decisions for k in keys), "every budget's first decision reached the guard")
    producer = Producer(settings.kafka_config(**{"linger.ms": 0}))
    latencies = []
    for k, key in enumerate(keys):
        now = utcnow()
        update = spend_update(f"lat{k}", now - timedelta(seconds=1), now, Decimal("10.5"), 1).to_json()
        start = time.time()
        producer.produce(settings.topic("spend"), key=f"lat{k}".encode(), value=update)
        producer.poll(0)
        _wait(lambda: feed.decisions[key].action == "deny", f"deny for {key}")
        latencies.append(feed.received[key] - start)
    return latencies


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark stalled waiting for: {what}")
        time.sleep(0.0005)


def per_call(fn, calls: int = 10_000, batches: int = 21) -> float:
    """Median over batches of the mean cost per call, in seconds."""
    samples = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def measure_check_cost(settings, feed) -> dict[str, float]:
    from confluent_kafka import Producer

    from meterline.allocator.guard import Guard
    from meterline.schemas.events import ThrottleDecision, new_id, utcnow

    now = utcnow()
    producer = Producer(settings.kafka_config())
    lease = ThrottleDecision(decision_id=new_id(), tenant_id="bench", scope="session", scope_id="bench/t/p/a/leased",
                             action="allow", reason="bench", issued_at=now, expires_at=now + timedelta(hours=1),
                             spend_limit_usd=Decimal(10**6), spent_usd=Decimal(0))
    producer.produce(settings.topic("control"), key=lease.key.encode(), value=lease.to_json())
    producer.flush(10)
    _wait(lambda: lease.key in feed.decisions, "the lease reached the guard")
    plain = Guard(feed, "bench", "t", "p", "a", "s")       # no budget: every decision allows
    leased = Guard(feed, "bench", "t", "p", "a", "leased")
    table = {f"k{i}": i for i in range(1000)}
    return {
        "baseline: dict lookup": per_call(lambda: table.get("k500")),
        "guard.check, allow (fast path)": per_call(lambda: plain.check("gpt-4o")),
        "guard.check + record, with a spend lease": per_call(lambda: (leased.check("gpt-4o", cost_nanos=1000),
                                                                     leased.record(cost_nanos=1000, reserved_nanos=1000))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--load", type=int, default=5000, help="background spend updates per second")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    args = parser.parse_args()

    from meterline.allocator.guard import DecisionFeed
    from meterline.topics import create_topics

    bootstrap = os.environ.get("METERLINE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    settings = _settings(bootstrap, prefix)
    create_topics(settings)
    ctx = mp.get_context("spawn")
    stop, sent = ctx.Event(), ctx.Value("q", 0)
    allocator = ctx.Process(target=run_allocator, args=(bootstrap, prefix, stop), daemon=True)
    load = ctx.Process(target=run_load, args=(bootstrap, prefix, args.load, stop, sent), daemon=True)
    allocator.start()
    load.start()
    feed = DecisionFeed(settings, tenants={f"lat{k}" for k in range(args.trials)} | {"bench"}).start()
    feed.wait_ready(30)
    time.sleep(args.warmup)  # let the background load reach its rate before measuring
    sent_before, t0 = sent.value, time.monotonic()
    latencies = measure_latency(settings, feed, args.trials)
    achieved = (sent.value - sent_before) / (time.monotonic() - t0)
    costs = measure_check_cost(settings, feed)
    stop.set()
    for p in (load, allocator):
        p.join(30)
    feed.close()
    report(args, latencies, achieved, costs)


def report(args, latencies: list[float], achieved: float, costs: dict[str, float]) -> None:
    ms = [x * 1000 for x in latencies]
    base = costs["baseline: dict lookup"]
    lines = [
        "## Allocator: decision latency and guard check cost",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; Kafka at "
        f"{os.environ.get('METERLINE_KAFKA_BOOTSTRAP', '127.0.0.1:9092')} (single broker).",
        f"Command: `.venv/bin/python -m bench.allocator --trials {args.trials} --load {args.load}`",
        "",
        f"Decision latency, spend update crossing a hard budget → the guard's feed holds the `deny` "
        f"({len(ms)} trials, background load {achieved:,.0f} spend updates/s into the allocator):",
        "",
        "| p50 | p90 | p99 | max | target p99 |",
        "|---|---|---|---|---|",
        f"| {percentile(ms, 50):.1f} ms | {percentile(ms, 90):.1f} ms | {percentile(ms, 99):.1f} ms | {max(ms):.1f} ms | ≤ 500 ms |",
        "",
        "Guard check cost per call (median of 21 batches of 10,000 calls, same process, feed thread running):",
        "",
        "| operation | per call | × baseline |",
        "|---|---|---|",
        *[f"| {name} | {cost * 1e6:.2f} µs | {cost / base:.1f}× |" for name, cost in costs.items()],
        "",
    ]
    text = "\n".join(lines)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
