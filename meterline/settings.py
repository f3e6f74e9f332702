"""Settings from METERLINE_* environment variables or a TOML/env config file.

Precedence (highest first): constructor arguments, environment, the file named by
METERLINE_CONFIG (TOML), a `.env` file in the working directory, defaults.
"""
from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as SourceError

from .errors import SettingsError, describe_settings_error
from .kafkalog import KAFKA_LOG

DSN_SCHEMES = ("chdb", "http", "https")


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "meterline"


class KafkaSecurity(BaseSettings):
    """librdkafka security settings; every Kafka client in meterline takes these."""

    # METERLINE_KAFKA_SECURITY_PROTOCOL, ..._SASL_PASSWORD: from the environment or .env, as Settings reads them
    model_config = SettingsConfigDict(env_prefix="METERLINE_KAFKA_", env_file=".env", extra="ignore")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="METERLINE_", env_file=".env", extra="ignore", env_nested_delimiter="__"
    )

    data_dir: Path = Field(default_factory=_default_data_dir, description="Where the broker, the embedded store and spools live.")
    kafka_bootstrap: str | None = Field(None, description="An existing cluster; when unset meterline starts its own broker on 127.0.0.1.")
    kafka_port: int = Field(9092, description="Port of the broker that `meterline kafka start` runs.")
    kafka_controller_port: int = 9093
    kafka_secure: bool = Field(False, description="`kafka start` runs its broker with SASL/SCRAM and ACLs (meterline/kafka_acl.py).")
    kafka_home: Path | None = Field(default_factory=lambda: Path(os.environ["KAFKA_HOME"]) if os.environ.get("KAFKA_HOME") else None)
    kafka_security: KafkaSecurity = Field(default_factory=KafkaSecurity)
    topic_prefix: str = Field("meterline", description="Topics are named <prefix>.<name>.v1.")
    clickhouse_dsn: str | None = Field(None, description="chdb:///path (default: <data_dir>/clickhouse) or http(s)://user:pass@host:8123/db.")
    clickhouse_cluster: str | None = Field(None, description="When set, DDL runs ON CLUSTER with Replicated tables.")
    api_port: int = Field(8787, ge=0, le=65535)
    api_tokens_file: Path | None = Field(None, description="The API's tokens (default <data_dir>/tokens.json; `meterline token create`).")
    gpu_idle_policy: Literal["owner", "proportional", "separate"] = Field(
        "proportional", description="Who is charged GPU time no process used: the device's holder (`meterline gpu assign`), "
                                    "its users that hour by share, or a separate `idle` line (app/gpu_idle.py).")
    catalog: Path | None = Field(None, description="The price catalog TOML every component prices with (negotiated rates: a copy "
                                 "of streams/catalog.toml, edited); default: that shipped one.")
    priced_format: Literal["v1", "v2"] = Field(
        "v2", description="Wire format the stream worker writes to `priced`: v2 (binary, schemas/events.py) or v1 (JSON) "
                          "for consumers not yet upgraded; the sink and streams.codec.decode_priced read both.")
    stall_after_s: float = Field(60.0, gt=0, description="`up` restarts a consumer with lag that made no progress this long.")
    # Limits of user SQL (`meterline sql`, /api/sql): the query cannot raise them (sql/sandbox.py).
    sql_max_seconds: int = Field(30, gt=0)
    sql_max_memory_bytes: int = Field(2 * 1024**3, gt=0)
    sql_max_result_rows: int = Field(1_000_000, gt=0)
    sql_max_result_bytes: int = Field(256 * 1024**2, gt=0)
    sql_max_rows_to_read: int = Field(2_000_000_000, gt=0)
    # The stream worker's local state store (streams/state_store.py): idle spend scopes on disk, rebuilt from spend-state.
    streams_state_dir: Path | None = Field(None, description="Where each stream worker keeps its idle spend scopes "
                                           "(SQLite, rebuilt from the spend-state changelog at start; default <data_dir>/streams-state).")
    streams_state_cache_mib: int = Field(16, gt=0, description="SQLite page cache of that store, per worker (bounded memory).")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("METERLINE_CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise SettingsError(f"METERLINE_CONFIG names {config_file}, which is not a file; fix the path or unset it")
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            except tomllib.TOMLDecodeError as err:
                raise SettingsError(f"{config_file} (METERLINE_CONFIG) is not valid TOML: {err}") from None
        return (*sources, dotenv_settings)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # chdb://reldir/clickhouse would name database "clickhouse" in store "reldir"; ~ is the shell's
        return path.expanduser().absolute()

    @field_validator("catalog")
    @classmethod
    def _catalog_file(cls, path: Path | None) -> Path | None:
        # checked here, so a typo stops every component at start with the variable's name, not the first priced event
        if path is not None and not path.expanduser().is_file():
            raise ValueError(f"{path} is not a file (a price catalog TOML, like streams/catalog.toml)")
        return path.expanduser().absolute() if path else None

    @field_validator("clickhouse_dsn")
    @classmethod
    def _known_scheme(cls, dsn: str | None) -> str | None:
        # clickhouse-connect reads any other scheme (a typo such as chdv://) as http://localhost:8123
        if dsn and dsn.partition("://")[0].lower() not in DSN_SCHEMES:
            raise ValueError("must start with chdb:// (embedded, e.g. chdb:///var/lib/meterline/ch), http:// or https://")
        return dsn

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{self.data_dir / 'clickhouse'}"

    def topic(self, name: str) -> str:
        """Full topic name for a catalog name such as 'usage'."""
        return f"{self.topic_prefix}.{name}.v1"

    def group(self, role: str) -> str:
        """The consumer group of a role ('streams', 'sink', 'allocator') in this deployment: `meterline up`
        and the standalone commands agree, so switching between them resumes instead of starting over."""
        return f"{self.topic_prefix}-{role}"

    def kafka_config(self, **extra: Any) -> dict[str, Any]:
        """Base librdkafka config (bootstrap + security + KAFKA_LOG as its logger) for any confluent-kafka client."""
        sec = self.kafka_security
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "security.protocol": sec.security_protocol,
                                "logger": KAFKA_LOG}  # librdkafka's log through logging, repeats collapsed
        optional = {
            "sasl.mechanism": sec.sasl_mechanism,
            "sasl.username": sec.sasl_username,
            "sasl.password": sec.sasl_password.get_secret_value() if sec.sasl_password else None,
            "ssl.ca.location": sec.ssl_ca_location,
            "ssl.certificate.location": sec.ssl_certificate_location,
            "ssl.key.location": sec.ssl_key_location,
        }
        conf.update({k: str(v) for k, v in optional.items() if v is not None})
        conf.update(extra)
        return conf


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; a wrong value is a SettingsError with one line naming the variable."""
    try:
        return Settings()
    except ValidationError as err:
        raise SettingsError(describe_settings_error(err, os.environ.get("METERLINE_CONFIG"))) from None
    except SourceError as err:  # e.g. a nested setting whose environment value is not JSON
        raise SettingsError(f"invalid setting: {err}") from None
