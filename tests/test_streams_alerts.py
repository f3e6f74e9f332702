"""`meterline alerts` (a Faust agent) against the real broker and a local webhook."""
from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer

from meterline.schemas.events import Anomaly, DeadLetter, build, decode, new_id, utcnow
from meterline.settings import Settings
from meterline.streams.alerts import alert_text

from collectors_kafka import read_topic, topic_size

METERLINE = str(Path(sys.executable).with_name("meterline"))


class Webhook(http.server.ThreadingHTTPServer):
    """Answers 503 to the first `outage` requests, 400 to an anomaly whose message is 'refuse', else 204."""

    def __init__(self, outage: int) -> None:
        self.outage, self.attempts, self.delivered = outage, 0, []
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/hook"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        hook, body = self.server, json.loads(self.rfile.read(int(self.headers["content-length"])))
        hook.attempts += 1
        status = 503 if hook.attempts <= hook.outage else 400 if body["anomaly"]["message"] == "refuse" else 204
        if status == 204:
            hook.delivered.append(body)
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


def anomaly(severity: str, message: str = "spend far above its baseline") -> Anomaly:
    now = utcnow()
    return build(Anomaly, anomaly_id=new_id(), ts=now, kind="spend_spike", severity=severity, tenant_id="acme", scope="tenant",
                 scope_id="acme", window_start=now - timedelta(seconds=10), window_end=now, evidence={"observed_usd": "4.2"},
                 message=message)


def produce(settings: Settings, records: list[Anomaly]) -> None:
    producer = Producer(settings.kafka_config(**{"compression.type": "lz4"}))  # as the stream worker writes them
    for record in records:
        producer.produce(settings.topic("anomalies"), record.to_json(), b"acme")
    assert producer.flush(30) == 0


def start_alerts(settings: Settings, webhook: Webhook) -> subprocess.Popen:
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(settings.data_dir)}
    return subprocess.Popen([METERLINE, "alerts", "--webhook", webhook.url, "--min-severity", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc: subprocess.Popen) -> None:
    """Poll until `condition()`; fail with the job's output if it died first."""
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"meterline alerts exited ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_anomalies_reach_the_webhook_through_an_outage_and_a_refusal_is_dead_lettered(settings):
    webhook = Webhook(outage=3)
    warnings, info, refused = [anomaly("warning") for _ in range(3)], anomaly("info"), anomaly("critical", "refuse")
    produce(settings, [warnings[0], info, warnings[1], refused, warnings[2]])
    proc = start_alerts(settings, webhook)
    try:
        wait_for(lambda: len(webhook.delivered) == 3 and topic_size(settings, settings.topic("dlq")), proc)
    finally:
        stop(proc)
    assert [d["anomaly"]["anomaly_id"] for d in webhook.delivered] == [str(a.anomaly_id) for a in warnings]  # in order
    assert webhook.delivered[0]["text"] == alert_text(warnings[0]) and "observed_usd=4.2" in webhook.delivered[0]["text"]
    assert webhook.attempts == 3 + 3 + 1  # three 503s retried, three deliveries, one refusal; info was never sent
    [letter] = [decode(DeadLetter, m.value()) for m in read_topic(settings, settings.topic("dlq"), 1)]
    assert letter.stage == "alerts" and "400" in letter.reason
    assert letter.source_topic == settings.topic("anomalies") and letter.offset >= 0 and letter.partition >= 0
    assert base64.b64decode(letter.payload_b64) == refused.to_json()


def test_a_restarted_job_delivers_what_came_while_it_was_down_and_not_again_what_it_had(settings):
    webhook = Webhook(outage=0)
    first, second = anomaly("warning"), anomaly("critical")
    produce(settings, [first])
    proc = start_alerts(settings, webhook)
    try:
        wait_for(lambda: len(webhook.delivered) == 1, proc)
    finally:
        stop(proc)  # a graceful stop commits what the agent finished
    produce(settings, [second])
    proc = start_alerts(settings, webhook)
    try:
        wait_for(lambda: len(webhook.delivered) == 2, proc)
        time.sleep(2)  # room for a wrong redelivery of `first` to show up
    finally:
        stop(proc)
    assert [d["anomaly"]["anomaly_id"] for d in webhook.delivered] == [str(first.anomaly_id), str(second.anomaly_id)]



def test_the_job_uses_meterlines_kafka_security_settings():
    from meterline.settings import KafkaSecurity
    from meterline.streams.alerts import credentials

    assert credentials(Settings()) is None
    sasl = Settings(kafka_security=KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                                                 sasl_username="meter", sasl_password="s3cret"))
    got = credentials(sasl)
    assert (got.username, got.password, got.mechanism.value) == ("meter", "s3cret", "SCRAM-SHA-512")
    assert got.ssl_context is not None and got.protocol.value == "SASL_SSL"


def test_the_job_keeps_its_faust_state_under_the_data_dir_not_the_working_directory(tmp_path):
    from meterline.streams.alerts import make_app

    app = make_app(Settings(data_dir=tmp_path / "data"), "http://127.0.0.1:9/hook")
    assert str(app.conf.datadir).startswith(str(tmp_path / "data"))  # faust's default: <app id>-data in the cwd
