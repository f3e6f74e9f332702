"""Tokens and roles of the HTTP API (issue 11 item 2), query cancellation and the light pool.

Against the real aiohttp server, real chDB, and (for budgets) the real broker and sink: each
role does what it may and nothing more, a tenant token reads its own tenant whatever the request
asks, budgets changed through the API reach the ledger with the token's name, and a user query
whose client leaves is killed in the engine while /health and /metrics keep answering.
"""
from __future__ import annotations

import gc
import json
import os
import socket
import stat
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import httpx
import pytest

from meterline.app.api import ApiServer, AuthSetupError
from meterline.app.auth import TokenStore, token_store
from meterline.app.live import LiveState
from meterline.app.store import DirectLedger
from meterline.schemas.events import PricedEvent, SpendUpdate, ThrottleDecision, new_id
from meterline.settings import Settings
from meterline.sql import ledger
from meterline.sql.rows import insert_rows, priced_event_row, with_offsets
from test_sql_sink import METERLINE, _env, ledger_sql, sink_until_idle
from collectors_kafka import wait_for


NOW = datetime.now(timezone.utc)
COSTS = {"acme": Decimal("1.250000000001"), "globex": Decimal("7.5")}
# seconds to minutes of work for two cores, reading 400k rows: only a kill ends it early
HEAVY = "SELECT count() FROM numbers(200000) AS a, numbers(200000) AS b WHERE a.number * 3 + b.number = 7"


# ---- the token store --------------------------------------------------------------------------


def test_tokens_are_hashed_at_rest_and_checked_by_role(tmp_path):
    store = TokenStore(tmp_path / "tokens.json")
    assert not store.configured()
    admin, reader = store.create("ops", "admin"), store.create("finance", "reader")
    tenant = store.create("acme-portal", "tenant:acme")
    text = (tmp_path / "tokens.json").read_text()
    assert admin not in text and reader not in text and tenant not in text  # only digests are kept
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600
    assert store.verify(admin).is_admin and store.verify(reader).role == "reader"
    assert store.verify(tenant).tenant == "acme" and store.verify(reader).tenant is None
    assert store.verify(admin + "x") is None and store.verify("") is None and store.verify(None) is None

    other = TokenStore(tmp_path / "tokens.json")  # another process (the CLI) revokes; this one sees it
    assert other.revoke("finance") and not other.revoke("finance")
    assert store.verify(reader) is None and store.verify(admin) is not None
    for name, role in (("ops", "reader"), ("bad name", "reader"), ("x", "root"), ("x", "tenant:"), ("x", "tenant:a\u202eb")):
        with pytest.raises(ValueError):
            store.create(name, role)


def test_token_cli_creates_lists_and_revokes(settings):
    env = _env(settings)
    made = subprocess.run([*METERLINE, "token", "create", "--name", "grafana", "--role", "reader", "--json"],
                          env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    assert token_store(settings).verify(token).name == "grafana"
    listed = subprocess.run([*METERLINE, "token", "list", "--json"], env=env, capture_output=True, text=True)
    assert [r["name"] for r in json.loads(listed.stdout)] == ["grafana"] and token not in listed.stdout
    bad = subprocess.run([*METERLINE, "token", "create", "--name", "x", "--role", "root"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "admin, reader or tenant:" in bad.stderr and "Traceback" not in bad.stderr
    gone = subprocess.run([*METERLINE, "token", "revoke", "grafana"], env=env, capture_output=True, text=True)
    assert gone.returncode == 0 and token_store(settings).verify(token) is None

    mounted = settings.data_dir.parent / "secret" / "tokens.json"  # e.g. a mounted secret (deploy/docker-compose.yml)
    made = subprocess.run([*METERLINE, "token", "create", "--name", "ops", "--role", "admin", "--json"],
                          env={**env, "METERLINE_API_TOKENS_FILE": str(mounted)}, capture_output=True, text=True)
    assert made.returncode == 0 and mounted.exists(), made.stderr
    moved = Settings(**{**settings.model_dump(), "api_tokens_file": mounted})
    assert token_store(moved).verify(json.loads(made.stdout)["token"]).is_admin


# ---- the API with tokens ----------------------------------------------------------------------


def seeded_store(tmp_path) -> tuple[Settings, object]:
    store = Settings(data_dir=tmp_path / "data", clickhouse_dsn=f"chdb://{tmp_path / 'ch'}")
    client = ledger.connect(store)
    ledger.migrate(client)
    events = [PricedEvent(event_id=new_id(), ts=NOW - timedelta(minutes=5), tenant_id=tenant, team="t", kind="llm_call",
                          provider="openai", model="gpt-4o", input_tokens=10, output_tokens=1, cost_usd=cost,
                          list_cost_usd=cost, cost_source="catalog", catalog_version="v", priced_at=NOW)
              for tenant, cost in COSTS.items()]
    insert_rows(client, "priced_events", [with_offsets(priced_event_row(e), "priced", 0, i) for i, e in enumerate(events)])
    return store, client


def live_state() -> LiveState:
    live = LiveState()
    for tenant, cost in COSTS.items():
        live.add_spend(SpendUpdate(update_id=new_id(), ts=NOW, tenant_id=tenant, scope="tenant", scope_id=tenant,
                                   window_start=NOW - timedelta(seconds=5), window_end=NOW, window_cost_usd=cost,
                                   period_start=NOW - timedelta(days=1), period_cost_usd=cost))
        live.add_decision(ThrottleDecision(decision_id=new_id(), tenant_id=tenant, scope="tenant", scope_id=tenant,
                                           action="throttle", reason=f"{tenant} over", issued_at=NOW,
                                           expires_at=NOW + timedelta(minutes=5)))
    return live


@pytest.fixture
def guarded(tmp_path):
    """An API over a seeded chDB ledger with tokens for each role."""
    gc.collect()
    store, client = seeded_store(tmp_path)
    tokens = TokenStore(tmp_path / "tokens.json")
    made = {role: tokens.create(role.replace(":", "-"), role) for role in ("admin", "reader", "tenant:acme")}
    from prometheus_client import CollectorRegistry

    api = ApiServer(lambda: DirectLedger(store, ledger.connect(store)), live=live_state(), registry=CollectorRegistry(),
                    health=lambda: {"api": {"running": True, "restarts": 0}}, port=0, tokens=tokens)
    api.start()
    yield api, made, tokens
    api.stop()
    client.close()
    gc.collect()


def call(api, path, token=None, method="GET", **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{api.url}{path}", headers=headers, timeout=30, **kw)


def chargeback(api, token, **params):
    resp = call(api, "/api/report/chargeback", token, params={"since": "1d", "by": "tenant", **params})
    return resp, {row[0]: Decimal(row[-1]) for row in resp.json().get("rows", [])}


def test_without_a_token_only_the_page_and_health_answer(guarded):
    api, made, _ = guarded
    assert not api.open
    for path in ("/", "/app.js", "/health"):
        assert call(api, path).status_code == 200, path
    for path in ("/api/live", "/api/report/chargeback", "/metrics", "/api/budgets"):
        for token in (None, made["admin"] + "x", "mlt_guess"):
            resp = call(api, path, token)
            assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer", (path, token)
    resp = call(api, "/api/sql", method="POST", json={"sql": "SELECT 1"})
    assert resp.status_code == 401 and "meterline token create" in resp.json()["error"]


def test_reader_reads_everything_but_changes_nothing(guarded):
    api, made, _ = guarded
    resp, rows = chargeback(api, made["reader"])
    assert resp.status_code == 200 and rows == COSTS
    sql = call(api, "/api/sql", made["reader"], "POST", json={"sql": "SELECT sum(cost_usd) AS c FROM priced_events"})
    assert Decimal(sql.json()["rows"][0][0]) == sum(COSTS.values())
    assert call(api, "/metrics", made["reader"]).status_code == 200
    policy = {"policy_id": "p", "tenant_id": "acme", "scope": "tenant", "scope_id": "acme", "amount": "5"}
    assert call(api, "/api/budgets", made["reader"], "PUT", json=policy).status_code == 403
    assert call(api, "/api/budgets/p", made["reader"], "DELETE").status_code == 403


def test_a_tenant_token_reads_its_own_tenant_whatever_the_request_says(guarded):
    api, made, _ = guarded
    acme = made["tenant:acme"]
    resp, rows = chargeback(api, acme)
    assert resp.status_code == 200 and rows == {"acme": COSTS["acme"]}  # the token's tenant, unasked
    assert chargeback(api, acme, tenant="acme")[1] == {"acme": COSTS["acme"]}
    assert chargeback(api, acme, tenant="globex")[0].status_code == 403
    for name in ("gpu", "totals"):  # reports over every tenant
        assert call(api, f"/api/report/{name}", acme, params={"since": "1d"}).status_code == 403
    for sql in ("SELECT sum(cost_usd) FROM priced_events", "SELECT 1"):
        assert call(api, "/api/sql", acme, "POST", json={"sql": sql}).status_code == 403
    assert call(api, "/metrics", acme).status_code == 403
    live = call(api, "/api/live", acme).json()
    assert [t["tenant_id"] for t in live["tenants"]] == ["acme"] and set(live["series"]) == {"acme"}
    assert [d["tenant_id"] for d in live["decisions"]] == ["acme"] and live["decision_counts"] == {"throttle": 1}
    everyone = call(api, "/api/live", made["reader"]).json()
    assert {t["tenant_id"] for t in everyone["tenants"]} == set(COSTS) and everyone["decision_counts"] == {"throttle": 2}


def test_a_revoked_token_is_refused_on_its_next_request(guarded):
    api, made, tokens = guarded
    assert call(api, "/api/live", made["reader"]).status_code == 200
    TokenStore(tokens.path).revoke("reader")  # as `meterline token revoke` does, from another process
    assert call(api, "/api/live", made["reader"]).status_code == 401
    assert call(api, "/api/live", made["admin"]).status_code == 200


def test_off_loopback_the_api_needs_a_token(tmp_path):
    tokens = TokenStore(tmp_path / "tokens.json")
    with pytest.raises(AuthSetupError, match="meterline token create"):
        ApiServer(lambda: None, host="0.0.0.0", port=0, tokens=tokens)
    with pytest.raises(AuthSetupError):
        ApiServer(lambda: None, host="0.0.0.0", port=0)
    token = tokens.create("ops", "reader")
    api = ApiServer(lambda: None, live=LiveState(), host="0.0.0.0", port=0, tokens=tokens)
    api.start()
    try:
        addr = socket.gethostbyname(socket.gethostname())  # not loopback, where the host allows
        for host in {"127.0.0.1", addr}:
            assert httpx.get(f"http://{host}:{api.port}/api/live").status_code == 401
            assert httpx.get(f"http://{host}:{api.port}/api/live", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        api.stop()


def test_with_no_token_the_loopback_api_is_open(tmp_path):
    api = ApiServer(lambda: None, live=live_state(), port=0, tokens=TokenStore(tmp_path / "tokens.json"))
    api.start()
    try:
        assert api.open and call(api, "/api/live").status_code == 200
    finally:
        api.stop()


# ---- budgets through the API, audited -----------------------------------------------------------


def test_budgets_changed_through_the_api_are_audited_with_the_token_name(settings, tmp_path):
    tokens = TokenStore(tmp_path / "tokens.json")
    admin, reader = tokens.create("alice", "admin"), tokens.create("bob", "reader")
    api = ApiServer(lambda: None, live=LiveState(), port=0, tokens=tokens, settings=settings)
    api.start()
    try:
        policy = {"policy_id": "acme-month", "tenant_id": "acme", "scope": "tenant", "scope_id": "acme", "amount": "100.000000000001"}
        assert call(api, "/api/budgets", reader, "PUT", json=policy).status_code == 403
        assert call(api, "/api/budgets", admin, "PUT", json={**policy, "amount": 1.5}).status_code == 400  # a float is not money
        put = call(api, "/api/budgets", admin, "PUT", json=policy)
        assert put.status_code == 200 and put.json()["amount"] == "100.000000000001"
        assert call(api, "/api/budgets/acme-month", admin, "DELETE").status_code == 200
    finally:
        api.stop()
    cli = subprocess.run([*METERLINE, "budget", "set", "--tenant", "globex", "--amount", "7"], env=_env(settings),
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    sink_until_idle(settings)
    rows = ledger_sql(settings, "SELECT policy_id, deleted, changed_by, toString(amount) AS amount FROM budget_policies ORDER BY _offset")
    assert [(r["policy_id"], r["deleted"], r["changed_by"]) for r in rows] == [
        ("acme-month", False, "alice"), ("acme-month", True, "alice"), ("tenant:globex:usd:month", False, rows[2]["changed_by"])]
    assert rows[0]["amount"] == "100.000000000001" and rows[2]["changed_by"].startswith("cli:")


# ---- cancellation and the light pool ------------------------------------------------------------


def running_user_queries(client) -> int:
    return client.query("SELECT count() FROM system.processes WHERE position(query, 'meterline-query:') > 0 "
                        "AND query NOT LIKE 'KILL%' AND position(query, 'system.processes') = 0").result_rows[0][0]


def test_a_query_whose_client_leaves_is_killed_and_health_answers_meanwhile(tmp_path):
    gc.collect()
    store, client = seeded_store(tmp_path)
    store = Settings(**{**store.model_dump(), "sql_max_seconds": 3600})  # only the kill can end it soon
    from prometheus_client import CollectorRegistry

    api = ApiServer(lambda: DirectLedger(store, ledger.connect(store)), live=LiveState(), registry=CollectorRegistry(),
                    health=lambda: {"api": {"running": True}}, port=0, tokens=TokenStore(tmp_path / "tokens.json"))
    api.start()
    answers: list[int] = []

    def heavy() -> None:
        try:
            answers.append(call(api, "/api/sql", None, "POST", json={"sql": HEAVY}).status_code)
        except httpx.HTTPError:
            answers.append(-1)

    try:
        busy = [threading.Thread(target=heavy) for _ in range(2)]  # both query threads taken
        for t in busy:
            t.start()
        wait_for(lambda: running_user_queries(client) == 2, "two heavy queries to run")
        assert call(api, "/health").status_code == 200
        assert call(api, "/metrics").status_code == 200
        assert call(api, "/api/live").status_code == 200
        assert running_user_queries(client) == 2 and not answers  # they answered while both still ran

        with socket.create_connection(("127.0.0.1", api.port)) as sock:  # a third, abandoned by its client
            body = json.dumps({"sql": HEAVY + " AND 1 = 1"}).encode()
            sock.sendall(b"POST /api/sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: api._running.__len__() == 3, "the third query to be accepted")  # noqa: SLF001
        wait_for(lambda: api.cancelled == 1, "the API to notice the client left")
    finally:
        api.stop()  # kills the two still running: stop does not wait them out
    wait_for(lambda: running_user_queries(client) == 0, "the engine to end every user query")
    for t in busy:
        t.join(60)
    assert not any(t.is_alive() for t in busy)
    client.close()
    gc.collect()
