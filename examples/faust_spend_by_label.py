"""Spend per customer label: a Faust job on meterline's `priced` topic (a dimension meterline does not keep).

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 python examples/faust_spend_by_label.py --label customer

An agent tags its calls with a free-form attribute (`meter.record_llm(..., customer="acme")`: extra keywords are attributes,
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

import faust
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from meterline.settings import Settings
from meterline.streams.alerts import credentials
from meterline.streams.faust_records import ContractSchema, ContractTopic, Priced, contract_topic
from meterline.topics import _wait_for_leaders, catalog_by_name

PICO = 10**12
NONE = "(none)"  # calls without the label


def job_topics(settings: Settings, label: str, app_id: str) -> dict[str, str]:
    """The job's own topics: output, the by-label repartition of priced, the tables' changelogs."""
    base = f"{settings.topic_prefix}.spend-by-{label}"
    return {"out": f"{base}.v1", "by_label": f"{base}-repartition.v1",
            "pico": f"{app_id}-spend-by-{label}-pico-changelog", "events": f"{app_id}-spend-by-{label}-events-changelog"}


def declare(settings: Settings, names: list[str], partitions: int) -> None:
    """Create the job's topics before Faust starts: Faust creates them itself, but its clients' metadata does not
    see a topic made after they started (the first run would fail on PartitionsMismatch or a missing topic)."""
    admin = AdminClient(settings.kafka_config())
    existing = admin.list_topics(timeout=30).topics
    wanted = [NewTopic(n, partitions, 1) for n in names if n not in existing]
    for future in (admin.create_topics(wanted, operation_timeout=30) if wanted else {}).values():
        try:
            future.result(30)
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    _wait_for_leaders(admin, dict.fromkeys(names, partitions), 30)


def make_app(settings: Settings, label: str = "customer", group: str | None = None) -> faust.App:
    app_id = group or settings.group(f"spend-by-{label}")
    partitions = catalog_by_name()["priced"].partitions  # tables and repartition: co-partitioned with priced
    names = job_topics(settings, label, app_id)
    declare(settings, list(names.values()), partitions)
    datadir = settings.data_dir / f"spend-by-{label}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(app_id, broker=[f"kafka://{h}" for h in settings.bootstrap.split(",")],
                    broker_credentials=credentials(settings), store="memory://", web_enabled=False,
                    consumer_auto_offset_reset="earliest", datadir=str(datadir), topic_partitions=partitions)
    priced = contract_topic(app, settings, "priced")
    # priced is keyed by tenant; tables keyed by label need their records keyed by label, so one agent
    # re-keys priced onto by_label (the same typed records) and the other totals it: run as many workers as
    # you like, each label is counted by exactly one of them.
    by_label = ContractTopic(app, topics=[names["by_label"]], schema=ContractSchema("priced"), key_type=str,
                             dead_letters=priced.dead_letters)
    out = app.topic(names["out"], key_type=str, value_type=bytes, value_serializer="raw")
    # Faust keeps the tables in memory and in their changelog topics, so a restart resumes the totals.
    pico = app.Table(f"spend-by-{label}-pico", default=int)
    events = app.Table(f"spend-by-{label}-events", default=int)

    @app.agent(priced)
    async def rekey(stream: faust.StreamT[Priced]) -> None:
        async for record in stream:
            await by_label.send(key=record.attributes.get(label, NONE), value=record)

    @app.agent(by_label)
    async def total(stream: faust.StreamT[Priced]) -> None:
        async for value, record in stream.items():
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
