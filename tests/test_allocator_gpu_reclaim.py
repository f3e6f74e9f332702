"""GPU reclaim in production: the allocator service on the real broker hears who waits for GPUs (a guard's
`wait_for_gpus` announcement on the spend topic) and who holds them (GpuSample rows on the gpu topic), and
publishes the reclaim decisions agents obey. Before, `meterline allocator` built its engine with no
pending signal at all, so it never saw anyone waiting and never reclaimed."""
from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal

import pytest

from meterline.allocator.budgets import publish_policy
from meterline.allocator.engine import Engine, EngineConfig
from meterline.allocator.guard import BudgetExceeded, DecisionFeed, Guard
from meterline.allocator.service import run_in_thread
from meterline.schemas.events import BudgetPolicy, GpuSample, new_id, utcnow
from collectors_kafka import wait_for


pytestmark = pytest.mark.kafka


@pytest.fixture
def allocator(settings):
    # as `meterline allocator` and `meterline up` build it: no gpu_pending injected
    service, stop, thread = run_in_thread(settings, Engine(EngineConfig(gpu_reclaim_idle_for=timedelta(seconds=5))), tick=0.02)
    assert service.ready.wait(30)
    yield service
    stop.set()
    thread.join()


@pytest.fixture
def feed(settings):
    f = DecisionFeed(settings).start()
    assert f.wait_ready(30)
    yield f
    f.close()


def gpu_quotas(settings) -> None:
    """acme and beta: 2 GPU-hours each over an hour = a quota of 2 GPUs each, on a 4-GPU node."""
    now = utcnow()
    for tenant in ("acme", "beta"):
        publish_policy(settings, BudgetPolicy(policy_id=f"{tenant}-gpu", tenant_id=tenant, scope="tenant", scope_id=tenant,
                                              unit="gpu_hours", amount=Decimal(2), period="custom", period_anchor=now,
                                              period_seconds=3600))


def send_samples(settings, holders: list[tuple[str, int]], ages_s=(30, 1)) -> None:
    """4 GPUs on node n1; GPU i is held by acme's session holders[i] at the given utilisation."""
    from confluent_kafka import Producer

    producer = Producer(settings.kafka_config())
    for age in ages_s:
        ts = utcnow() - timedelta(seconds=age)
        for i, (session, util) in enumerate(holders):
            rows = [GpuSample(sample_id=new_id(), ts=ts, node="n1", level="gpu", gpu_index=i, gpu_uuid=f"GPU-{i}", interval_ms=1000),
                    GpuSample(sample_id=new_id(), ts=ts, node="n1", level="process", gpu_index=i, gpu_uuid=f"GPU-{i}",
                              interval_ms=1000, utilization_pct=util, tenant_id="acme", team="ml", project="p",
                              agent_id="trainer", session_id=session, attributed=True)]
            for row in rows:
                producer.produce(settings.topic("gpu"), key=row.key.encode(), value=row.to_json())
    assert producer.flush(60) == 0  # returns once delivered; what is left undelivered would read as a missing sample


def action(feed, key: str) -> str | None:
    d = feed.decisions.get(key)
    return d.action if d is not None else None


def test_a_guards_gpu_wait_makes_the_service_reclaim_borrowed_gpus(settings, allocator, feed):
    gpu_quotas(settings)
    send_samples(settings, [("s1", 90), ("s2", 90), ("s3", 90), ("s4", 90)])
    wait_for(lambda: action(feed, "tenant:acme:batch") == "allow", "acme borrows beta's idle quota")
    waiter = Guard(feed, "beta", "ml", "p", "trainer", "job-7", priority="batch")
    waiter.wait_for_gpus(2)
    d = wait_for(lambda: (x := feed.decisions.get("tenant:acme:batch")) and x.action == "preempt" and x, "reclaim")
    assert d.decision.limits.max_concurrent == 2, "back to its quota, never below"
    assert allocator.counts["gpu_waits"] >= 1
    assert not [k for k in feed.decisions if k.startswith("session:acme")], "busy holders are not preempted one by one"
    waiter.wait_for_gpus(0)   # placed or gave up: nobody waits, the borrowing may go on
    wait_for(lambda: action(feed, "tenant:acme:batch") == "allow", "the preempt lifted")


def test_an_idle_holder_is_released_to_a_waiting_tenant_through_the_broker(settings, allocator, feed):
    gpu_quotas(settings)
    send_samples(settings, [("notebook", 0), ("notebook", 0), ("busy", 90), ("busy", 90)])
    idle_key, busy_key = "session:acme/ml/p/trainer/notebook:*", "session:acme/ml/p/trainer/busy:*"
    wait_for(lambda: allocator.counts["gpu"] >= 16, "the allocator read the 16 samples")  # else the next check proves nothing
    time.sleep(0.5)  # ~25 of its ticks, for a wrong preempt to show up
    assert action(feed, idle_key) is None, "idle but nobody waits: it keeps its GPUs"
    Guard(feed, "beta", "ml", "p", "trainer", "job-8", priority="normal").wait_for_gpus(2)
    wait_for(lambda: action(feed, idle_key) == "preempt", "the idle holder is told to release its GPUs")
    assert "idle GPU reclaim" in feed.decisions[idle_key].decision.reason
    assert action(feed, busy_key) is None, "busy work inside its quota is never preempted"
    holder = Guard(feed, "acme", "ml", "p", "trainer", "notebook")
    with pytest.raises(BudgetExceeded, match="preempt: idle GPU reclaim"):
        holder.check(None)   # what the holder's own guard does at its next check
    assert Guard(feed, "acme", "ml", "p", "trainer", "busy").check(None) is None
