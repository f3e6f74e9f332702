"""Real-time spend per scope: period-to-date (UTC calendar month) and 1-minute windows.

Pure state, driven by event time; the worker feeds it and writes what changed. Money is
integer pico-USD (exact; 12 decimals like the ledger), GPU time integer pico-seconds.

Semantics of one scope's state (and of the SpendUpdate it becomes):
- window = the UTC minute of the newest event seen for the scope; window_cost_usd is the
  spend inside it. An event for an earlier minute of the same month counts toward the
  period only; an event from an earlier month is left to the ledger (counted in `late`).
- period = the UTC calendar month; period_cost_usd = tokens + tools + GPU, month-to-date.
- events, input_tokens, output_tokens, gpu_seconds, gpu_cost_usd, unpriced_events, cpu_seconds are
  month-to-date too (gpu_cost_usd is the GPU share of period_cost_usd; cpu_seconds the CPU time of
  compute samples, what a vCPU-hour budget counts).
- Scopes: tenant, team, project, agent, session; scope ids are qualified by tenant_id;
  empty ids (no team, ...) are skipped.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from datetime import datetime, timedelta, timezone
from typing import Any

from meterline.schemas.events import new_id
from meterline.schemas.scopes import scope_ids

from .anomalies import minute_datetime, second_of
from .codec import month_start, next_month, usd

MINUTE = timedelta(minutes=1)
ScopeKey = tuple[str, str, str]  # (tenant_id, scope, scope_id)


def _minute_key(ts: datetime) -> int:
    """Integer UTC minute of ts."""
    return second_of(ts if ts.tzinfo is timezone.utc else ts.astimezone(timezone.utc)) // 60


_MINUTES: dict[int, datetime] = {}


def _minute(key: int) -> datetime:
    """The UTC datetime of a minute key (cached: every scope rolls to the same few minutes)."""
    minute = _MINUTES.get(key)
    if minute is None:
        if len(_MINUTES) > 10_000:
            _MINUTES.clear()
        minute = _MINUTES[key] = minute_datetime(key, timezone.utc)
    return minute


# a scope's month-to-date totals: what an idle scope keeps (parked) when its state leaves memory
TOTALS = ("period", "events", "input_tokens", "output_tokens", "gpu_ps", "gpu", "unpriced", "cpu_ps")


class ScopeSpend:
    """One scope's state; minutes are integer keys (second_of(ts) // 60) on the hot path."""

    __slots__ = ("period_start", "period_end", "period", "window_start", "window", "events", "input_tokens",
                 "output_tokens", "gpu_ps", "gpu", "unpriced", "dirty", "last_ts", "window_key", "period_start_key",
                 "period_end_key", "cpu_ps")

    def __init__(self, minute: datetime) -> None:
        self.period = self.window = self.events = self.input_tokens = self.output_tokens = 0
        self.gpu_ps = self.gpu = self.unpriced = self.cpu_ps = 0
        self.dirty = True
        self._set_window(minute, _minute_key(minute))
        self._set_period(minute)

    def _set_window(self, minute: datetime, key: int) -> None:
        self.window_start = self.last_ts = minute
        self.window_key = key

    def _set_period(self, minute: datetime) -> None:
        self.period_start = month_start(minute)
        self.period_end = next_month(self.period_start)
        self.period_start_key, self.period_end_key = _minute_key(self.period_start), _minute_key(self.period_end)

    def park(self) -> tuple[int, ...]:
        """Its month and month-to-date totals as one small tuple (~a tenth of the state's memory)."""
        return (self.period_start_key, *(getattr(self, name) for name in TOTALS))

    def unpark(self, parked: tuple[int, ...]) -> None:
        """Continue from parked totals (same month only: a new month starts from zero)."""
        if parked[0] == self.period_start_key:
            for name, value in zip(TOTALS, parked[1:]):
                setattr(self, name, value)

    def restore(self, update: dict[str, Any]) -> None:
        """Continue from the last state this scope published (same period only)."""
        from .codec import to_pico
        from decimal import Decimal

        self.period = to_pico(Decimal(update["period_cost_usd"]))
        self.events = int(update["events"])
        self.input_tokens = int(update["input_tokens"])
        self.output_tokens = int(update["output_tokens"])
        self.gpu_ps = to_pico(Decimal(update["gpu_seconds"]))
        self.gpu = to_pico(Decimal(update["gpu_cost_usd"]))
        self.unpriced = int(update["unpriced_events"])
        self.cpu_ps = to_pico(Decimal(update.get("cpu_seconds", "0")))  # absent in updates written before vCPU-hours
        window = datetime.fromisoformat(update["window_start"])
        if window == self.window_start:
            self.window = to_pico(Decimal(update["window_cost_usd"]))


@lru_cache(maxsize=200_000)
def path_ids(ids: tuple[str, str, str, str, str]) -> tuple[tuple[str, str], ...]:
    """(scope, path id) of every level an event belongs to: the allocator's ids
    (`acme/research/chat/bot/s-42`), so a spend update names all of its ancestors."""
    return tuple(scope_ids(*ids).items())


class SpendBook:
    """Spend state of every active scope of the tenants this worker owns."""

    def __init__(self, baseline: dict[ScopeKey, dict[str, Any]] | None = None) -> None:
        self.states: dict[ScopeKey, ScopeSpend] = {}
        self.baseline = baseline or {}  # last published state per scope (from the changelog)
        self.parked: dict[ScopeKey, tuple[int, ...]] = {}  # idle scopes evicted from memory, by evict_idle
        self._parked_month = 0
        self.late = 0
        self.chains: dict[tuple[str, str, str, str, str], tuple[ScopeSpend, ...]] = {}  # ids -> states of its 5 scopes

    def _state(self, key: ScopeKey, minute: datetime) -> ScopeSpend:
        state = ScopeSpend(minute)
        parked, restored = self.parked.pop(key, None), self.baseline.pop(key, None)
        if parked:  # newer than the changelog's copy: this worker evicted it after restoring
            state.unpark(parked)
        elif restored and datetime.fromisoformat(restored["period_start"]) == state.period_start:
            state.restore(restored)
        self.states[key] = state
        return state

    def add(self, ids: tuple[str, str, str, str, str], ts: datetime, cost: int, input_tokens: int = 0,
            output_tokens: int = 0, unpriced: int = 0, gpu_ps: int = 0, gpu_cost: int = 0, events: int = 1,
            minute: int | None = None, cpu_ps: int = 0) -> None:
        """Add one event (or GPU interval) to every scope of ids = (tenant, team, project, agent, session);
        `minute` = second_of(ts) // 60 when the caller has it already."""
        if minute is None:
            minute = _minute_key(ts)
        chain = self.chains.get(ids)
        if chain is None:
            chain = self._chain(ids, minute)
        for state in chain:
            if state.window_key != minute:
                if minute > state.window_key:
                    self._roll(state, minute)
                    state.window += cost
                elif minute < state.period_start_key:
                    self.late += 1  # an earlier month: left to the ledger
                    continue
                # else an earlier minute of this month: counts toward the period, not the current window
            else:
                state.window += cost
            state.period += cost
            state.events += events
            state.input_tokens += input_tokens
            state.output_tokens += output_tokens
            if unpriced or gpu_ps or gpu_cost:
                state.unpriced += unpriced
                state.gpu_ps += gpu_ps
                state.gpu += gpu_cost
            if cpu_ps:
                state.cpu_ps += cpu_ps
            state.dirty = True

    def _chain(self, ids: tuple[str, str, str, str, str], minute_key: int) -> tuple[ScopeSpend, ...]:
        """The states of every scope of ids (created at that minute when new); cached until a state is dropped."""
        tenant, states, minute = ids[0], self.states, None
        chain = []
        for scope, scope_id in path_ids(ids):
            key = (tenant, scope, scope_id)
            state = states.get(key)
            if state is None:
                minute = minute or _minute(minute_key)
                state = self._state(key, minute)
            chain.append(state)
        if len(self.chains) > 500_000:  # bounded; evictions clear it too
            self.chains.clear()
        chain = self.chains[ids] = tuple(chain)
        return chain

    @staticmethod
    def _roll(state: ScopeSpend, key: int) -> None:
        """Move a state to a newer minute (and a new month when it crossed one)."""
        minute = _minute(key)
        if key >= state.period_end_key:
            state._set_period(minute)
            state.period = state.events = state.input_tokens = state.output_tokens = 0
            state.gpu_ps = state.gpu = state.unpriced = state.cpu_ps = 0
        state._set_window(minute, key)
        state.window = 0

    def drain(self, now: datetime | None = None, scopes: frozenset[str] | None = None) -> Iterator[tuple[ScopeKey, dict[str, Any]]]:
        """SpendUpdate records (JSON-ready dicts) of every scope changed since the last drain (of `scopes`)."""
        now = now or datetime.now(timezone.utc)
        for key, state in self.states.items():
            if state.dirty and (scopes is None or key[1] in scopes):
                state.dirty = False
                yield key, self.snapshot(key, state, now)

    @staticmethod
    def snapshot(key: ScopeKey, s: ScopeSpend, now: datetime) -> dict[str, Any]:
        tenant, scope, scope_id = key
        return {
            "update_id": new_id(), "ts": now, "tenant_id": tenant, "scope": scope, "scope_id": scope_id,
            "window_start": s.window_start, "window_end": s.window_start + MINUTE, "window_cost_usd": usd(s.window),
            "period_start": s.period_start, "period_cost_usd": usd(s.period), "events": s.events,
            "input_tokens": s.input_tokens, "output_tokens": s.output_tokens, "gpu_seconds": usd(s.gpu_ps),
            "gpu_cost_usd": usd(s.gpu), "unpriced_events": s.unpriced, "cpu_seconds": usd(s.cpu_ps),
        }

    def evict_idle(self, stream_now: datetime, idle: timedelta, scopes: tuple[str, ...] = ("session", "agent")) -> int:
        """Park clean session/agent states idle longer than `idle` (bounded memory: their totals stay, as a
        tuple, and come back when they spend again); returns how many."""
        month = _minute_key(month_start(stream_now))
        if month != self._parked_month:  # a new month: last month's parked totals are never needed again
            self.parked = {k: p for k, p in self.parked.items() if p[0] >= month}
            self._parked_month = month
        stale = [k for k, s in self.states.items() if k[1] in scopes and not s.dirty and stream_now - s.last_ts > idle]
        dead = set()
        for key in stale:
            state = self.states.pop(key)
            self.parked[key] = state.park()
            dead.add(id(state))
        if dead:  # forget the cached chains that reach a dropped state
            self.chains = {ids: chain for ids, chain in self.chains.items() if not any(id(s) in dead for s in chain)}
        return len(stale)

    def drop_tenants(self, tenants: set[str]) -> None:
        """Forget the state of tenants whose partitions moved to another worker."""
        for key in [k for k in self.states if k[0] in tenants]:
            del self.states[key]
        self.parked = {k: p for k, p in self.parked.items() if k[0] not in tenants}  # the new owner reads the changelog
        self.chains.clear()
