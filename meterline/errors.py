"""Common mistakes, said in one line: `meterline.cli.main` prints a UserError as `error: …` and exits 2.

Raise a UserError (or a subclass) where a setting or the environment is wrong and the message can say
what to do; anything else stays an ordinary exception with its traceback.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

    from .settings import Settings

EXIT_CODE = 2
KAFKA_PROBE_S = 5.0


def first_line(text: object, limit: int | None = 300) -> str:
    """The first line of a message or an exception's text (its type's name when empty), at most `limit` characters."""
    return (str(text).strip().splitlines() or [type(text).__name__ if isinstance(text, BaseException) else ""])[0][:limit]


class UserError(Exception):
    """A mistake in the settings or the environment; the message is one line that says what to do."""


class SettingsError(UserError):
    """A METERLINE_* variable or the METERLINE_CONFIG file is wrong."""


class CatalogError(UserError):
    """The price catalog (METERLINE_CATALOG, --catalog) cannot be read."""


class KafkaUnavailable(UserError):
    """No Kafka broker answers at the bootstrap address."""


class StoreUnavailable(UserError):
    """The ClickHouse ledger cannot be reached or created."""


def describe_settings_error(err: ValidationError, config_file: str | None = None) -> str:
    """One line for a pydantic ValidationError of Settings / KafkaSecurity: the variable (or the config
    file's key), the value, and pydantic's own words, which list the allowed values of a choice."""
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if err.title == "KafkaSecurity" or (loc and loc[0] == "kafka_security" and len(loc) > 1):
            key = loc[-1]
            var, dotted = f"METERLINE_KAFKA_{key.upper()}", f"kafka_security.{key}"
        else:
            var, dotted = f"METERLINE_{'__'.join(loc).upper()}", ".".join(loc)
        value = None
        if "input" in e and not isinstance(e["input"], dict):  # a DSN's password stays out of the message
            value = re.sub(r"(://)[^/@\s]*@", r"\1…@", repr(e["input"]))[:80]
        if config_file and not any(k.upper() == var for k in os.environ):
            where = f"{dotted} = {value} in {config_file}" if value else f"{dotted} in {config_file}"
        else:
            where = f"{var}={value}" if value else var
        message = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message[:1].lower()}{message[1:]}")
    return "invalid setting " + "; ".join(parts)


def writable_dir(path: Path, setting: str) -> Path:
    """Create `path` if needed and check it can be written; a UserError that names `setting` if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreUnavailable(f"cannot create {path}: {err.strerror or err}; point {setting} at a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreUnavailable(f"cannot write to {path}; point {setting} at a writable directory")
    return path


def require_kafka(settings: Settings, timeout: float = KAFKA_PROBE_S) -> int:
    """A metadata request with a short timeout, before anything that needs Kafka starts. Returns the
    number of topics; raises KafkaUnavailable with librdkafka's first complaint when nothing answers."""
    import logging

    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from .kafkalog import reason

    heard: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            heard.append(record.getMessage())

    probe_log = logging.Logger("meterline.kafka.probe", logging.WARNING)  # not registered: nothing propagates
    probe_log.addHandler(Keep())
    admin = AdminClient(settings.kafka_config(**{"logger": probe_log,
                                                 "socket.connection.setup.timeout.ms": int(timeout * 1000)}))
    try:
        return len(admin.list_topics(timeout=timeout).topics)
    except KafkaException as err:
        admin.poll(0)  # hands over what librdkafka logged meanwhile
        why = reason(heard[0]) if heard else _kafka_text(err)
        if re.search(r"authenticat|SASL|SSL handshake", why, re.I):  # it answers, but not to these credentials
            raise KafkaUnavailable(f"Kafka at {settings.bootstrap} refused the credentials: {why}; check "
                                   "METERLINE_KAFKA_SASL_USERNAME and METERLINE_KAFKA_SASL_PASSWORD (`meterline kafka start --secure "
                                   "--env <user>` prints them)") from None
        raise KafkaUnavailable(f"Kafka does not answer at {settings.bootstrap}: {why}; start it with "
                               "`meterline kafka start` or fix METERLINE_KAFKA_BOOTSTRAP") from None


def _kafka_text(err: Any) -> str:
    first = err.args[0] if err.args else err
    return first.str() if hasattr(first, "str") else str(first)
