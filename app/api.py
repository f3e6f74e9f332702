"""The HTTP API that `meterline up` serves (aiohttp, on its own thread and event loop).

    GET  /                      the built-in dashboard (app/web/, no external assets)
    GET  /health                components, whether they run and progress (503 when one is down or stalled)
    GET  /metrics               Prometheus text
    GET  /api/report/<name>     a chargeback report (?since=&until=&by=&tenant=&team=&project=&limit=)
    POST /api/sql               {"sql": "...", "parameters": {...}} sandboxed (sql/sandbox.py), typed results
    GET  /api/live              recent spend per tenant, decisions, anomalies
    GET  /api/budgets           the live budget policies
    PUT  /api/budgets           create or replace one (admin; audited with the token's name)
    DELETE /api/budgets/<id>    delete one (admin; audited)
    POST /v1/traces             OTLP/HTTP traces (protobuf or JSON, gzip): GenAI spans metered (app/otlp.py)

Who may do what is app/auth.py's roles; a request carries `Authorization: Bearer <token>`
(the page, /health and the static files need none). Ledger queries run on a small thread
pool; each pool thread has its own client (chDB serialises calls per client, so one client
per thread keeps queries from queueing behind the sink's inserts). /metrics and query
cancellation have a pool of their own, so they answer while heavy queries run; a user query
whose client goes away is killed (KILL QUERY by a tag in its text), not left holding a thread.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from aiohttp import web

from meterline.errors import first_line

from .auth import OPEN, Principal, TokenStore, bearer
from .live import LiveState
from .otlp import OtlpEndpoint
from .report import REPORT_NAMES, TENANT_REPORTS, ReportParams, run_report
from .store import Result

log = logging.getLogger("meterline.app.api")
WEB_DIR = Path(__file__).with_name("web")
STATIC = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "application/javascript"),
          "/style.css": ("style.css", "text/css")}
PRINCIPAL = web.RequestKey("principal", Principal)  # who sent the request (authenticate() sets it)
PUBLIC = (*STATIC, "/health")  # no data in them: a load balancer or a browser may fetch them without a token


class AuthSetupError(RuntimeError):
    """The API would be reachable from other machines without any token."""


class ApiServer:
    def __init__(self, ledger_factory: Callable[[], Any], live: LiveState | None = None, registry: Any = None,
                 health: Callable[[], dict[str, dict[str, Any]]] | None = None, host: str = "127.0.0.1", port: int = 8787,
                 query_threads: int = 2, tokens: TokenStore | None = None, settings: Any = None):
        if host not in LOOPBACK and not (tokens and tokens.configured()):
            raise AuthSetupError(f"the API would listen on {host} without a token; create one first "
                                 "(`meterline token create --name <who> --role reader`) or bind 127.0.0.1")
        self.ledger_factory = ledger_factory
        self.tokens, self.settings = tokens, settings
        self.live = live or LiveState()
        self.registry = registry
        self.health = health or (lambda: {})
        self.host, self.port = host, port
        self._local = threading.local()
        self._ledgers: list[Any] = []
        self._pool = ThreadPoolExecutor(max_workers=query_threads, thread_name_prefix="api-query")
        self._light = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-light")  # never behind a heavy query
        self._running: set[str] = set()  # tags of user queries in flight
        self.cancelled = 0  # user queries killed because their client left
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.otlp = OtlpEndpoint(settings)  # POST /v1/traces; its Meter is made on the first GenAI span
        if registry is not None:
            registry.register(self.otlp.collector())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> str:
        """Listen; a RuntimeError (caused by the OSError, e.g. the port in use) when it cannot."""
        self._thread = threading.Thread(target=self._serve, name="api", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error:
            error = self._error
            if error is not None:  # the serving thread gave up: release what setup made, so stop() has nothing to do
                self._thread.join(timeout)
                loop, runner, self._runner = self._loop, self._runner, None
                if loop is not None and not loop.is_running() and not loop.is_closed():
                    try:
                        if runner is not None:
                            loop.run_until_complete(runner.cleanup())
                    except Exception:  # noqa: BLE001 - best effort after a failed start
                        log.debug("cleanup after a failed start", exc_info=True)
                    finally:
                        loop.close()
            reason = error or f"no answer within {timeout:.0f} s"
            raise RuntimeError(f"the HTTP API could not listen on {self.host}:{self.port}: {reason}") from error
        return self.url

    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; safe after a failed start() (nothing was served) and when called twice."""
        loop, runner, self._runner = self._loop, self._runner, None
        if loop is not None and runner is not None and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout)
            except Exception:  # noqa: BLE001 - stopping anyway: the loop stops below
                log.warning("the HTTP API did not shut down cleanly within %.0f s", timeout, exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(timeout)
        self._pool.shutdown(wait=True)  # its queries were killed on shutdown (_cancel_running)
        self._light.shutdown(wait=True)
        self.otlp.close()  # delivers what the OTLP endpoint queued (or spools it)
        for ledger in self._ledgers:
            ledger.close()

    def _serve(self) -> None:
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(middlewares=[guard(self.host), authenticate(self.principal_of)])
        app.on_response_prepare.append(_harden)
        app.on_shutdown.append(self._cancel_running)
        app.add_routes([web.get(path, self._static) for path in STATIC] + [
            web.get("/health", self._health), web.get("/metrics", self._metrics),
            web.get("/api/report/{name}", self._report), web.post("/api/sql", self._sql),
            web.get("/api/live", self._live), web.get("/api/budgets", self._budgets),
            web.put("/api/budgets", self._budget_put), web.delete("/api/budgets/{policy_id}", self._budget_delete),
            web.post("/v1/traces", self._traces),
        ])
        # a client that goes away cancels its handler, and so its query (_user_query)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        try:
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            if self.port == 0:  # tests ask for any free port
                self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        except BaseException as err:  # noqa: BLE001 - reported by start()
            self._error = err
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    # ---- ledger on the pool ---------------------------------------------------------------------

    def _ledger(self) -> Any:
        ledger = getattr(self._local, "ledger", None)
        if ledger is None:
            ledger = self._local.ledger = self.ledger_factory()
            if ledger is not None:  # a page-only API (tests) has no ledger: nothing to close
                self._ledgers.append(ledger)
        return ledger

    async def _on_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _user_query(self, sql: str, parameters: dict[str, Any]) -> Result:
        """A user's SQL, killed in the engine when the client disconnects (or the API stops)."""
        tag = uuid.uuid4().hex
        self._running.add(tag)
        try:
            return await self._on_pool(lambda: self._ledger().user_query(sql, parameters, tag=tag))
        except asyncio.CancelledError:
            self.cancelled += 1
            self._light.submit(self._kill, tag)
            raise
        finally:
            self._running.discard(tag)

    def _kill(self, tag: str) -> None:
        """On the light pool, whose thread has its own client (the busy thread's is in use)."""
        try:
            self._ledger().cancel(tag)
        except Exception as err:  # noqa: BLE001 - the query still ends at its time limit
            log.warning("could not cancel query %s: %s", tag, err)

    async def _cancel_running(self, app) -> None:
        for tag in list(self._running):
            self._light.submit(self._kill, tag)

    # ---- who is asking ---------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """No token configured: anyone who reaches the (loopback) API may use it."""
        return not (self.tokens and self.tokens.configured())

    def principal_of(self, authorization: str | None) -> Principal | None:
        if self.open:
            return OPEN
        return self.tokens.verify(bearer(authorization))

    # ---- handlers -----------------------------------------------------------------------------

    async def _static(self, request):
        name, content_type = STATIC[request.path]
        return web.Response(body=(WEB_DIR / name).read_bytes(), content_type=content_type,
                            headers={"Cache-Control": "no-store"})

    async def _health(self, request):
        components = self.health()
        ok = all(c.get("running") and not c.get("stalled") for c in components.values())
        return web.json_response({"status": "ok" if ok else "degraded", "components": components}, status=200 if ok else 503)

    async def _metrics(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if request[PRINCIPAL].tenant:
            return _error(403, "/metrics covers every tenant; a tenant token reads its own reports")
        if self.registry is None:
            return web.Response(status=404, text="metrics are off")
        body = await self._on_light(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _report(self, request):
        name, tenant = request.match_info["name"], request[PRINCIPAL].tenant
        if name not in REPORT_NAMES:
            return _error(404, f"no report {name!r}; reports: {', '.join(REPORT_NAMES)}")
        q = request.query
        if tenant is not None:  # the tenant comes from the token, never from the request
            if name not in TENANT_REPORTS:
                return _error(403, f"the {name} report covers every tenant; a tenant token reads {', '.join(TENANT_REPORTS)}")
            if q.get("tenant") not in (None, "", tenant):
                return _error(403, f"this token reads tenant {tenant!r} only")
        try:
            params = ReportParams.parse(since=q.get("since"), until=q.get("until"), by=q.get("by"),
                                        tenant=q.get("tenant") if tenant is None else tenant,
                                        team=q.get("team"), project=q.get("project"), limit=q.get("limit"),
                                        gpu_idle=q.get("gpu_idle"))
        except ValueError as err:
            return _error(400, str(err))
        try:
            result: Result = await self._on_pool(lambda: run_report(self._ledger(), name, params))
        except Exception as err:  # noqa: BLE001 - the client gets the first line of the engine's message
            return _error(400, first_line(err, 500))
        return web.json_response(result.to_json())

    async def _sql(self, request):
        if request[PRINCIPAL].tenant:
            return _error(403, "a tenant token cannot run SQL (it would read every tenant); use /api/report")
        try:  # POST only, JSON only: a page on another site cannot send this without a CORS preflight
            body = await request.json() if request.content_type == "application/json" else None
            sql, parameters = body["sql"], body.get("parameters") or {}
        except (ValueError, KeyError, TypeError):
            return _error(400, 'POST JSON {"sql": "...", "parameters": {...}} with Content-Type: application/json')
        from meterline.sql.sandbox import Refused, failure

        try:
            result = await self._user_query(sql, parameters)
        except Refused as err:
            return _error(403, f"{err}; the API only reads the ledger")
        except Exception as err:  # noqa: BLE001
            return _error(400, failure(err))
        return web.json_response(result.to_json())

    async def _live(self, request):
        snapshot = self.live.snapshot(tenant=request[PRINCIPAL].tenant)
        snapshot["components"] = self.health()
        return web.json_response(snapshot)

    # ---- budgets ------------------------------------------------------------------------------

    async def _budgets(self, request):
        from .report import load_query

        tenant = request[PRINCIPAL].tenant or request.query.get("tenant", "")
        try:
            result: Result = await self._on_pool(lambda: self._ledger().query(load_query("budget_policies"), {"tenant": tenant}))
        except Exception as err:  # noqa: BLE001
            return _error(400, first_line(err, 500))
        return web.json_response(result.to_json())

    async def _budget_put(self, request):
        from meterline.allocator.budgets import publish_policy
        from meterline.schemas.events import BudgetPolicy, InvalidEvent, decode

        if (refused := self._budget_writer(request)) is not None:
            return refused
        try:
            policy = decode(BudgetPolicy, await request.read())
        except InvalidEvent as err:
            return _error(400, str(err))
        await self._on_pool(publish_policy, self.settings, policy, request[PRINCIPAL].name)
        return web.json_response(policy.model_dump(mode="json"))

    async def _budget_delete(self, request):
        from meterline.allocator.budgets import delete_policy

        if (refused := self._budget_writer(request)) is not None:
            return refused
        policy_id = request.match_info["policy_id"]
        await self._on_pool(delete_policy, self.settings, policy_id, request[PRINCIPAL].name)
        return web.json_response({"deleted": policy_id})

    def _budget_writer(self, request):
        if not request[PRINCIPAL].is_admin:
            return _error(403, "only an admin token changes budgets")
        if self.settings is None:
            return _error(503, "this API has no Kafka to publish budgets to")
        if request.method == "PUT" and request.content_type != "application/json":
            return _error(400, "PUT a BudgetPolicy as JSON with Content-Type: application/json")
        return None

    async def _traces(self, request):
        """OTLP/HTTP export: a tenant token's tenant is forced onto every event; a reader may not write."""
        return await self.otlp.handle(request, request[PRINCIPAL])

    async def _on_light(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._light, fn, *args)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
HARDENING = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
             "Cross-Origin-Resource-Policy": "same-origin",
             # scripts only from here (an injected inline script does not run); the charts set inline colours
             "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                        "frame-ancestors 'none'"}


def guard(bind_host: str):
    """Refuse what a hostile web page could make the operator's browser send: on a loopback bind, a
    Host that is not a loopback name (DNS rebinding); anywhere, an Origin other than the API's own
    (cross-site requests)."""
    loopback = bind_host in LOOPBACK

    @web.middleware
    async def middleware(request, handler):
        origin = request.headers.get("Origin")
        if loopback and urlsplit(f"//{request.host}").hostname not in LOOPBACK:
            return _error(421, f"Host {request.host!r} is not this API (it listens on loopback); use http://127.0.0.1")
        if origin is not None and origin not in (f"http://{request.host}", f"https://{request.host}"):
            return _error(403, f"cross-site request from {origin!r} refused")
        return await handler(request)

    return middleware


def authenticate(principal_of: Callable[[str | None], Principal | None]):
    """Every request but the public paths needs a principal (from its bearer token, or the open
    loopback API's); handlers find it in request[PRINCIPAL]."""
    @web.middleware
    async def middleware(request, handler):
        if request.path not in PUBLIC:
            principal = principal_of(request.headers.get("Authorization"))
            if principal is None:
                return _error(401, "a token is required: send Authorization: Bearer <token> "
                                   "(create one with `meterline token create`)", {"WWW-Authenticate": "Bearer"})
            request[PRINCIPAL] = principal
        return await handler(request)

    return middleware


async def _harden(request, response) -> None:
    """Every response, errors included, carries the usual hardening headers."""
    response.headers.update(HARDENING)


def _error(status: int, message: str, headers: dict[str, str] | None = None):
    return web.json_response({"error": message}, status=status, headers=headers)
