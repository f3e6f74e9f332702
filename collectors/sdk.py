"""The agent SDK: `Meter` records LLM, tool and API calls as `UsageEvent`s.

    meter = Meter(settings, tenant_id="acme", team="search", project="rag", agent_id="planner")
    meter.record_llm("openai", "gpt-4o", input_tokens=1200, output_tokens=80, latency_ms=950)

    with meter.llm_call("anthropic", "claude-sonnet-4") as call:
        reply = client.messages.create(...)
        call.usage(reply.usage.input_tokens, reply.usage.output_tokens)

    @meter.tool("web_search")
    def search(q): ...

    with meter.session("ticket-42"):
        ...                                  # events here carry session_id="ticket-42"

The caller's thread only validates and enqueues: one precompiled expression covers the
common call (plain ints, names seen before); anything it is unsure of goes through cheap
checks and then the pydantic contract, which raises `InvalidEvent` at the call site. The
sender's thread makes the UUIDv7, encodes with msgspec and produces (no I/O, no lock, no
encoding on the agent's thread). Tests prove the fast path accepts exactly what the contract
accepts (tests/test_collectors_sdk.py).
"""
from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import os
import re
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Iterator, Literal

import msgspec
import pydantic
from pydantic import TypeAdapter

from meterline.schemas import InvalidEvent, build, new_id
from meterline.schemas.events import (
    MAX_ATTRIBUTE_VALUE_LEN, MAX_ATTRIBUTES, MAX_COUNT, MAX_ID_LEN, MAX_NAME_LEN, MAX_TOKENS, PRIORITIES, Attribution,
    UsageEvent, Usd,
)
from meterline.settings import Settings

from .attribution import SessionRegistry, sessions_dir
from .sender import Sender

STATUSES = frozenset(("ok", "error", "timeout", "rate_limited", "cancelled"))
_USD = TypeAdapter(Usd)
_encode = msgspec.json.Encoder().encode
_UTC = timezone.utc
_now = datetime.now
_from_ts = datetime.fromtimestamp
_time_ns = time.time_ns
KINDS = frozenset(("tool_call", "api_call"))
_checked_names: set[str] = set()


def _name_ok(value: Any) -> bool:
    """Cheap check for provider/model/tool names; misses go to the pydantic path."""
    if type(value) is not str:
        return False
    if value in _checked_names:
        return True
    if len(value) <= MAX_NAME_LEN and value.isprintable():
        if value and len(_checked_names) < 4096:  # "" is never cached: an empty model must be rejected
            _checked_names.add(value)
        return True
    return False


def _attrs_ok(attrs: dict) -> bool:
    return len(attrs) <= MAX_ATTRIBUTES and all(
        type(v) is str and len(v) <= MAX_ATTRIBUTE_VALUE_LEN and len(k) <= MAX_ID_LEN for k, v in attrs.items()
    )


def _counts_ok(*values: Any) -> bool:
    return all(type(v) is int and 0 <= v <= MAX_TOKENS for v in values)


def encode_queued(item: tuple) -> tuple[bytes, bytes]:
    """Runs on the sender's thread: a queued call becomes (key, JSON). The event_id is made here, once;
    retries and the spool keep these bytes, so a re-sent event keeps its id."""
    (session, t_ns, kind, provider, model, tool, input_tokens, output_tokens, cache_read, cache_write, reasoning, units,
     latency_ms, status, response_bytes, cost_usd, attrs) = item
    record = session.fields.copy()
    record.update(event_id=new_id(), ts=_from_ts(t_ns / 1e9, _UTC), kind=kind, provider=provider, model=model, tool=tool,
                  input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cache_read,
                  cache_write_tokens=cache_write, reasoning_tokens=reasoning, units=units, latency_ms=latency_ms, status=status,
                  response_bytes=response_bytes, cost_usd=cost_usd, attributes=attrs or {})
    return session.key, _encode(record)


@dataclass(frozen=True)
class Session:
    """Who the events are charged to, validated once when the session starts."""

    tenant_id: str
    team: str
    project: str
    agent_id: str
    session_id: str
    priority: str
    key: bytes
    fields: dict[str, str]

    @classmethod
    def make(cls, tenant_id: str, team: str, project: str, agent_id: str, session_id: str, priority: str) -> Session:
        who = build(Attribution, tenant_id=tenant_id, team=team, project=project, agent_id=agent_id, session_id=session_id)
        if priority not in PRIORITIES:
            raise InvalidEvent("UsageEvent", [("priority", f"must be one of {', '.join(PRIORITIES)}, not {priority!r}")])
        fields = {**who.model_dump(), "priority": priority}
        return cls(**fields, key=who.tenant_id.encode(), fields=fields)

    def replace(self, **changes: str | None) -> Session:
        current = {k: self.fields[k] for k in ("tenant_id", "team", "project", "agent_id", "session_id", "priority")}
        current.update({k: v for k, v in changes.items() if v is not None})
        return Session.make(**current)


BAGGAGE_FIELDS = ("tenant_id", "team", "project", "agent_id", "session_id", "priority")


def _attach_baggage(session: Session) -> Any:
    """Make the session's attribution the current OpenTelemetry baggage (meterline.* keys; an empty field
    removes what an upstream service set). Returns the token for `_detach_baggage`."""
    from opentelemetry import baggage, context  # imported on first use: the SDK works without tracing

    ctx = context.get_current()
    for name in BAGGAGE_FIELDS:
        value = session.fields[name]
        key = "meterline." + name
        ctx = baggage.set_baggage(key, value, ctx) if value else baggage.remove_baggage(key, ctx)
    return context.attach(ctx)


def _detach_baggage(token: Any) -> None:
    from opentelemetry import context

    context.detach(token)


def _status_of(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if "ratelimit" in type(exc).__name__.lower().replace("_", ""):
        return "rate_limited"  # openai.RateLimitError, anthropic.RateLimitError, ...
    return "error"


class Meter:
    """Records usage for one agent; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        tenant_id: str,
        team: str = "",
        project: str = "",
        agent_id: str = "",
        session_id: str | None = None,
        priority: str = "normal",
        guard: Any = None,
        sender: Sender | None = None,
        register_pid: bool = True,
        **sender_options: Any,
    ):
        base = Session.make(tenant_id, team, project, agent_id, session_id or new_id(), priority)
        self.settings = settings
        self.guard = guard
        self._session: ContextVar[Session] = ContextVar(f"meterline.session.{id(self)}", default=base)
        spool_name = re.sub(r"[^A-Za-z0-9_.-]", "_", agent_id or "default")
        self.sender = sender or Sender(settings, settings.topic("usage"), settings.data_dir / "spool" / spool_name,
                                       encoder=encode_queued, **sender_options)
        self._submit = self.sender.submit
        self._registry = SessionRegistry(sessions_dir(settings.data_dir)) if register_pid else None
        self._pid = os.getpid()
        self._register(base)
        self._closed = False
        atexit.register(self.close)

    # ---- state -----------------------------------------------------------------------------

    @property
    def current(self) -> Session:
        return self._session.get()

    @property
    def dropped(self) -> int:
        """Events dropped because the queue or the spool was full (also a Prometheus counter)."""
        return self.sender.stats.dropped

    @property
    def stats(self):
        return self.sender.stats

    @contextmanager
    def session(self, session_id: str | None = None, *, agent_id: str | None = None, team: str | None = None,
                project: str | None = None, tenant_id: str | None = None, priority: str | None = None) -> Iterator[Session]:
        """Charge events inside the block to another session (a new id when none is given).

        The block also puts the session's attribution in OpenTelemetry baggage (`meterline.tenant_id`,
        `meterline.session_id`, ...), so spans started inside it, here or in a downstream service that the
        standard W3C propagators carry the context to, are metered for the same session."""
        new = self.current.replace(session_id=session_id or new_id(), agent_id=agent_id, team=team, project=project,
                                   tenant_id=tenant_id, priority=priority)
        token = self._session.set(new)
        self._register(new)
        baggage_token = _attach_baggage(new)
        try:
            yield new
        finally:
            _detach_baggage(baggage_token)
            self._session.reset(token)
            self._register(self.current)

    # ---- recording -------------------------------------------------------------------------

    def record_llm(self, provider: str, model: str, input_tokens: int = 0, output_tokens: int = 0,
                   cache_read_tokens: int = 0, cache_write_tokens: int = 0, latency_ms: int = 0, status: str = "ok",
                   cost_usd: Decimal | str | None = None, reasoning_tokens: int = 0, *, sheet: dict[str, Any] | None = None,
                   **attrs: str) -> None:
        """Record one LLM call. `input_tokens` includes cached tokens, `output_tokens` reasoning tokens;
        `cost_usd` is a provider-reported cost. `sheet` carries the rest of the price sheet, by UsageEvent field
        name (cache_write_1h_tokens, input_audio_tokens, input_image_tokens, output_audio_tokens,
        output_image_tokens, web_searches, service_tier, batch); such calls are checked by the contract."""
        if sheet:  # rare: the contract checks the subset rules and names a bad field
            return self._checked(kind="llm_call", provider=provider, model=model, input_tokens=input_tokens,
                                 output_tokens=output_tokens, cache_read_tokens=cache_read_tokens,
                                 cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens,
                                 latency_ms=latency_ms, status=status, cost_usd=cost_usd, attributes=attrs, **sheet)
        # The common case in one expression (plain ints, known names, no cost, no attributes): ~1 µs.
        if (type(input_tokens) is int and type(output_tokens) is int and type(cache_read_tokens) is int
                and type(cache_write_tokens) is int and type(latency_ms) is int
                and 0 <= cache_read_tokens and 0 <= cache_write_tokens
                and cache_read_tokens + cache_write_tokens <= input_tokens <= MAX_TOKENS
                and 0 <= output_tokens <= MAX_TOKENS and 0 <= latency_ms <= MAX_COUNT
                and type(reasoning_tokens) is int and 0 <= reasoning_tokens <= output_tokens
                and type(status) is str and status in STATUSES and cost_usd is None and not attrs
                and type(model) is str and model in _checked_names
                and type(provider) is str and (not provider or provider in _checked_names)):
            self._submit((self._session.get(), _time_ns(), "llm_call", provider, model, "", input_tokens, output_tokens,
                          cache_read_tokens, cache_write_tokens, reasoning_tokens, 1, latency_ms, status, 0, None, None))
            return
        self._record("llm_call", provider, model, "", input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                     reasoning_tokens, 1, latency_ms, status, 0, cost_usd, attrs)

    def record_tool(self, name: str, latency_ms: int = 0, status: str = "ok", response_bytes: int = 0, units: int = 1,
                    kind: Literal["tool_call", "api_call"] = "tool_call", provider: str = "",
                    cost_usd: Decimal | str | None = None, **attrs: str) -> None:
        """Record one tool call or paid API call (`units`: pages, searches, ... when it is billed per unit)."""
        self._record(kind, provider, "", name, 0, 0, 0, 0, 0, units, latency_ms, status, response_bytes, cost_usd, attrs)

    def send(self, event: UsageEvent) -> None:
        """Send an already-built event (the OpenTelemetry bridge uses this), keyed by its tenant."""
        self.sender.send(event.tenant_id.encode(), event.to_json())

    def _record(self, kind, provider, model, tool, input_tokens, output_tokens, cache_read, cache_write, reasoning, units,
                latency_ms, status, response_bytes, cost_usd, attrs) -> None:
        """Cheap checks for everything else; whatever they are unsure of goes to the contract (`_checked`)."""
        fields = dict(kind=kind, provider=provider, model=model, tool=tool, input_tokens=input_tokens,
                      output_tokens=output_tokens, cache_read_tokens=cache_read, cache_write_tokens=cache_write,
                      reasoning_tokens=reasoning, units=units, latency_ms=latency_ms, status=status, response_bytes=response_bytes,
                      cost_usd=cost_usd, attributes=attrs)
        if not (_counts_ok(input_tokens, output_tokens, cache_read, cache_write, reasoning, units)
                and cache_read + cache_write <= input_tokens and reasoning <= output_tokens
                and type(latency_ms) is int and 0 <= latency_ms <= MAX_COUNT
                and type(response_bytes) is int and 0 <= response_bytes <= MAX_COUNT
                and type(status) is str and status in STATUSES and (model if kind == "llm_call" else tool and kind in KINDS)
                and _name_ok(provider) and _name_ok(model) and _name_ok(tool) and (not attrs or _attrs_ok(attrs))):
            return self._checked(**fields)
        if cost_usd is not None:
            try:
                cost_usd = _USD.validate_python(cost_usd)
            except pydantic.ValidationError:
                return self._checked(**fields)
        self._submit((self._session.get(), _time_ns(), kind, provider, model, tool, input_tokens, output_tokens,
                      cache_read, cache_write, reasoning, units, latency_ms, status, response_bytes, cost_usd, attrs or None))

    def _checked(self, **fields: Any) -> None:
        """The slow path: the pydantic contract decides, and names the bad field."""
        session = self._session.get()
        event = build(UsageEvent, event_id=new_id(), ts=_now(_UTC), **session.fields, **fields)
        self.sender.send(session.key, event.to_json())

    # ---- timing helpers --------------------------------------------------------------------

    def llm_call(self, provider: str, model: str, **attrs: str) -> LlmCall:
        """`with meter.llm_call("openai", "gpt-4o") as call: ...; call.usage(in, out)` — times and records."""
        return LlmCall(self, provider, model, attrs)

    def tool_call(self, name: str, *, kind: Literal["tool_call", "api_call"] = "tool_call", units: int = 1, **attrs: str) -> ToolCall:
        """`with meter.tool_call("search") as call: ...; call.response_bytes = n` — times and records."""
        return ToolCall(self, name, kind, units, attrs)

    def tool(self, name: str | None = None, *, kind: Literal["tool_call", "api_call"] = "tool_call", units: int = 1) -> Callable:
        """Decorator: time every call of a (sync or async) function and record it as a tool call.

        A str/bytes return value sets response_bytes.
        """
        def decorate(fn: Callable) -> Callable:
            tool_name = name or fn.__name__
            if inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def run_async(*args, **kwargs):
                    async with self.tool_call(tool_name, kind=kind, units=units) as call:
                        return call.result(await fn(*args, **kwargs))
                return run_async

            @functools.wraps(fn)
            def run(*args, **kwargs):
                with self.tool_call(tool_name, kind=kind, units=units) as call:
                    return call.result(fn(*args, **kwargs))
            return run
        return decorate

    # ---- lifecycle -------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        return self.sender.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (or spool it) and remove this process's session registration."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.sender.close(timeout)
        if self._registry is not None:
            self._registry.unregister(self._pid)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _register(self, session: Session) -> None:
        if self._registry is not None:
            self._registry.register(self._pid, session.fields)


class _TimedCall:
    """Shared timing for the context managers; `status` may be set by the caller."""

    status: str | None = None

    def __enter__(self):
        self._t0 = time.perf_counter_ns()
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        latency_ms = (time.perf_counter_ns() - self._t0) // 1_000_000
        self._record(latency_ms, self.status or _status_of(exc))
        return False

    async def __aenter__(self):
        return self.__enter__()

    async def __aexit__(self, exc_type, exc, tb) -> Literal[False]:
        return self.__exit__(exc_type, exc, tb)


class LlmCall(_TimedCall):
    def __init__(self, meter: Meter, provider: str, model: str, attrs: dict[str, str]):
        self.meter, self.provider, self.model, self.attrs = meter, provider, model, attrs
        self.input_tokens = self.output_tokens = self.cache_read_tokens = self.cache_write_tokens = self.reasoning_tokens = 0
        self.cost_usd: Decimal | str | None = None
        self.sheet: dict[str, Any] = {}
        # The allocator's guard (allocator/guard.py) is consulted before the call: it may wait, raise
        # (throttled / over budget: nothing is recorded) or name a cheaper model, which `call.model` becomes.
        self.decision = meter.guard.check(model, priority=meter.current.priority) if meter.guard is not None else None
        if self.decision:
            self.model = self.decision

    def usage(self, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0, cache_write_tokens: int = 0,
              cost_usd: Decimal | str | None = None, reasoning_tokens: int = 0, **sheet: Any) -> None:
        """The call's usage as the provider reported it (input with its cache, output with its reasoning);
        `sheet`: the rest of the price sheet by UsageEvent field name (see Meter.record_llm)."""
        self.sheet = sheet
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.cache_read_tokens, self.cache_write_tokens, self.cost_usd = cache_read_tokens, cache_write_tokens, cost_usd
        self.reasoning_tokens = reasoning_tokens

    def _record(self, latency_ms: int, status: str) -> None:
        self.meter.record_llm(
            self.provider, self.model, self.input_tokens, self.output_tokens, self.cache_read_tokens,
            self.cache_write_tokens, latency_ms, status, self.cost_usd, self.reasoning_tokens, sheet=self.sheet, **self.attrs)


class ToolCall(_TimedCall):
    def __init__(self, meter: Meter, name: str, kind: str, units: int, attrs: dict[str, str]):
        self.meter, self.name, self.kind, self.units, self.attrs = meter, name, kind, units, attrs
        self.response_bytes = 0

    def result(self, value: Any) -> Any:
        """Pass a return value through, counting its size when it is text or bytes."""
        if isinstance(value, (bytes, bytearray)):
            self.response_bytes = len(value)
        elif isinstance(value, str):
            self.response_bytes = len(value.encode())
        return value

    def _record(self, latency_ms: int, status: str) -> None:
        self.meter.record_tool(self.name, latency_ms, status, self.response_bytes, self.units,
                                               self.kind, **self.attrs)  # type: ignore[arg-type]
