"""Settings: environment and TOML file, and security settings reaching every Kafka client config."""
from __future__ import annotations

from meterline.settings import Settings


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
