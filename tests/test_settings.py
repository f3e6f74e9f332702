"""Settings: environment and TOML file, and security settings reaching every Kafka client config."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from meterline.errors import SettingsError
from meterline.settings import Settings, get_settings
from meterline.streams.pricing import DEFAULT_CATALOG


def test_environment_sets_bootstrap_prefix_and_security(monkeypatch):
    monkeypatch.setenv("METERLINE_KAFKA_BOOTSTRAP", "kafka-1:9094")
    monkeypatch.setenv("METERLINE_TOPIC_PREFIX", "prod")
    monkeypatch.setenv("METERLINE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("METERLINE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("METERLINE_KAFKA_SASL_USERNAME", "meter")
    monkeypatch.setenv("METERLINE_KAFKA_SASL_PASSWORD", "s3cret")
    s = Settings()
    assert s.topic("usage") == "prod.usage.v1"
    conf = s.kafka_config(**{"group.id": "g"})
    assert conf.pop("logger").name == "meterline.kafka"  # librdkafka's log through logging (meterline/kafkalog.py)
    assert conf == {"bootstrap.servers": "kafka-1:9094", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": "meter", "sasl.password": "s3cret", "group.id": "g"}
    assert "s3cret" not in repr(s)  # secrets never show up in logs


def test_config_file_is_read_and_environment_wins(tmp_path, monkeypatch):
    config = tmp_path / "meterline.toml"
    config.write_text('topic_prefix = "fromfile"\nclickhouse_dsn = "http://ch:8123/ledger"\n')
    monkeypatch.setenv("METERLINE_CONFIG", str(config))
    monkeypatch.delenv("METERLINE_TOPIC_PREFIX", raising=False)
    monkeypatch.delenv("METERLINE_CLICKHOUSE_DSN", raising=False)
    assert Settings().topic_prefix == "fromfile"
    assert Settings().dsn == "http://ch:8123/ledger"
    monkeypatch.setenv("METERLINE_TOPIC_PREFIX", "fromenv")
    assert Settings().topic_prefix == "fromenv"


def test_default_store_is_embedded_under_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("METERLINE_CLICKHOUSE_DSN", raising=False)
    monkeypatch.delenv("METERLINE_CONFIG", raising=False)
    assert Settings(data_dir=tmp_path).dsn == f"chdb://{tmp_path / 'clickhouse'}"


def test_a_child_process_of_up_sees_every_setting_of_its_parent(tmp_path, monkeypatch):
    """`meterline up` starts the stream worker as a child with settings_env(): each field must reach it, whether it
    came from the environment, a config file or code (the worker once priced with the default catalog and format)."""
    from meterline.app.up import settings_env
    from meterline.settings import KafkaSecurity

    catalog = tmp_path / "prices.toml"
    catalog.write_text(DEFAULT_CATALOG.read_text())
    parent = Settings(data_dir=tmp_path, catalog=catalog, priced_format="v1", gpu_idle_policy="separate",
                      kafka_secure=True, kafka_port=19999, topic_prefix="acme", stall_after_s=12.5,
                      sql_max_seconds=7, streams_state_dir=tmp_path / "state", streams_state_cache_mib=3,
                      api_tokens_file=tmp_path / "tokens.json", clickhouse_cluster="prod",
                      kafka_security=KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                                                   sasl_username="meter", sasl_password="s3cret"))
    for name in [k for k in os.environ if k.startswith("METERLINE_")]:
        monkeypatch.delenv(name)
    for name, value in settings_env(parent).items():
        monkeypatch.setenv(name, value)
    child = Settings()
    resolved = {"kafka_bootstrap", "clickhouse_dsn"}  # the child gets them resolved (the local broker, the default store)
    assert child.model_dump(exclude=resolved) == parent.model_dump(exclude=resolved)
    assert (child.bootstrap, child.dsn) == (parent.bootstrap, parent.dsn)
    assert child.kafka_security.sasl_password.get_secret_value() == "s3cret"


def test_a_catalog_setting_that_names_no_file_stops_at_start_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("METERLINE_CATALOG", str(tmp_path / "missing.toml"))
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError, match="METERLINE_CATALOG") as err:
            get_settings()
        assert "\n" not in str(err.value)
    finally:
        get_settings.cache_clear()


def test_every_component_prices_with_the_catalog_setting(tmp_path, monkeypatch):
    """Negotiated rates in one file (METERLINE_CATALOG): the default of load_catalog(), which the worker, the sink,
    the allocator, FOCUS and the reports call, is that file, so no component prices with another."""
    from meterline.schemas.events import UsageEvent, build, new_id
    from meterline.streams.pricing import load_catalog

    shipped = DEFAULT_CATALOG.read_text()
    assert 'model = "llama-3.1-8b-instruct"\ninput_mtok = "0.03"' in shipped
    negotiated = tmp_path / "negotiated.toml"
    negotiated.write_text(shipped.replace('model = "llama-3.1-8b-instruct"\ninput_mtok = "0.03"',
                                          'model = "llama-3.1-8b-instruct"\ninput_mtok = "0.01"'))
    event = build(UsageEvent, event_id=new_id(), ts=datetime(2025, 9, 1, tzinfo=timezone.utc), tenant_id="acme",
                  kind="llm_call", provider="self-hosted", model="llama-3.1-8b-instruct", input_tokens=3_000_000)
    monkeypatch.setenv("METERLINE_CATALOG", str(negotiated))
    get_settings.cache_clear()
    try:
        default = load_catalog()
        assert default.version == load_catalog(negotiated).version != load_catalog(DEFAULT_CATALOG).version
        assert default.price_usage(event).cost_usd == Decimal("0.03")  # 3 Mtok at the negotiated 0.01, not 0.09
        assert load_catalog(DEFAULT_CATALOG).price_usage(event).cost_usd == Decimal("0.09")
    finally:
        get_settings.cache_clear()


def test_a_catalog_that_is_not_toml_is_one_line_that_says_what_to_do(tmp_path):
    from meterline.errors import CatalogError, UserError
    from meterline.streams.pricing import load_catalog

    bad = tmp_path / "prices.toml"
    bad.write_text('[[models]]\nmodel = "x\n')
    with pytest.raises(CatalogError, match="cannot read the price catalog .*METERLINE_CATALOG") as err:
        load_catalog(bad)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
