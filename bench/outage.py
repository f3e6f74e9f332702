"""Outage drill: `meterline up` under steady load while its broker is frozen, then watch the ledger.

    .venv/bin/python -m bench.outage [--freeze 40] [--rate 1000]

Starts a broker of its own (ports 29092/29093, data in a temporary folder), `meterline up`, and a
producer of `rate` usage events/s; after 15 s the broker gets SIGSTOP for `--freeze` seconds, then
SIGCONT; 15 s later the producer stops. It then prints, every 5 s, the ledger's row count and
/health until the ledger holds every event (exit 0) or 2 minutes pass without it (exit 1).
This is the run that showed issue 10's freeze (40 s: the ledger stayed at the count of the moment
of the outage while /health said ok); CI runs the bounded version in tests/test_chaos.py.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from confluent_kafka import Producer

from meterline.broker import LocalBroker
from meterline.schemas.events import new_id
from meterline.settings import Settings
from meterline.topics import create_topics

CLI = [sys.executable, "-c", "from meterline.cli import main; main()"]


def produce(settings: Settings, rate: int, stop: threading.Event, sent: list[int]) -> None:
    producer = Producer(settings.kafka_config(**{"enable.idempotence": True, "linger.ms": 5}))
    while not stop.is_set():
        for i in range(rate // 10):
            tenant = f"t{i % 10}"
            record = {"event_id": new_id(), "ts": datetime.now(timezone.utc).isoformat(), "tenant_id": tenant,
                      "kind": "tool_call", "tool": "web_search", "cost_usd": "0.001"}
            producer.produce(settings.topic("usage"), json.dumps(record).encode(), tenant.encode())
            sent[0] += 1
        producer.poll(0)
        time.sleep(0.1)
    producer.flush(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--freeze", type=float, default=40.0, help="seconds the broker stays SIGSTOPped")
    parser.add_argument("--rate", type=int, default=1000, help="usage events per second")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="meterline-outage-"))
    broker = LocalBroker(Settings(data_dir=root / "broker", kafka_bootstrap=None, kafka_port=29092, kafka_controller_port=29093))
    status = broker.start(timeout=120)
    settings = Settings(data_dir=root / "data", kafka_bootstrap=status.bootstrap, topic_prefix="outage",
                        clickhouse_dsn=f"chdb://{root / 'clickhouse'}")
    create_topics(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(METERLINE_KAFKA_BOOTSTRAP=settings.bootstrap, METERLINE_TOPIC_PREFIX=settings.topic_prefix,
               METERLINE_DATA_DIR=str(settings.data_dir), METERLINE_CLICKHOUSE_DSN=settings.dsn, METERLINE_API_PORT="18787")
    api = "http://127.0.0.1:18787"
    with open(root / "up.log", "ab") as log:
        up = subprocess.Popen([*CLI, "up"], env=env, stdout=log, stderr=log)
    try:
        while not _get(api + "/health").startswith("200"):
            time.sleep(0.5)
        stop, sent = threading.Event(), [0]
        producer = threading.Thread(target=produce, args=(settings, args.rate, stop, sent))
        producer.start()
        time.sleep(15)
        print(f"SIGSTOP the broker for {args.freeze:.0f} s; ledger {_rows(api)} of {sent[0]}", flush=True)
        os.kill(status.pid, signal.SIGSTOP)
        time.sleep(args.freeze)
        os.kill(status.pid, signal.SIGCONT)
        time.sleep(15)
        stop.set()
        producer.join()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows = _rows(api)
            print(f"ledger {rows} of {sent[0]}; /health {_get(api + '/health')[:160]}", flush=True)
            if rows == sent[0]:
                return
            time.sleep(5)
        raise SystemExit(f"the ledger did not catch up; logs in {root}")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(120)
        broker.stop()


def _get(url: str) -> str:
    try:
        reply = httpx.get(url, timeout=5)
        return f"{reply.status_code} {reply.text}"
    except httpx.HTTPError as err:
        return f"unreachable ({err})"


def _rows(api: str) -> int | None:
    try:
        return httpx.post(api + "/api/sql", json={"sql": "SELECT count() FROM priced_events"}, timeout=10).json()["rows"][0][0]
    except (httpx.HTTPError, KeyError, ValueError):
        return None


if __name__ == "__main__":
    main()
