"""`--containers` / METERLINE_TEST_CONTAINERS=1 (tests/containers.py): without Docker the run fails
with one line, never skips; without the option the fixtures are the project's broker and chDB."""
from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import clickhouse_connect
import pytest

import containers

TESTS = Path(__file__).resolve().parent

TINY = textwrap.dedent('''
    def test_tiny(settings):
        assert settings.dsn
''')


def run_tiny(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """pytest in a child, on a one-test file that uses the `settings` fixture of tests/conftest.py."""
    (tmp_path / "test_tiny.py").write_text(TINY)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    child_env = {**{k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", containers.ENV)},
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
                 **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", *args,
                           str(tmp_path / "test_tiny.py")], cwd=tmp_path, env=child_env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("how", ["option", "env"])
def test_containers_without_docker_fail_the_run_with_one_line(tmp_path, how):
    (tmp_path / "home").mkdir()  # HOME: no ~/.testcontainers.properties naming another engine
    nothing = tmp_path / "nothing.sock"  # a socket nobody serves
    args, env = (["--containers"], {}) if how == "option" else ([], {containers.ENV: "1"})
    done = run_tiny(tmp_path, *args, DOCKER_HOST=f"unix://{nothing}", HOME=str(tmp_path / "home"), **env)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    lines = [line for line in out.splitlines() if "--containers needs a Docker engine: " in line]
    assert len(lines) == 1, out
    assert "skipped" not in out and "passed" not in out and "Traceback" not in out, out


def test_without_the_option_the_tiny_run_passes_on_chdb(tmp_path):
    """The same child without --containers: no Docker asked for, the tiny test passes."""
    done = run_tiny(tmp_path, DOCKER_HOST=f"unix://{tmp_path / 'nothing.sock'}", **{containers.ENV: "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


class _Engine(threading.Thread):
    """Answers GET /_ping with OK on a unix socket, as a Docker engine does, and nothing else."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(120)
        self.pings = 0

    def run(self) -> None:
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    request = conn.recv(65536)
                    if request.startswith(b"GET /_ping"):
                        self.pings += 1
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                    else:
                        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            return


def test_docker_answers_but_testcontainers_missing_fail_the_run_naming_the_install(tmp_path):
    """Docker's ping is asked without the optional packages, so a missing testcontainers is named as such."""
    engine = _Engine(tmp_path / "engine.sock")
    engine.start()
    try:
        (tmp_path / "no_testcontainers.py").write_text("import sys\nsys.modules['testcontainers'] = None\n")
        (tmp_path / "home").mkdir()
        done = run_tiny(tmp_path, "-p", "no_testcontainers", "--containers", DOCKER_HOST=f"unix://{tmp_path / 'engine.sock'}",
                        HOME=str(tmp_path / "home"), PYTHONPATH=os.pathsep.join([str(tmp_path), str(TESTS)]))
    finally:
        engine.sock.close()
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "--containers needs testcontainers: pip install -e '.[test,containers]' (ModuleNotFoundError: " in out, out
    assert engine.pings == 1 and "passed" not in out, out


def test_the_fixtures_follow_the_option(request, settings, kafka_bootstrap, tmp_path):
    """Without the option: the project's broker (make test's, or the one conftest starts) and a chdb:// dir of
    this test's own. With it (a Docker engine): the container broker and a database of this test's own."""
    assert settings.bootstrap == kafka_bootstrap
    if not containers.enabled(request.config):
        assert kafka_bootstrap == (os.environ.get("METERLINE_KAFKA_BOOTSTRAP") or "127.0.0.1:19092")
        assert settings.dsn == f"chdb://{tmp_path / 'clickhouse'}"
        return
    assert kafka_bootstrap == request.getfixturevalue("kafka_container")
    base = request.getfixturevalue("clickhouse_server")
    assert re.fullmatch(re.escape(base) + r"/t_test_the_fixtures_follow_the_option_[0-9a-f]{8}", settings.dsn), settings.dsn
    client = clickhouse_connect.get_client(dsn=settings.dsn)
    try:
        assert client.command("SELECT currentDatabase()") == settings.dsn.rsplit("/", 1)[1]
    finally:
        client.close()


def test_database_names_are_identifiers_unique_per_run():
    a, b = containers.database_name("test_x[a-b/c d]"), containers.database_name("test_x[a-b/c d]")
    assert a != b
    for name in (a, b, containers.database_name("ü" * 300)):
        assert re.fullmatch(r"t_[A-Za-z0-9_]*_[0-9a-f]{8}", name) and len(name) <= 60, name
    assert a.startswith("t_test_x_a_b_c_d_")


def test_a_test_database_is_created_and_dropped(tmp_path):
    """The fixture's DDL, on the embedded engine (the server speaks the same SQL)."""
    gc.collect()  # another module's leftover clients must not pin a different chDB path
    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'ch'}")
    try:
        name = containers.database_name("test_ddl")
        exists = "SELECT count() FROM system.databases WHERE name = {n:String}"
        containers.create_database(client, name)
        containers.create_database(client, name)  # idempotent
        assert client.query(exists, parameters={"n": name}).result_rows[0][0] == 1
        containers.drop_database(client, name)
        containers.drop_database(client, name)
        assert client.query(exists, parameters={"n": name}).result_rows[0][0] == 0
    finally:
        client.close()
        del client
        gc.collect()
