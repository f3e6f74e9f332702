"""`meterline alerts`: a Faust agent that delivers anomalies to a webhook, at least once.

Low rate, I/O-bound, one record at a time: the kind of stream Faust fits (the per-event hot
path does not, ARCHITECTURE.md → Streams). The agent reads the anomalies topic from its group's
committed offset and POSTs each anomaly at or above `min_severity` (Slack-compatible: a `text`
line, plus the record under `anomaly`). It moves on only after a 2xx, so Faust commits an offset
only for delivered (or dead-lettered) anomalies and a restart repeats rather than skips. A webhook
that is down is retried with exponential backoff; a 4xx (the request itself is wrong), or a
webhook still failing after `give_up_after` seconds, sends the anomaly to the dead-letter topic
with the reason, so one bad endpoint cannot stall alerting forever.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import faust
import httpx

from meterline.schemas import events as ev
from meterline.settings import Settings

log = logging.getLogger("meterline.alerts")
SEVERITIES = ("info", "warning", "critical")


class Undeliverable(Exception):
    """The webhook refused the anomaly, or stayed down past the deadline."""


def alert_text(anomaly: ev.Anomaly) -> str:
    evidence = ", ".join(f"{k}={v}" for k, v in sorted(anomaly.evidence.items()))
    return (f"[{anomaly.severity}] {anomaly.kind} on {anomaly.scope} {anomaly.scope_id} (tenant {anomaly.tenant_id}): "
            f"{anomaly.message}" + (f" ({evidence})" if evidence else ""))


async def post_until_delivered(client: httpx.AsyncClient, url: str, anomaly: ev.Anomaly, give_up_after: float,
                               first_backoff: float = 0.5, max_backoff: float = 30.0) -> int:
    """POST until a 2xx; raises Undeliverable on a 4xx or once `give_up_after` seconds have passed."""
    body = {"text": alert_text(anomaly), "anomaly": anomaly.model_dump(mode="json")}
    deadline, delay, attempts = time.monotonic() + give_up_after, first_backoff, 0
    while True:
        attempts += 1
        try:
            response = await client.post(url, json=body)
            if response.is_success:
                return attempts
            if response.is_client_error and response.status_code not in (408, 429):
                raise Undeliverable(f"webhook answered {response.status_code}: {response.text[:200]}")
            problem = f"webhook answered {response.status_code}"
        except httpx.HTTPError as err:
            problem = f"webhook unreachable ({type(err).__name__}: {err})"
        if time.monotonic() + delay > deadline:
            raise Undeliverable(f"{problem}; gave up after {attempts} attempts in {give_up_after:.0f} s")
        log.warning("%s; retry %d in %.1f s", problem, attempts, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_backoff)


def dead_letter(message: Any, reason: str, error_type: str) -> bytes:
    """The anomaly's record (a Faust message: topic, partition, offset, bytes) with why it was not delivered."""
    payload, reason = ev.dead_letter_payload(message.value, reason)  # always fits the dlq topic
    return ev.DeadLetter(dlq_id=uuid.uuid4(), ts=ev.utcnow(), stage="alerts", source_topic=message.topic,
                         partition=message.partition, offset=message.offset, reason=reason,
                         error_type=error_type, payload_b64=payload).to_json()


def credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """The same Kafka security as every other meterline client (settings.kafka_security), for aiokafka."""
    sec = settings.kafka_security
    context = None
    if sec.security_protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=sec.ssl_ca_location)
        if sec.ssl_certificate_location:
            context.load_cert_chain(sec.ssl_certificate_location, sec.ssl_key_location)
    if sec.security_protocol.startswith("SASL"):
        password = sec.sasl_password.get_secret_value() if sec.sasl_password else None
        return faust.SASLCredentials(username=sec.sasl_username, password=password, mechanism=sec.sasl_mechanism or "PLAIN",
                                     ssl_context=context)
    return faust.SSLCredentials(context) if context else None


def make_app(settings: Settings, webhook: str, min_severity: str = "warning", give_up_after: float = 900.0,
             group: str | None = None, **faust_options: Any) -> faust.App:
    """The Faust app; run it with `faust.Worker(app).execute_from_commandline()` (what `meterline alerts` does)."""
    datadir = Path(faust_options.pop("datadir", settings.data_dir / "alerts"))  # not the cwd (faust's default)
    datadir.mkdir(parents=True, exist_ok=True)  # faust makes only the last level
    app = faust.App(group or settings.group("alerts"), broker=[f"kafka://{h}" for h in settings.bootstrap.split(",")],
                    broker_credentials=credentials(settings), store="memory://", web_enabled=False,
                    consumer_auto_offset_reset="earliest",
                    datadir=str(datadir),
                    **faust_options)
    anomalies = app.topic(settings.topic("anomalies"), value_type=bytes, value_serializer="raw")
    dlq = app.topic(settings.topic("dlq"), value_type=bytes, value_serializer="raw")
    threshold = SEVERITIES.index(min_severity)

    @app.agent(anomalies)
    async def deliver(stream):
        async with httpx.AsyncClient(timeout=10.0) as client:
            async for event in stream.events():
                try:
                    anomaly = ev.decode(ev.Anomaly, event.value)
                    if SEVERITIES.index(anomaly.severity) >= threshold:
                        await post_until_delivered(client, webhook, anomaly, give_up_after)
                except (ev.InvalidEvent, Undeliverable) as err:
                    await dlq.send(value=dead_letter(event.message, str(err), type(err).__name__))
                    log.error("anomaly dead-lettered: %s", err)

    return app
