"""Chaos: `meterline up` with events flowing while its broker is frozen (SIGSTOP) or restarted.

A broker of its own (so freezing it disturbs no other test), the real SDK (which spools what
the broker cannot take and replays it), the real pipeline, embedded chDB. The ground truth is
computed without meterline's pricing: explicit provider costs, and genai_prices.calc_price for
the LLM calls the catalog prices. The ledger must equal it per tenant to the last digit, every
event once, and no component may be reported stalled.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import defaultdict
from decimal import Decimal

import genai_prices
import httpx
import pytest

from meterline.broker import LocalBroker
from meterline.collectors.sdk import Meter
from meterline.schemas.events import UsageEvent, new_id, utcnow
from meterline.settings import Settings

from test_app_up import env_for, free_port, log_tail, meterline, start_up, wait_for

TENANTS = ("acme", "globex", "initech")
RATE = 200  # events per second while the fault is on


def event(rng: random.Random, i: int) -> tuple[UsageEvent, Decimal]:
    """A usage event and what it must cost, computed independently of meterline's catalog."""
    tenant, ts = TENANTS[i % len(TENANTS)], utcnow()
    common = dict(event_id=new_id(), ts=ts, tenant_id=tenant, team=f"team{i % 2}", session_id=f"s{i % 7}")
    if i % 3 == 0:  # a provider-reported cost overrides any catalog
        cost = Decimal(rng.randint(1, 10**9)).scaleb(-12)
        return UsageEvent(**common, kind="tool_call", tool="web_search", cost_usd=cost), cost
    inp, out = rng.randint(1, 50) * 1000, rng.randint(0, 20) * 1000
    truth = genai_prices.calc_price(genai_prices.Usage(input_tokens=inp, output_tokens=out), "gpt-4o",
                                    provider_id="openai", genai_request_timestamp=ts).total_price
    return UsageEvent(**common, kind="llm_call", provider="openai", model="gpt-4o", input_tokens=inp, output_tokens=out), truth


class Fleet:
    """Agents sending through the SDK at a steady rate until stopped; keeps the ground truth."""

    def __init__(self, settings: Settings):
        self.meters = {t: Meter(settings, tenant_id=t, register_pid=False) for t in TENANTS}
        self.truth: dict[str, Decimal] = defaultdict(Decimal)
        self.sent, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(10)
        while not self.stop.is_set():
            for _ in range(RATE // 10):
                e, cost = event(rng, self.sent)
                self.meters[e.tenant_id].send(e)
                self.truth[e.tenant_id] += cost
                self.sent += 1
            time.sleep(0.1)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()
        for meter in self.meters.values():  # spooled events are replayed once the broker answers
            assert meter.flush(300)  # a loaded CI machine replays a big spool slowly
            meter.close()


def ledger_by_tenant(env: dict[str, str]) -> dict[str, Decimal]:
    rows = json.loads(meterline(env, "sql", "SELECT tenant_id, toString(sum(cost_usd)) AS usd, count() AS n, "
                                            "uniqExact(event_id) AS ids FROM priced_events GROUP BY tenant_id", "-f", "json"))
    assert all(r["n"] == r["ids"] for r in rows), rows  # every event once
    return {r["tenant_id"]: Decimal(r["usd"]) for r in rows}


def freeze(broker: LocalBroker, status) -> None:
    os.kill(status.pid, signal.SIGSTOP)
    time.sleep(20)
    os.kill(status.pid, signal.SIGCONT)


def restart(broker: LocalBroker, status) -> None:
    assert broker.stop()
    time.sleep(3)
    broker.start(timeout=120)


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.alone   # a broker fault under a loaded machine: two of five 4-process runs lost it (note of session 11)
@pytest.mark.parametrize("fault", [freeze, restart], ids=["broker SIGSTOP 20 s", "broker stop and restart"])
def test_the_ledger_equals_the_truth_after_a_broker_fault(own_broker, tmp_path, fault):
    broker, status, settings = own_broker
    port = free_port()
    env = {**env_for(settings, port), "METERLINE_STALL_AFTER_S": "45"}
    log_path = tmp_path / "up.log"
    proc = start_up(env, port, log=log_path)
    try:
        fleet = Fleet(settings)
        fleet.thread.start()
        time.sleep(5)
        fault(broker, status)
        time.sleep(5)
        fleet.finish()
        try:
            wait_for(lambda: ledger_by_tenant(env) == dict(fleet.truth), f"the ledger to equal the truth ({fleet.sent} events)",
                     timeout=240)
        except AssertionError:
            print(log_tail(log_path.read_text(), 6000))
            raise
        # all running again: one that a broker error made exit is restarted within its backoff (at most 30 s)
        health = wait_for(lambda: (r := httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)).status_code == 200 and r,
                          "every component running, none stalled")
        assert not [n for n, c in health.json()["components"].items() if c.get("stalls") or c.get("stalled")], health.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_tail(log_path.read_text())
