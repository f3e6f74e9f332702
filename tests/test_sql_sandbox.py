"""User SQL in the sandbox (sql/sandbox.py), through the real API on the real engine (chDB).

Every attack of issue 11 that worked before: reading a host file, fetching a URL, connecting out,
writing a file with INTO OUTFILE (by POST, by a plain GET any web page can fire, and through
`meterline sql`), raising limits with SETTINGS, a second statement; and the limits the query
cannot lift. What a user may do still works: SELECT with WITH, UNION, subqueries, numbers(),
system.tables, query parameters, the ledger's parameterized views.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from meterline.app.store import DirectLedger
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.sandbox import Refused, vet

SECRET = "the-host-secret-42"


pytestmark = pytest.mark.xdist_group("sql_sandbox")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from meterline.app.api import ApiServer

    path = tmp_path_factory.mktemp("sandbox")
    settings = Settings(data_dir=path / "data", clickhouse_dsn=f"chdb://{path / 'ch'}")
    gc.collect()  # another module's leftover clients must not pin a different chDB path
    client = ledger.connect(settings)
    ledger.migrate(client)
    client.command("INSERT INTO dead_letters (dlq_id, reason) VALUES (generateUUIDv4(), 'one')")
    server = ApiServer(lambda: DirectLedger(settings, ledger.connect(settings)), port=0)
    server.start()
    yield server, settings, client, path
    server.stop()
    client.close()
    gc.collect()


def attacks(path: Path) -> list[str]:
    secret, outfile = path / "secret.txt", path / "owned.txt"
    return [
        f"SELECT * FROM file('{secret}', 'LineAsString')",
        f"SELECT file('{secret}')",
        f"SELECT * FROM (SELECT * FROM file('{secret}', 'LineAsString'))",
        f"SELECT count() FROM dead_letters WHERE reason IN (SELECT line FROM file('{secret}', 'LineAsString'))",
        "SELECT * FROM url('http://127.0.0.1:9/x', 'LineAsString')",
        "SELECT * FROM s3('http://127.0.0.1:9/b/k', 'CSV')",
        "SELECT * FROM remote('127.0.0.1:9', system.one)",
        "SELECT * FROM mysql('127.0.0.1:9', 'db', 't', 'u', 'p')",
        f"SELECT 'owned' INTO OUTFILE '{outfile}' TRUNCATE",
        f"SELECT 'owned' INTO OUTFILE '{outfile}' TRUNCATE FORMAT CSV",
        "SELECT 1 FORMAT TSV",
        "SELECT 1 SETTINGS max_execution_time = 0, readonly = 0",
        "SELECT 1; SELECT 2",
        f"SELECT 1; SELECT 'owned' INTO OUTFILE '{outfile}'",
        "INSERT INTO dead_letters (dlq_id) VALUES (generateUUIDv4())",
        "DROP TABLE dead_letters",
        f"EXPLAIN SELECT file('{secret}')",
        "SELECT dictGet('d', 'x', toUInt64(1))",
        "SELECT * FROM system.users",
        "SELECT * FROM other_db.t",
        "SHOW TABLES",
    ]


def test_every_attack_is_refused_and_touches_nothing(api):
    server, _, _, path = api
    (path / "secret.txt").write_text(SECRET)
    for query in attacks(path):
        reply = httpx.post(f"{server.url}/api/sql", json={"sql": query})
        assert reply.status_code == 403, (query, reply.status_code, reply.text)
        assert SECRET not in reply.text and "error" in reply.json()
        assert httpx.get(f"{server.url}/api/sql", params={"q": query}).status_code == 405  # POST only: no GET a page can fire
    assert not (path / "owned.txt").exists()


def test_a_hostile_page_cannot_reach_the_api_through_the_browser(api):
    """DNS rebinding (a Host that is not loopback), a cross-site POST (another Origin), a form post (not JSON)
    are refused; same-origin calls work; every answer, errors too, carries the hardening headers."""
    server, _, _, _ = api
    sql = {"sql": "SELECT 1"}
    rebound = httpx.post(f"{server.url}/api/sql", json=sql, headers={"Host": "evil.example:8787"})
    assert rebound.status_code == 421 and "loopback" in rebound.json()["error"]
    cross = httpx.post(f"{server.url}/api/sql", json=sql, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and "cross-site" in cross.json()["error"]
    form = httpx.post(f"{server.url}/api/sql", content="sql=SELECT+1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 400
    own = httpx.post(f"{server.url}/api/sql", json=sql, headers={"Origin": server.url, "Host": server.url.split("//")[1]})
    assert own.status_code == 200 and own.json()["rows"] == [[1]]
    assert httpx.get(f"{server.url}/health", headers={"Host": "localhost:1"}).status_code in (200, 503)
    for reply in (own, rebound, httpx.get(f"{server.url}/no-such-page")):
        assert reply.headers["X-Content-Type-Options"] == "nosniff" and reply.headers["X-Frame-Options"] == "DENY"
        assert "default-src 'self'" in reply.headers["Content-Security-Policy"]


def test_what_users_may_do_still_works(api):
    server, _, _, _ = api

    def rows(sql: str, **parameters: str) -> list:
        reply = httpx.post(f"{server.url}/api/sql", json={"sql": sql, "parameters": parameters})
        assert reply.status_code == 200, (sql, reply.text)
        return reply.json()["rows"]

    assert rows("SELECT count() AS n FROM dead_letters") == [[1]]
    assert rows("WITH d AS (SELECT reason FROM dead_letters) SELECT r FROM (SELECT reason AS r FROM d UNION ALL SELECT 'two') "
                "ORDER BY r") == [["one"], ["two"]]
    assert rows("SELECT sum(number) FROM numbers(10)") == [[45]]
    assert rows("SELECT count() > 5 FROM system.tables WHERE database = currentDatabase()") == [[True]]
    assert rows("SELECT count() FROM dead_letters WHERE reason = {r:String}", r="one") == [[1]]
    assert rows("-- a comment\nselect 1 as one;") == [[1]]
    # the ledger's parameterized view (migration 0020), though a call to it looks like a table function
    assert rows("SELECT count() FROM attributed_spend(since = {s:DateTime64(3, 'UTC')}, until = '2100-01-01 00:00:00')",
                s="2000-01-01 00:00:00") == [[0]]


def test_the_limits_hold_and_the_query_cannot_lift_them(api):
    _, settings, client, _ = api
    small = DirectLedger(Settings(**{**settings.model_dump(), "sql_max_rows_to_read": 1000, "sql_max_result_rows": 5}), client)
    with pytest.raises(Exception, match="(?i)limit"):
        small.user_query("SELECT sum(number) FROM numbers(100000)")
    with pytest.raises(Exception, match="(?i)limit"):
        small.user_query("SELECT number FROM numbers(10)")
    with pytest.raises(Refused, match="SETTINGS"):
        small.user_query("SELECT sum(number) FROM numbers(100000) SETTINGS max_rows_to_read = 0")
    assert small.user_query("SELECT number FROM numbers(5)").rows == [(i,) for i in range(5)]


def test_a_statement_that_is_not_a_select_is_told_so_and_how_to_list_tables(api):
    """SHOW TABLES and DESCRIBE were refused as 'INTO OUTFILE, FORMAT and SETTINGS never are: EXPLAIN inside
    subquery...': nothing in that says what is wrong, or what to run instead."""
    _, _, client, _ = api
    for sql in ("SHOW TABLES", "DESCRIBE TABLE priced_events", "INSERT INTO dead_letters (dlq_id) VALUES (generateUUIDv4())"):
        with pytest.raises(Refused, match=r"only SELECT queries run here.*system\.tables") as refused:
            vet(client, sql)
        assert "OUTFILE" not in str(refused.value), sql
    suggested = str(refused.value).split("columns with ")[1]
    assert vet(client, suggested)  # the query the message suggests runs in the sandbox


def test_a_query_on_a_missing_table_says_where_the_tables_are_without_echoing_the_sandbox_settings(api):
    """The engine's message ended 'In scope SELECT ... SETTINGS readonly = '2', max_execution_time = ...': the
    sandbox's settings read as the user's query, and nothing said which tables exist (or that none do yet)."""
    server, *_ = api
    resp = httpx.post(f"{server.url}/api/sql", json={"sql": "SELECT count() FROM priced_event"})
    error = resp.json()["error"]
    assert resp.status_code == 400 and "priced_event" in error, error
    assert "system.tables" in error and "meterline migrate" in error and "readonly" not in error, error


def test_the_sandbox_reads_the_tree_clickhouse_parsed(api):
    """Spelling does not matter: what ClickHouse parses is what is judged (and what runs)."""
    _, _, client, _ = api
    assert vet(client, "select   *\nfrom   dead_letters   limit 1") == "SELECT * FROM dead_letters LIMIT 1"
    for disguised in ("SELECT * FROM FILE('/etc/passwd', 'LineAsString')", "SELECT * FROM `file`('/etc/passwd', 'LineAsString')",
                      "SELECT /* */ * FROM\tfile('/etc/passwd','LineAsString')"):
        with pytest.raises(Refused, match="table function"):
            vet(client, disguised)


def test_meterline_sql_refuses_to_write_a_file(tmp_path):
    outfile = tmp_path / "owned.txt"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")},
           "METERLINE_DATA_DIR": str(tmp_path / "data"), "METERLINE_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'ch'}"}
    done = subprocess.run([sys.executable, "-m", "meterline", "sql", f"SELECT 'owned' INTO OUTFILE '{outfile}'"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "INTO OUTFILE" in done.stderr and "Traceback" not in done.stderr
    assert not outfile.exists()
