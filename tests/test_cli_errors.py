"""One line for every common mistake (issue 11, item 4): exit code 2, no traceback, a short message that
says what to do. Each case runs the installed `meterline` command as a user would, with env vars."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from meterline.settings import Settings
from meterline.topics import create_topics

import collectors_kafka  # the tests' shared Kafka helpers
from brokers import free_port
from conftest import delete_topics_with_prefix

METERLINE = str(Path(sys.executable).with_name("meterline"))  # .venv/bin/meterline
RUN_S = 120  # a safety net so a hang fails; no test asserts on time


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(METERLINE_DATA_DIR=str(tmp_path / "data"), COLUMNS="80", **extra)
    return env


def start(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([METERLINE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{proc.args} did not exit: {out[-2000:]}")
    return proc.returncode, out


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    return finish(start(env, *args))


def assert_one_line(result: tuple[int, str], *words: str, absent: tuple[str, ...] = ()) -> str:
    """Exit 2, no traceback, at most 3 lines, with each of `words`."""
    code, out = result
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert 1 <= len(lines) <= 3, out[-3000:]
    for word in words:
        assert word in out, f"{word!r} missing from: {out}"
    for word in absent:
        assert word not in out, f"{word!r} should not be in: {out}"
    return out


# ---- settings: the environment and the METERLINE_CONFIG file ----------------------------------


def test_api_port_that_is_not_a_number(tmp_path):
    out = assert_one_line(run(base_env(tmp_path, METERLINE_API_PORT="eighty"), "topics", "list"),
                          "METERLINE_API_PORT", "eighty", "integer")
    assert "pydantic" not in out


def test_unknown_kafka_security_protocol_lists_the_allowed_ones(tmp_path):
    assert_one_line(run(base_env(tmp_path, METERLINE_KAFKA_SECURITY_PROTOCOL="SASL_TLS"), "topics", "list"),
                    "METERLINE_KAFKA_SECURITY_PROTOCOL", "SASL_TLS", "PLAINTEXT", "SASL_SSL")


def test_broken_toml_in_the_config_file(tmp_path):
    config = tmp_path / "meterline.toml"
    config.write_text('topic_prefix = "x"\napi_port = [\n')
    assert_one_line(run(base_env(tmp_path, METERLINE_CONFIG=str(config)), "topics", "list"),
                    str(config), "METERLINE_CONFIG", "TOML", "line")


def test_a_bad_value_in_the_config_file_names_its_key_and_the_file(tmp_path):
    config = tmp_path / "meterline.toml"
    config.write_text('[kafka_security]\nsecurity_protocol = "TLS"\n')
    assert_one_line(run(base_env(tmp_path, METERLINE_CONFIG=str(config)), "topics", "list"),
                    "security_protocol", "TLS", str(config), "SASL_SSL")


def test_config_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope.toml"
    assert_one_line(run(base_env(tmp_path, METERLINE_CONFIG=str(missing)), "topics", "list"),
                    "METERLINE_CONFIG", str(missing))


# ---- the ledger's DSN and the data directory --------------------------------------------------


def test_dsn_with_a_typo_in_its_scheme_is_refused(tmp_path):
    env = base_env(tmp_path, METERLINE_CLICKHOUSE_DSN=f"chdv://{tmp_path / 'ch'}")
    for args in (("migrate",), ("report", "totals"), ("sql", "SELECT 1")):
        assert_one_line(run(env, *args), "METERLINE_CLICKHOUSE_DSN", "chdv://", "chdb://", "http://",
                        absent=("localhost:8123",))


def test_http_dsn_with_nothing_listening_names_clickhouse_not_kafka(tmp_path):
    port = free_port()
    env = base_env(tmp_path, METERLINE_CLICKHOUSE_DSN=f"http://meter:s3cret@127.0.0.1:{port}/ledger")
    for args in (("migrate",), ("report", "totals"), ("sql", "SELECT 1")):
        assert_one_line(run(env, *args), f"ClickHouse does not answer at http://127.0.0.1:{port}/ledger",
                        "METERLINE_CLICKHOUSE_DSN", absent=("Kafka", "s3cret"))


def test_data_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("a file, so nothing can be created below it, not even by root")
    env = base_env(tmp_path)
    env["METERLINE_DATA_DIR"] = str(tmp_path / "afile" / "sub")
    for args in (("migrate",), ("report", "totals"), ("up",)):
        assert_one_line(run(env, *args), "METERLINE_DATA_DIR", str(tmp_path / "afile" / "sub"))


# ---- Kafka that does not answer ---------------------------------------------------------------


def test_kafka_that_does_not_answer_fails_fast_in_one_line(tmp_path):
    """Every command that needs Kafka probes it first (all at once here; each probe takes a few seconds)."""
    commands = [("topics", "create"), ("streams",), ("sink",), ("allocator",), ("up",)]
    refused = {args: start(base_env(tmp_path / "-".join(args), METERLINE_KAFKA_BOOTSTRAP="127.0.0.1:1",
                                     METERLINE_API_PORT=str(free_port())), *args) for args in commands}
    unknown = start(base_env(tmp_path / "dns", METERLINE_KAFKA_BOOTSTRAP="no-such-broker.invalid:9092"), "streams")
    for args, proc in refused.items():
        assert_one_line(finish(proc), "Kafka does not answer at 127.0.0.1:1", "Connection refused",
                        "meterline kafka start", "METERLINE_KAFKA_BOOTSTRAP", absent=("%3|", "FAIL"))
    assert_one_line(finish(unknown), "Kafka does not answer at no-such-broker.invalid:9092", "METERLINE_KAFKA_BOOTSTRAP",
                    absent=("%3|",))


def test_kafka_start_with_another_bootstrap_that_does_not_answer_says_what_to_change(tmp_path):
    """`kafka start` starts nothing for an existing cluster: one that does not answer is a setting to change
    (before, it waited the whole --timeout, 90 s, and said only that nothing answered)."""
    env = base_env(tmp_path, METERLINE_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}", METERLINE_KAFKA_PORT=str(free_port()))
    assert_one_line(run(env, "kafka", "start"), "names an existing cluster", "unset METERLINE_KAFKA_BOOTSTRAP",
                    "127.0.0.1:<METERLINE_KAFKA_PORT>")


def test_kafka_log_goes_through_logging_with_repeats_collapsed():
    import logging

    from meterline.kafkalog import KAFKA_LOG, CollapseRepeats, reason

    assert Settings().kafka_config()["logger"] is KAFKA_LOG
    assert KAFKA_LOG.getEffectiveLevel() == logging.WARNING
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.Logger("t")
    log.addHandler(Keep())
    collapse = CollapseRepeats(window_s=3600)
    log.addFilter(collapse)
    line = ("FAIL [rdkafka#consumer-{}] [thrd:127.0.0.1:1/bootstrap]: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 "
            "failed: Connection refused (after {}ms in state CONNECT)")
    for i in range(500):
        log.error(line.format(i % 3, i % 7))
    log.error("something else")
    assert len(seen) == 2 and collapse.suppressed == 499, seen
    assert reason(seen[0]) == "Connect to ipv4#127.0.0.1:1 failed: Connection refused"
    collapse.window_s = 0  # the window is over: the next one passes and says how many were held back
    log.error(line.format(0, 0))
    assert seen[-1].endswith("(499 more like it in the last 0 s)"), seen[-1]


# ---- `meterline up` and what talks to it --------------------------------------------------------


def test_api_server_stop_after_a_failed_start_does_not_raise():
    from meterline.app.api import ApiServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        api = ApiServer(lambda: None, port=taken.getsockname()[1])
        with pytest.raises(RuntimeError) as failed:
            api.start(timeout=30)
        assert isinstance(failed.value.__cause__, OSError)
        api.stop(timeout=30)  # nothing was served: nothing to wait for, nothing raised
        assert not api.alive()


def test_up_with_its_api_port_taken(tmp_path, kafka_bootstrap):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(tmp_path, METERLINE_KAFKA_BOOTSTRAP=kafka_bootstrap, METERLINE_API_PORT=str(port),
                       METERLINE_TOPIC_PREFIX=f"t{uuid.uuid4().hex[:10]}")
        assert_one_line(run(env, "up"), f"127.0.0.1:{port}", "in use", "METERLINE_API_PORT",
                        absent=("TimeoutError", "Is Kafka running"))


def test_up_with_a_clickhouse_server_that_does_not_answer(tmp_path, kafka_bootstrap):
    port = free_port()
    env = base_env(tmp_path, METERLINE_KAFKA_BOOTSTRAP=kafka_bootstrap, METERLINE_API_PORT=str(free_port()),
                   METERLINE_CLICKHOUSE_DSN=f"http://127.0.0.1:{port}/", METERLINE_TOPIC_PREFIX=f"t{uuid.uuid4().hex[:10]}")
    assert_one_line(run(env, "up"), f"ClickHouse does not answer at http://127.0.0.1:{port}/", "METERLINE_CLICKHOUSE_DSN",
                    absent=("Is Kafka running",))


@pytest.fixture
def running_up(tmp_path, kafka_bootstrap):
    """`meterline up` on an embedded store, answering; yields (its env, the DSN it serves)."""
    settings = Settings(data_dir=tmp_path / "data", kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}",
                        clickhouse_dsn=f"chdb://{tmp_path / 'served'}")
    create_topics(settings)
    port = free_port()
    env = base_env(tmp_path, METERLINE_KAFKA_BOOTSTRAP=kafka_bootstrap, METERLINE_TOPIC_PREFIX=settings.topic_prefix,
                   METERLINE_CLICKHOUSE_DSN=settings.dsn, METERLINE_API_PORT=str(port))
    log = tmp_path / "up.log"
    with open(log, "ab") as out:  # a pipe nobody reads could block it
        proc = subprocess.Popen([METERLINE, "up"], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    runfile = settings.data_dir / "up.json"

    def answering():
        if proc.poll() is not None:
            raise AssertionError(f"up exited: {log.read_text()[-3000:]}")
        try:
            return runfile.exists() and httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    try:
        collectors_kafka.wait_for(answering, "up to answer", step=0.3)
        assert json.loads(runfile.read_text())["dsn"] == settings.dsn
        yield env, settings.dsn
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        delete_topics_with_prefix(settings)


def test_report_and_sql_refuse_another_ledger_than_the_one_up_serves(tmp_path, running_up):
    env, served = running_up
    code, out = run(env, "sql", "SELECT 1 AS one", "--format", "json")  # up's own settings: through its API
    assert code == 0 and json.loads(out) == [{"one": 1}], out
    other = dict(env, METERLINE_CLICKHOUSE_DSN=f"chdb://{tmp_path / 'other'}")
    for args in (("report", "totals"), ("sql", "SELECT 1")):
        assert_one_line(run(other, *args), "meterline up", served, f"chdb://{tmp_path / 'other'}")
