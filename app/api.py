"""The HTTP API that `meterline up` serves (aiohttp, on its own thread and event loop).

    GET  /                      the built-in dashboard (app/web/, no external assets)
    GET  /health                components, whether they run and progress (503 when one is down or stalled)
    GET  /metrics               Prometheus text
    GET  /api/report/<name>     a chargeback report (?since=&until=&by=&tenant=&team=&project=&limit=)
    POST /api/sql               {"sql": "...", "parameters": {...}} sandboxed (sql/sandbox.py), typed results
    GET  /api/live              recent spend per tenant, decisions, anomalies

Ledger queries run on a small thread pool; each pool thread has its own client (chDB
serialises calls per client, so one client per thread keeps queries from queueing
behind the sink's inserts).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from .live import LiveState
from .report import REPORT_NAMES, ReportParams, run_report
from .store import Result

log = logging.getLogger("meterline.app.api")
WEB_DIR = Path(__file__).with_name("web")
STATIC = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "application/javascript"),
          "/style.css": ("style.css", "text/css")}


class ApiServer:
    def __init__(self, ledger_factory: Callable[[], Any], live: LiveState | None = None, registry: Any = None,
                 health: Callable[[], dict[str, dict[str, Any]]] | None = None, host: str = "127.0.0.1", port: int = 8787,
                 query_threads: int = 2):
        self.ledger_factory = ledger_factory
        self.live = live or LiveState()
        self.registry = registry
        self.health = health or (lambda: {})
        self.host, self.port = host, port
        self._local = threading.local()
        self._ledgers: list[Any] = []
        self._pool = ThreadPoolExecutor(max_workers=query_threads, thread_name_prefix="api-query")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None

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
        self._pool.shutdown(wait=True)
        for ledger in self._ledgers:
            ledger.close()

    def _serve(self) -> None:
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(middlewares=[guard(self.host)])
        app.on_response_prepare.append(_harden)
        app.add_routes([web.get(path, self._static) for path in STATIC] + [
            web.get("/health", self._health), web.get("/metrics", self._metrics),
            web.get("/api/report/{name}", self._report), web.post("/api/sql", self._sql),
            web.get("/api/live", self._live),
        ])
        self._runner = web.AppRunner(app, access_log=None)
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
            self._ledgers.append(ledger)
        return ledger

    async def _on_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- handlers -----------------------------------------------------------------------------

    async def _static(self, request):
        from aiohttp import web

        name, content_type = STATIC[request.path]
        return web.Response(body=(WEB_DIR / name).read_bytes(), content_type=content_type,
                            headers={"Cache-Control": "no-store"})

    async def _health(self, request):
        from aiohttp import web

        components = self.health()
        ok = all(c.get("running") and not c.get("stalled") for c in components.values())
        return web.json_response({"status": "ok" if ok else "degraded", "components": components}, status=200 if ok else 503)

    async def _metrics(self, request):
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.registry is None:
            return web.Response(status=404, text="metrics are off")
        body = await self._on_pool(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _report(self, request):
        from aiohttp import web

        name = request.match_info["name"]
        if name not in REPORT_NAMES:
            return _error(404, f"no report {name!r}; reports: {', '.join(REPORT_NAMES)}")
        q = request.query
        try:
            params = ReportParams.parse(since=q.get("since"), until=q.get("until"), by=q.get("by"), tenant=q.get("tenant"),
                                        team=q.get("team"), project=q.get("project"), limit=q.get("limit"))
        except ValueError as err:
            return _error(400, str(err))
        try:
            result: Result = await self._on_pool(lambda: run_report(self._ledger(), name, params))
        except Exception as err:  # noqa: BLE001 - the client gets the first line of the engine's message
            return _error(400, _first_line(err))
        return web.json_response(result.to_json())

    async def _sql(self, request):
        from aiohttp import web

        try:  # POST only, JSON only: a page on another site cannot send this without a CORS preflight
            body = await request.json() if request.content_type == "application/json" else None
            sql, parameters = body["sql"], body.get("parameters") or {}
        except (ValueError, KeyError, TypeError):
            return _error(400, 'POST JSON {"sql": "...", "parameters": {...}} with Content-Type: application/json')
        from meterline.sql.sandbox import Refused

        try:
            result: Result = await self._on_pool(lambda: self._ledger().user_query(sql, parameters))
        except Refused as err:
            return _error(403, f"{err}; the API only reads the ledger")
        except Exception as err:  # noqa: BLE001
            return _error(400, _first_line(err))
        return web.json_response(result.to_json())

    async def _live(self, request):
        from aiohttp import web

        snapshot = self.live.snapshot()
        snapshot["components"] = self.health()
        return web.json_response(snapshot)


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
    from aiohttp import web

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


async def _harden(request, response) -> None:
    """Every response, errors included, carries the usual hardening headers."""
    response.headers.update(HARDENING)


def _error(status: int, message: str):
    from aiohttp import web

    return web.json_response({"error": message}, status=status)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines() or [type(err).__name__])[0][:500]
