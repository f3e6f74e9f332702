"""bench/sizing.py's projection: pure arithmetic on per-core figures, checked against its own promises."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

# bench/ is scripts, not an installed package: load the module from its file (stdlib imports only at the top)
_spec = importlib.util.spec_from_file_location("bench_sizing", Path(__file__).parents[1] / "bench" / "sizing.py")
sizing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sizing)
HEADROOM, MAX_BATCH_ROWS, PARTITION_STEPS, plan = sizing.HEADROOM, sizing.MAX_BATCH_ROWS, sizing.PARTITION_STEPS, sizing.plan


@pytest.mark.parametrize("rate", [10_000, 100_000, 1_000_000])
@pytest.mark.parametrize("worker_us,sink_us,broker_us", [(17.5, 13.4, 2.8), (54.8, 63.4, 26.6)])
def test_a_plan_gives_each_process_no_more_than_its_planned_share_of_a_core(rate, worker_us, sink_us, broker_us):
    core = {"worker_events_per_core": 1e6 / worker_us, "sink_rows_per_core": 1e6 / sink_us,
            "broker_us_per_event": broker_us, "shard_rows_per_s": 165_000}
    p = plan(rate, core)
    assert rate * worker_us * 1e-6 / p["stream_workers"] <= HEADROOM       # each worker's cores ≤ the headroom
    assert rate * worker_us * 1e-6 / (p["stream_workers"] - 1 or math.inf) > HEADROOM or p["stream_workers"] == 1
    assert rate * sink_us * 1e-6 / p["sinks"] <= HEADROOM
    assert p["partitions"] in PARTITION_STEPS and p["partitions"] >= min(2 * max(p["stream_workers"], p["sinks"]), PARTITION_STEPS[-1])
    assert p["brokers"] >= 3 and p["brokers"] * 8 >= p["broker_cores"]     # replication 3 needs three
    assert rate / p["shards"] <= 165_000 * HEADROOM
    assert p["batch_rows"] <= MAX_BATCH_ROWS and rate / p["sinks"] * p["batch_seconds"] <= p["batch_rows"]  # a batch fits
    assert p["inserts_per_shard_per_table"] == pytest.approx(p["sinks"] / p["batch_seconds"])
