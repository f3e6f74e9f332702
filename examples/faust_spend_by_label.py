"""Spend per customer label: a Faust job on meterline's `priced` topic (a dimension meterline does not keep).

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 python examples/faust_spend_by_label.py --label customer

An agent tags its calls with a free-form attribute (`meter.record_llm(..., attributes={"customer": "acme"})`,
or a span attribute through OpenTelemetry); meterline carries `attributes` onto every priced record. This job
totals `cost_usd` per value of one attribute and publishes each new total to `<prefix>.spend-by-<label>.v1`
(key: the label's value, value: {"label", "value", "cost_usd", "events"} JSON, money as an exact string), so
the latest record per key is that value's spend since the job's group first read the topic.

The records are meterline's typed Faust records (meterline.streams.faust_records): cost_usd is a Decimal,
exact; the table holds integer pico-dollars, so no float ever touches the sum. A record that breaks the
contract goes to the dead-letter topic with its reason and the job carries on.
"""
from __future__ import annotations

import argparse
import json
from decimal import Decimal
from pathlib import Path

import faust

from meterline.settings import Settings
from meterline.streams.alerts import credentials
from meterline.streams.faust_records import Priced, contract_topic

PICO = 10**12
NONE = "(none)"  # calls without the label


def make_app(settings: Settings, label: str = "customer", group: str | None = None) -> faust.App:
    datadir = settings.data_dir / f"spend-by-{label}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(group or settings.group(f"spend-by-{label}"), broker=[f"kafka://{h}" for h in settings.bootstrap.split(",")],
                    broker_credentials=credentials(settings), store="memory://", web_enabled=False,
                    consumer_auto_offset_reset="earliest", datadir=str(datadir), topic_partitions=1)
    priced = contract_topic(app, settings, "priced")
    out = app.topic(f"{settings.topic_prefix}.spend-by-{label}.v1", key_type=str, value_type=bytes, value_serializer="raw")
    # Faust keeps the table in memory and in its changelog topic, so a restart resumes the totals.
    pico = app.Table(f"spend-by-{label}-pico", default=int, partitions=1)
    events = app.Table(f"spend-by-{label}-events", default=int, partitions=1)

    @app.agent(priced)
    async def total(stream: faust.StreamT[Priced]) -> None:
        async for record in stream:
            value = record.attributes.get(label, NONE)
            pico[value] += int(record.cost_usd * PICO)  # exact: the contract allows at most 12 places
            events[value] += 1
            cost = Decimal(pico[value]) / PICO
            await out.send(key=value, value=json.dumps({"label": label, "value": value, "cost_usd": f"{cost:.12f}",
                                                        "events": events[value]}).encode())

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Kafka and the topic prefix come from METERLINE_* settings, as for meterline itself.")
    parser.add_argument("--label", default="customer", help="the attribute to total by (default: customer)")
    parser.add_argument("--group", default=None, help="Faust app id / consumer group (default: <prefix>-spend-by-<label>)")
    args = parser.parse_args()
    app = make_app(Settings(), args.label, args.group)
    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
