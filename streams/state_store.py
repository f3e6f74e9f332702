"""The stream worker's local state store: idle spend scopes on disk, out of process memory (issue 17 item 3).

Kafka Streams' and Faust's table design: a local store backed by a compacted changelog. The changelog
(`spend-state`) stays the durable source; this store is a cache of it that a worker rebuilds at start and on a
rebalance (`load`: a fresh disk loses nothing), and where `SpendBook.evict_idle` moves scopes idle longer than
the worker's `session_idle`. A scope that spends again is read back (`get`) with its month-to-date totals.

Why SQLite (stdlib, one file per worker): the stdlib's other on-disk maps are missing here (dbm.gnu/ndbm are
not built into this Python) or keep their whole index in memory (dbm.dumb); SQLite's memory is its page
cache (`streams_state_cache_mib`, 16 MiB by default) whatever the row count, and a read back is one indexed
lookup (BENCHMARKS.md, "Issue 17 (session 8): age-out": µs per returning scope). Durability is not asked of it
(journal and fsync off): a crash loses a cache that the next start rebuilds from the changelog.

A row is one scope's `ScopeSpend.park()` tuple: (month start minute, period, events, input tokens, output
tokens, GPU ps, GPU cost, unpriced, CPU ps, window minute, window cost), integers of any size (pico-USD may
pass 2^63: kept as decimal text, the month as an integer column for the month turn's delete).
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from meterline.schemas import events as ev

from . import spend  # minute_key, month_of at call time (spend imports this module)
from .codec import fast_struct, to_pico

Parked = tuple[int, ...]
ScopeKey = tuple[str, str, str]
CHUNK = 10_000  # changelog records per write transaction while loading
KEY_SEP = "\x1f"  # spend-state keys: tenant, scope and scope id joined by it (the worker writes them)


class Damaged(NamedTuple):
    """A changelog record that could not be read (dead-lettered by the worker)."""
    key: ScopeKey | None  # None when the key itself is unreadable
    partition: int
    offset: int
    raw_key: bytes | None
    value: bytes | None
    reason: str


class StateStore:
    """Parked spend scopes of one worker in an SQLite file (a private temporary file when `path` is None)."""

    def __init__(self, path: Path | str | None = None, cache_mib: int = 16) -> None:
        if path is None:
            fd, path = tempfile.mkstemp(prefix="meterline-spend-", suffix=".sqlite3")
            os.close(fd)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.path, Path(f"{self.path}-journal")):  # a cache of the changelog: always rebuilt
            stale.unlink(missing_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute(f"PRAGMA cache_size=-{int(cache_mib) * 1024}")
        self.db.execute("CREATE TABLE scopes (tenant TEXT, scope TEXT, scope_id TEXT, month INTEGER, totals TEXT, "
                        "PRIMARY KEY (tenant, scope, scope_id)) WITHOUT ROWID")
        self.empty = True  # nothing ever put: the hot path's new scopes skip the lookup (a fresh worker)
        self.filter = Bloom()  # which keys may be stored: a new scope (not stored) skips the ~20 µs SQLite lookup
        self._closed = weakref.finalize(self, _close, self.db, self.path)  # a store dropped unclosed leaves no file

    def get(self, key: ScopeKey) -> Parked | None:
        if hash(key) not in self.filter:
            return None
        row = self.db.execute("SELECT month, totals FROM scopes WHERE tenant=? AND scope=? AND scope_id=?", key).fetchone()
        return None if row is None else (row[0], *map(int, row[1].split(",")))

    def put_many(self, items: Iterable[tuple[ScopeKey, Parked]]) -> int:
        rows = [(*key, parked[0], ",".join(map(str, parked[1:]))) for key, parked in items]
        if rows:
            with self._transaction():
                self.db.executemany("INSERT OR REPLACE INTO scopes VALUES (?, ?, ?, ?, ?)", rows)
            self.empty = False
            if not self.filter.add_all(hash(row[:3]) for row in rows):  # outgrown: a bigger one, of every stored key
                self.filter = Bloom(len(self))
                self.filter.add_all(hash(key) for key in self.keys())
        return len(rows)

    def delete_many(self, keys: Iterable[ScopeKey]) -> None:
        with self._transaction():
            self.db.executemany("DELETE FROM scopes WHERE tenant=? AND scope=? AND scope_id=?", list(keys))

    def drop_months_before(self, month: int) -> int:
        """The month turn: last month's scopes are never read again (a new month starts from zero)."""
        return self.db.execute("DELETE FROM scopes WHERE month < ?", (month,)).rowcount

    def drop_tenants(self, tenants: Iterable[str]) -> None:
        """Tenants whose partitions moved to another worker (their new owner reads the changelog)."""
        with self._transaction():
            self.db.executemany("DELETE FROM scopes WHERE tenant=?", [(t,) for t in tenants])

    def clear(self) -> None:
        self.db.execute("DELETE FROM scopes")
        self.empty, self.filter = True, Bloom()

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM scopes").fetchone()[0]

    def keys(self) -> list[ScopeKey]:
        return self.db.execute("SELECT tenant, scope, scope_id FROM scopes").fetchall()

    def close(self) -> None:
        self._closed()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """executemany in one transaction (autocommit would sync per row)."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------ the changelog
    def load(self, records: Iterable[tuple[bytes | None, bytes | None, int, int]], month: int) -> tuple[list[Damaged], set[ScopeKey]]:
        """Rebuild from changelog records (key, value, partition, offset), oldest first, for the month starting at
        minute `month`. The newest readable record of a scope wins; a tombstone or a record of an earlier month
        removes it; an unreadable one is returned (to dead-letter) and leaves the scope at its newest good state
        read so far. Returns (damaged records, scopes whose newest record was damaged and no good one was seen)."""
        self.clear()
        damaged: list[Damaged] = []
        unsure: set[ScopeKey] = set()  # newest record damaged: known good only if one came before it
        pending: dict[ScopeKey, Parked | None] = {}
        for raw_key, value, partition, offset in records:
            try:
                key = tuple(raw_key.decode().split(KEY_SEP, 2))  # type: ignore[union-attr]
                if len(key) != 3 or not all(key):
                    raise ValueError(f"a spend-state key is tenant, scope and scope id joined by \\x1f, not {raw_key!r}")
            except (AttributeError, UnicodeDecodeError, ValueError) as exc:
                damaged.append(Damaged(None, partition, offset, raw_key, value, f"spend-state key unreadable: {exc}"))
                continue
            if value is None:
                pending[key] = None  # type: ignore[index]
                unsure.discard(key)  # type: ignore[arg-type]
            else:
                try:
                    parked = parked_from_update(value)[1]
                except Exception as exc:  # noqa: BLE001 - any unreadable record is that record's (dead-lettered)
                    damaged.append(Damaged(key, partition, offset, raw_key, value,  # type: ignore[arg-type]
                                           f"spend-state record unreadable ({type(exc).__name__}: {' '.join(str(exc).split())})"))
                    unsure.add(key)  # type: ignore[arg-type]
                    continue
                pending[key] = parked if parked[0] >= month else None  # type: ignore[index]
                unsure.discard(key)  # type: ignore[arg-type]
            if len(pending) >= CHUNK:
                self._apply(pending)
        self._apply(pending)
        return damaged, {key for key in unsure if self.get(key) is None}

    def _apply(self, pending: dict[ScopeKey, Parked | None]) -> None:
        self.delete_many(k for k, v in pending.items() if v is None)
        self.put_many((k, v) for k, v in pending.items() if v is not None)
        pending.clear()


class Bloom:
    """A Bloom filter of key hashes (Python's hash: in-process only, like the store): 16 bits and 3 probes per
    key, ~0.5 % false positives (each costs one lookup that finds nothing); 2 MiB per million stored scopes
    instead of a set's ~60 MiB. Deletes leave their bits (false positives only); the filter doubles and is
    rebuilt from the store when it holds more keys than it was sized for."""

    __slots__ = ("bits", "mask", "capacity", "count")

    def __init__(self, keys: int = 0) -> None:
        capacity = 1 << 16
        while capacity < 2 * keys:
            capacity *= 2
        self.capacity, self.count = capacity, 0
        self.bits = bytearray(capacity * 2)  # 16 bits per key
        self.mask = capacity * 16 - 1  # capacity is a power of two

    def __contains__(self, h: int) -> bool:
        bits, mask, h2 = self.bits, self.mask, (h >> 32) | 1
        for i in range(3):
            index = (h + i * h2) & mask
            if not bits[index >> 3] & (1 << (index & 7)):
                return False
        return True

    def add_all(self, hashes: Iterable[int]) -> bool:
        """Add; False when it now holds more keys than it was sized for (the caller makes a bigger one)."""
        bits, mask = self.bits, self.mask
        for h in hashes:
            h2 = (h >> 32) | 1
            for i in range(3):
                index = (h + i * h2) & mask
                bits[index >> 3] |= 1 << (index & 7)
            self.count += 1
        return self.count <= self.capacity


def _close(db: sqlite3.Connection, path: Path) -> None:
    db.close()
    path.unlink(missing_ok=True)


def parked_from_update(raw: bytes) -> tuple[ScopeKey, Parked]:
    """A published SpendUpdate (JSON) as (scope key, park() tuple). The contract (schemas.events.SpendUpdate)
    judges it: the worker's own form passes the msgspec mirror generated from the contract (fields, types,
    count bounds) and the checks of _fast_money; anything else goes to pydantic, which accepts it or raises
    naming the field (a damaged record must not pass as a state)."""
    try:
        update = _decode_update(raw)
        money = _fast_money(update)
    except (msgspec.ValidationError, msgspec.DecodeError):
        money = None
    if money is None:
        update = ev.decode(ev.SpendUpdate, raw)
        money = [to_pico(getattr(update, name)) for name in MONEY_FIELDS]
    month = spend.minute_key(update.period_start)
    if spend.month_of(month)[2] != month:
        raise ValueError(f"period_start {update.period_start} is not the start of a month")
    return (update.tenant_id, update.scope, update.scope_id), (
        month, money[1], update.events, update.input_tokens, update.output_tokens, money[2], money[3],
        update.unpriced_events, money[4], spend.minute_key(update.window_start), money[0])


def _fast_money(u: Any) -> list[int] | None:
    """The money fields in pico-USD when what the mirror cannot say holds in the worker's own form, else None:
    visible ASCII ids (isprintable is exactly the contract's hidden-character rule within ASCII:
    tests/test_streams_codec.py), times with a zone within the ledger's years, money as codec.usd writes it
    (12 places, no sign, no leading zero, within the contract's digits). ts's not-in-the-future rule is left
    out: a restore reads a state after it was written, and a writer's clock ahead must not lose it."""
    if not (u.tenant_id.isascii() and u.tenant_id.isprintable() and u.scope_id.isascii() and u.scope_id.isprintable()):
        return None
    for ts in (u.ts, u.window_start, u.window_end, u.period_start):
        if ts.tzinfo is None or not ev.LEDGER_YEARS[0] < ts.year < ev.LEDGER_YEARS[1]:
            return None
    money = []
    for name in MONEY_FIELDS:
        text = getattr(u, name)
        if type(text) is not str:
            return None
        whole, _, frac = text.partition(".")
        digits = whole + frac
        if (len(frac) != 12 or not (digits.isascii() and digits.isdigit()) or len(whole) > WHOLE_DIGITS
                or (whole[:1] == "0" and whole != "0")):
            return None
        money.append(int(digits))
    return money


MONEY_FIELDS = ("window_cost_usd", "period_cost_usd", "gpu_seconds", "gpu_cost_usd", "cpu_seconds")
WHOLE_DIGITS = ev.MONEY_DIGITS - ev.MONEY_PLACES
_decode_update = msgspec.json.Decoder(fast_struct(ev.SpendUpdate)).decode
