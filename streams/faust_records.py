"""Faust as an extension point: typed records and codecs for meterline's topics in a user's own Faust app.

    from meterline.streams.faust_records import Priced, contract_topic

    priced = contract_topic(app, settings, "priced")           # typed, header-aware, bad records dead-lettered
    priced = app.topic("meterline.priced.v1", value_type=Priced)  # or plain Faust: the codec meterline.priced
    priced = app.topic("meterline.priced.v1", value_serializer="meterline.priced")  # the same records

The records (Usage, Priced, Spend, Anomaly) are generated from the pydantic contracts (streams/faust_gen.py ->
streams/faust_models.py). Every record in or out goes through the contract: decoding validates with pydantic
(money arrives as Decimal, exact, never float), encoding validates the Record's fields and writes the contract's
JSON, so what a Faust job produces on these topics is what meterline's own stages write. Importing this module
registers the codecs meterline.usage, meterline.priced, meterline.spend and meterline.anomalies.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, Mapping

import faust
from faust.exceptions import ValueDecodeError
from faust.serializers import codecs

from meterline.schemas import events as ev
from meterline.settings import Settings

from .codec import decode_priced
from .faust_gen import RECORDS
from .faust_models import Anomaly, Priced, Spend, Usage

__all__ = ["Usage", "Priced", "Spend", "Anomaly", "ContractCodec", "ContractSchema", "ContractTopic", "contract_topic",
           "priced_fields", "record_of"]
log = logging.getLogger("meterline.faust")
HeadersArg = Mapping[str, bytes] | list[tuple[str, bytes]] | None
CLASSES: dict[str, type[faust.Record]] = {"Usage": Usage, "Priced": Priced, "Spend": Spend, "Anomaly": Anomaly}
BY_TOPIC = {topic: (contract, CLASSES[name]) for name, (contract, topic) in RECORDS.items()}


def priced_fields(value: bytes, headers: HeadersArg = None) -> dict[str, Any]:
    """The one bytes -> fields step for `priced` records: v1 JSON or the compact v2 (the worker's default), both
    checked by the contract (`codec.decode_priced`). Every Faust consumer of `priced` (codec, schema, topic below)
    comes through here."""
    return decode_priced(value, headers).model_dump()


def _contract_fields(contract: type[ev.Contract], value: bytes, headers: HeadersArg = None) -> dict[str, Any]:
    if contract is ev.PricedEvent:
        return priced_fields(value, headers)
    return ev.decode(contract, value).model_dump()  # python mode: Decimal, datetime, UUID kept


def record_of(topic: str, value: bytes, headers: HeadersArg = None) -> faust.Record:
    """A typed Record from one record's bytes; InvalidEvent (naming the field) when it breaks the contract."""
    contract, record = BY_TOPIC[topic]
    return record(**_contract_fields(contract, value, headers))


def encode(topic: str, obj: Any) -> bytes:
    """The contract's JSON for a Record (or a dict of its fields); InvalidEvent when a field is wrong."""
    contract, _ = BY_TOPIC[topic]
    fields = obj.asdict() if isinstance(obj, faust.Record) else dict(obj)
    fields = {k: v for k, v in fields.items() if not k.startswith("__")}  # Faust's own metadata, if any
    return ev.build(contract, **fields).to_json()


class ContractCodec(codecs.Codec):
    """Faust codec for one topic's contract: loads returns its Record (Faust passes a Record through a
    value_type's from_data unchanged, and keeps it when no value_type is given), dumps writes the contract's JSON.
    Faust hands a codec the value only, not the headers: contract_topic's schema passes them."""

    def __init__(self, topic: str = "priced", **kwargs: Any) -> None:
        super().__init__(topic=topic, **kwargs)
        self.topic = topic

    def _loads(self, s: bytes) -> Any:
        return record_of(self.topic, s)

    def _dumps(self, obj: Any) -> bytes:
        return encode(self.topic, obj)


class ContractSchema(faust.Schema):
    """A Faust schema that decodes with the record's headers too (a versioned wire format may name itself there)."""

    def __init__(self, topic: str, **kwargs: Any) -> None:
        self.contract_topic = topic
        super().__init__(value_type=BY_TOPIC[topic][1], value_serializer=f"meterline.{topic}", **kwargs)

    def loads_value(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        try:
            return record_of(self.contract_topic, message.value, message.headers)
        except Exception as exc:  # Faust's conductor routes a ValueDecodeError to the topic's handler
            raise ValueDecodeError(str(exc)) from exc


class ContractTopic(faust.Topic):
    """A topic whose undecodable records go to the dead-letter topic with the reason (Faust's default re-raises
    into the agent, which stops it): one bad producer cannot stop a user's job."""

    def __init__(self, *args: Any, dead_letters: faust.TopicT | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dead_letters = dead_letters

    def _clone_args(self) -> dict[str, Any]:  # Faust clones a topic for each agent's iterator
        return {**super()._clone_args(), "dead_letters": self.dead_letters}

    async def on_value_decode_error(self, exc: Exception, message: Any) -> None:
        reason = str(exc.__cause__ or exc)
        log.error("%s[%d]@%d dead-lettered: %s", message.topic, message.partition, message.offset, reason)
        if self.dead_letters is None:
            return
        payload, reason = ev.dead_letter_payload(message.value, reason)
        record = ev.DeadLetter(dlq_id=uuid.uuid4(), ts=ev.utcnow(), stage="faust", source_topic=message.topic,
                               partition=message.partition, offset=message.offset, reason=reason,
                               error_type=type(exc.__cause__ or exc).__name__, payload_b64=payload)
        await self.dead_letters.send(value=record.to_json())


def contract_topic(app: faust.App, settings: Settings, name: str, dead_letter: bool = True) -> ContractTopic:
    """meterline's topic `name` (usage, priced, spend, anomalies) as typed Records, under the settings' prefix;
    records that break the contract go to the dlq topic (dead_letter=False: logged and skipped)."""
    if name not in BY_TOPIC:
        raise ValueError(f"no Faust record for topic {name!r}: one of {', '.join(BY_TOPIC)}")
    dlq = app.topic(settings.topic("dlq"), value_type=bytes, value_serializer="raw") if dead_letter else None
    return ContractTopic(app, topics=[settings.topic(name)], schema=ContractSchema(name), dead_letters=dlq)


for _topic in BY_TOPIC:
    codecs.register(f"meterline.{_topic}", ContractCodec(_topic))
