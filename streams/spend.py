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
import logging

from meterline.schemas.events import new_id
from meterline.schemas.scopes import scope_ids

from .anomalies import minute_datetime, second_of
from .codec import month_start, next_month, usd
from .state_store import StateStore

MINUTE = timedelta(minutes=1)
ScopeKey = tuple[str, str, str]  # (tenant_id, scope, scope_id)
Row = tuple[tuple[str, str, str, str, str], int, int, int, int, int]  # add_many: (ids, minute, cost, input, output, unpriced)
log = logging.getLogger("meterline.streams")


def minute_key(ts: datetime) -> int:
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


Month = tuple[datetime, datetime, int, int]  # (start, end, start minute key, end minute key)
_MONTHS: dict[int, Month] = {}  # minute key -> its month, one shared tuple per month (states point at it)
_MONTH_OF: dict[int, Month] = {}


def month_of(key: int) -> Month:
    """The calendar month of a minute key, shared by every state in it (raises at the calendar's end)."""
    month = _MONTH_OF.get(key)
    if month is None:
        start = month_start(_minute(key))
        first = minute_key(start)
        month = _MONTHS.get(first)
        if month is None:
            end = next_month(start)
            month = _MONTHS[first] = (start, end, first, minute_key(end))
        if len(_MONTH_OF) > 100_000:
            _MONTH_OF.clear()
        month = _MONTH_OF[key] = month
    return month


# a scope's month-to-date totals: what an idle scope keeps (parked) when its state leaves memory
TOTALS = ("period", "events", "input_tokens", "output_tokens", "gpu_ps", "gpu", "unpriced", "cpu_ps")


class ScopeSpend:
    """One scope's state; minutes are integer keys (second_of(ts) // 60) on the hot path. Compact (a million
    sessions must fit in a few hundred MB): the month is a shared tuple, the window's datetime comes from the
    minute cache, `up` is the tuple of ancestor states (shared by siblings: one per agent, not per session)."""

    __slots__ = ("period", "window", "events", "input_tokens", "output_tokens", "gpu_ps", "gpu", "unpriced", "cpu_ps",
                 "dirty", "window_key", "month", "up", "lineage")

    def __init__(self, minute: datetime | int) -> None:
        key = minute if type(minute) is int else minute_key(minute)
        self.period = self.window = self.events = self.input_tokens = self.output_tokens = 0
        self.gpu_ps = self.gpu = self.unpriced = self.cpu_ps = 0
        self.dirty = True
        self.month = month_of(key)
        self.window_key = key
        self.up: tuple[ScopeSpend, ...] = ()
        self.lineage: tuple[ScopeSpend, ...] | None = None  # up + (self,): the `up` of its children, made once

    # the datetimes the snapshot and eviction read (computed: not stored per state)
    window_start = property(lambda self: _minute(self.window_key))
    last_ts = window_start
    period_start = property(lambda self: self.month[0])
    period_end = property(lambda self: self.month[1])
    period_start_key = property(lambda self: self.month[2])
    period_end_key = property(lambda self: self.month[3])

    def park(self) -> tuple[int, ...]:
        """Its month, month-to-date totals and window as one row of the state store (streams/state_store.py)."""
        return (self.month[2], *(getattr(self, name) for name in TOTALS), self.window_key, self.window)

    def unpark(self, parked: tuple[int, ...]) -> None:
        """Continue from parked totals (same month only: a new month starts from zero), and from the parked
        window when it is this state's minute (a restart within the minute it was published)."""
        if parked[0] == self.month[2]:
            for name, value in zip(TOTALS, parked[1:]):
                setattr(self, name, value)
            if parked[-2] == self.window_key:
                self.window = parked[-1]


@lru_cache(maxsize=4096)  # only on a chain miss (a new session): small, or it holds 5 path strings per session
def path_ids(ids: tuple[str, str, str, str, str]) -> tuple[tuple[str, str], ...]:
    """(scope, path id) of every level an event belongs to: the allocator's ids
    (`acme/research/chat/bot/s-42`), so a spend update names all of its ancestors."""
    return tuple(scope_ids(*ids).items())


def _charge_group(level: dict, late: int) -> tuple[dict, int]:
    """THE charge: add each (state, minute) of one level its group's sums and return the groups of their parents
    (one level up), and `late` plus the records left to the ledger. add() (one group per level), add_many's ancestor
    levels (agents ... tenants, each state once per minute) and the late path are all this; add_many charges its
    deepest level inline, the same lines (a pass over one group per row costs ~1 µs an event).

    A group is [cost, events, input, output, unpriced] (usage, merged with its siblings' sums) or those plus
    [gpu_ps, gpu_cost, cpu_ps, records] (add(): one record, never merged). A minute of an earlier month than the
    state's is not charged to it (`late`: counted per record and state) but still goes up: each ancestor decides
    for itself. Exact in any order within one calendar month (window = the newest minute's sum, period = the sum)."""
    above: dict = {}
    roll = SpendBook._roll
    for (state, minute), group in level.items():
        if minute >= state.month[2]:  # charged (a state's window is never before its month's start)
            if minute == state.window_key:
                state.window += group[0]
            elif minute > state.window_key:
                roll(state, minute)
                state.window += group[0]
            # else an earlier minute of this month: counts toward the period, not the current window
            state.period += group[0]
            state.events += group[1]
            state.input_tokens += group[2]
            state.output_tokens += group[3]
            if group[4]:
                state.unpriced += group[4]
            if len(group) > 5:  # add(): GPU and CPU
                state.gpu_ps += group[5]
                state.gpu += group[6]
                state.cpu_ps += group[7]
            state.dirty = True
        else:  # rare: an earlier month than the state's
            late += group[8] if len(group) > 5 else group[1]
        up = state.up
        if up:
            key = (up[-1], minute)
            parent = above.get(key)
            if parent is None:
                above[key] = group  # reused: this level's dict is dropped after the loop
            else:  # usage groups only (add() has one group per level)
                parent[0] += group[0]
                parent[1] += group[1]
                parent[2] += group[2]
                parent[3] += group[3]
                parent[4] += group[4]
    return above, late


class SpendBook:
    """Spend state of every active scope of the tenants this worker owns."""

    def __init__(self, store: StateStore | None = None) -> None:
        self.states: dict[ScopeKey, ScopeSpend] = {}
        # scopes not in memory: the changelog's (loaded by the worker) and the idle ones evict_idle moved there;
        # made at the first eviction when not given (a private temporary file)
        self.store = store
        self._parked_month = 0
        self.late = 0
        self.chains: dict[tuple[str, str, str, str, str], ScopeSpend] = {}  # ids -> its deepest state (.up: the rest)

    def _state(self, key: ScopeKey, minute: int) -> ScopeSpend:
        """A scope new to memory: continues from the store's copy (evicted idle, or the changelog's) if any."""
        state = ScopeSpend(minute)
        store = self.store
        if store is not None and not store.empty:
            parked = store.get(key)
            if parked is not None:
                state.unpark(parked)
        self.states[key] = state
        return state

    def add(self, ids: tuple[str, str, str, str, str], ts: datetime, cost: int, input_tokens: int = 0,
            output_tokens: int = 0, unpriced: int = 0, gpu_ps: int = 0, gpu_cost: int = 0, events: int = 1,
            minute: int | None = None, cpu_ps: int = 0) -> None:
        """Add one event (or GPU interval) to every scope of ids = (tenant, team, project, agent, session);
        `minute` = second_of(ts) // 60 when the caller has it already."""
        if minute is None:
            minute = minute_key(ts)
        month_of(minute)  # the one thing that can fail (the calendar's end): before any scope is charged
        leaf = self.chains.get(ids) or self._chain(ids, minute)
        level, late = {(leaf, minute): [cost, events, input_tokens, output_tokens, unpriced, gpu_ps, gpu_cost, cpu_ps, 1]}, 0
        while level:
            level, late = _charge_group(level, late)
        self.late += late

    def add_many(self, rows: list[Row]) -> None:
        """Usage events of one consumed batch, in consume order: (ids, minute, cost, input, output, unpriced).

        Same state as add() per row (tests/test_streams_spend.py checks both against a record-by-record model),
        cheaper: the deepest scope of each row is charged inline, then each level of ancestors once per (state,
        minute) with the sums of its children's groups (_charge_group). Exact because
        within one calendar month a scope's end state does not depend on the order of its events (window =
        the newest minute's sum, period = the sum); a batch that spans months takes add() per row."""
        if not rows:
            return
        low = high = rows[0][1]
        for row in rows:
            minute = row[1]
            if minute < low:
                low = minute
            elif minute > high:
                high = minute
        if month_of(low) is not month_of(high):
            for ids, minute, cost, input_tokens, output_tokens, unpriced in rows:
                self.add(ids, _minute(minute), cost, input_tokens, output_tokens, unpriced, minute=minute)
            return
        chains, chain, level, late = self.chains, self._chain, {}, 0
        # the deepest level inline: the same charge as _charge_group's, without a pass over one group per row (~1 µs an
        # event less in the stage A/B, BENCHMARKS.md session 8); each row then joins its parent's group
        for ids, minute, cost, input_tokens, output_tokens, unpriced in rows:
            leaf = chains.get(ids) or chain(ids, minute)
            if minute >= leaf.month[2]:
                if leaf.window_key == minute:
                    leaf.window += cost
                elif minute > leaf.window_key:
                    self._roll(leaf, minute)
                    leaf.window += cost
                leaf.period += cost
                leaf.events += 1
                leaf.input_tokens += input_tokens
                leaf.output_tokens += output_tokens
                if unpriced:
                    leaf.unpriced += unpriced
                leaf.dirty = True
            else:  # an earlier month than this scope's: left to the ledger; its ancestors decide for themselves
                late += 1
            if leaf.up:
                key = (leaf.up[-1], minute)
                group = level.get(key)
                if group is None:
                    level[key] = [cost, 1, input_tokens, output_tokens, unpriced]
                else:
                    group[0] += cost
                    group[1] += 1
                    group[2] += input_tokens
                    group[3] += output_tokens
                    group[4] += unpriced
        while level:  # one level up at a time: agents, projects, teams, tenants, each charged once per minute
            level, late = _charge_group(level, late)
        self.late += late

    def _chain(self, ids: tuple[str, str, str, str, str], minute_key: int) -> ScopeSpend:
        """The deepest state of ids, its `up` linked to its ancestors' states (created at that minute when new);
        cached until a state is dropped."""
        tenant, states, up = ids[0], self.states, ()
        state = None
        for scope, scope_id in path_ids(ids):
            if state is not None:  # the previous level is a parent: its lineage is our `up` (made once, shared)
                if state.lineage is None:
                    state.lineage = up + (state,)
                up = state.lineage
            key = (tenant, scope, scope_id)
            state = states.get(key)
            if state is None:
                state = self._state(key, minute_key)
            if state.up != up:  # new, or an ancestor was evicted and made again
                state.up, state.lineage = up, None
        if len(self.chains) > 2_000_000:  # bounded; evictions clear it too
            self.chains.clear()
        self.chains[ids] = state  # type: ignore[assignment]
        return state  # type: ignore[return-value]

    @staticmethod
    def _roll(state: ScopeSpend, key: int) -> None:
        """Move a state to a newer minute (and a new month when it crossed one)."""
        if key >= state.month[3]:
            state.month = month_of(key)
            state.period = state.events = state.input_tokens = state.output_tokens = 0
            state.gpu_ps = state.gpu = state.unpriced = state.cpu_ps = 0
        state.window_key = key
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
        """Move clean session/agent states idle longer than `idle` out of memory to the store (bounded memory:
        they come back with their totals when they spend again); returns how many. Clean = published at a
        checkpoint that the producer flushed, so the changelog holds the same state (what a rebuild reads)."""
        store = self.store = self.store if self.store is not None else StateStore()
        month = minute_key(month_start(stream_now))
        if month != self._parked_month:  # a new month: last month's scopes are never needed again
            store.drop_months_before(month)
            self._parked_month = month
        cutoff = stream_now - idle  # idle: last_ts (its window's minute) < cutoff, compared as minute keys
        last = minute_key(cutoff) - (_minute(minute_key(cutoff)) == cutoff)
        states = self.states
        stale = [k for k, s in states.items() if k[1] in scopes and not s.dirty and s.window_key <= last]
        dead = {id(states[key]) for key in stale}
        store.put_many((key, states.pop(key).park()) for key in stale)
        if dead:  # forget the cached chains that reach a dropped state (_chain links a new one)
            self.chains = {ids: leaf for ids, leaf in self.chains.items()
                           if id(leaf) not in dead and not any(id(s) in dead for s in leaf.up)}
        return len(stale)

    def drop_tenants(self, tenants: set[str]) -> None:
        """Forget the state of tenants whose partitions moved to another worker (memory and store: the new
        owner reads the changelog, and this worker reads it again if they come back)."""
        for key in [k for k in self.states if k[0] in tenants]:
            del self.states[key]
        if self.store is not None and tenants:
            self.store.drop_tenants(tenants)
        self.chains.clear()
