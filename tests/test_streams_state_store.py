"""The worker's local state store (streams/state_store.py) on a real SQLite file: rebuilt from changelog records,
damaged records reported (to dead-letter) without losing the scope's newest good state."""
from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

import pytest

from meterline.schemas import events as ev
from meterline.streams.codec import encode
from meterline.streams.spend import SpendBook, minute_key, month_of
from meterline.streams.state_store import KEY_SEP, StateStore, parked_from_update

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
MONTH = month_of(minute_key(NOW))[2]
KEY = ("acme", "session", "acme////s1")


def update(period: str, events: int, period_start: str = "2026-03-01T00:00:00+00:00") -> dict:
    return {"update_id": "0b3c5c1e-8c1f-4a57-9a63-2f1d6c0e7a11", "ts": "2026-03-10T12:00:01+00:00", "tenant_id": KEY[0],
            "scope": KEY[1], "scope_id": KEY[2], "window_start": "2026-03-10T11:59:00+00:00",
            "window_end": "2026-03-10T12:00:00+00:00", "window_cost_usd": "0.5", "period_start": period_start,
            "period_cost_usd": period, "events": events, "input_tokens": 10, "output_tokens": 2,
            "gpu_seconds": "0", "gpu_cost_usd": "0", "unpriced_events": 0, "cpu_seconds": "0"}


def record(value: dict | bytes | None, offset: int, key: tuple = KEY):
    body = value if value is None or isinstance(value, bytes) else encode(value)
    return KEY_SEP.join(key).encode(), body, 0, offset


def period_of(store: StateStore, key=KEY) -> int | None:
    parked = store.get(key)
    return None if parked is None else parked[1]


def test_the_newest_record_wins_and_tombstones_and_last_months_records_remove_the_scope():
    store, other = StateStore(), ("acme", "session", "acme////s2")
    damaged, missing = store.load([record(update("1", 1), 0), record(update("3", 3), 1),
                                   record(update("9", 9), 2, other), record(None, 3, other),
                                   record(update("7", 7, "2026-02-01T00:00:00+00:00"), 4, ("acme", "agent", "acme///bot"))], MONTH)
    assert (damaged, missing) == ([], set())
    assert period_of(store) == 3 * 10**12 and period_of(store, other) is None
    assert period_of(store, ("acme", "agent", "acme///bot")) is None  # February's total: March starts from zero


def test_a_damaged_record_is_reported_and_its_scope_keeps_the_newest_good_state():
    store = StateStore()
    bad = [b"{not json", encode({**update("5", 5), "events": -1}), encode({**update("5", 5), "period_cost_usd": "NaN"}),
           encode({**update("5", 5), "period_start": "2026-03-01T00:00:00"}), encode({k: v for k, v in update("5", 5).items() if k != "period_cost_usd"})]
    damaged, missing = store.load([record(update("2", 2), 0)] + [record(b, i + 1) for i, b in enumerate(bad)], MONTH)
    assert [d.offset for d in damaged] == [1, 2, 3, 4, 5] and all(d.key == KEY for d in damaged)
    assert all("spend-state record unreadable" in d.reason for d in damaged)
    for d, field in zip(damaged[1:], ("events", "period_cost_usd", "period_start", "period_cost_usd")):
        assert field in d.reason, d.reason  # the contract names the field
    assert missing == set()  # a good state came before: kept, not zero
    assert period_of(store) == 2 * 10**12


def test_a_damaged_newest_record_with_no_good_one_before_is_named_missing_and_a_later_good_one_clears_it():
    store = StateStore()
    damaged, missing = store.load([record(b"\xff", 0), record(b"[]", 1, ("acme", "session", "acme////s9"))], MONTH)
    assert len(damaged) == 2 and missing == {KEY, ("acme", "session", "acme////s9")}
    damaged, missing = store.load([record(b"\xff", 0), record(update("4", 4), 1)], MONTH)
    assert len(damaged) == 1 and missing == set() and period_of(store) == 4 * 10**12
    damaged, _ = store.load([(b"no-separators", b"{}", 0, 7), (None, b"{}", 0, 8)], MONTH)
    assert [d.key for d in damaged] == [None, None] and "key unreadable" in damaged[0].reason


def test_totals_beyond_64_bits_and_the_window_survive_the_round_trip():
    """A month of GPU pico-seconds passes 2^63 (~107 days of GPU time): stored as text, exact."""
    store, big = StateStore(), 3 * 2**64 + 12345
    parked = (MONTH, big, 5, 6, 7, big + 1, big + 2, 1, big + 3, minute_key(NOW), 99)
    store.put_many([(KEY, parked)])
    assert store.get(KEY) == parked
    book = SpendBook(store)
    book.add(("acme", "", "", "", "s1"), NOW, 1)
    state = book.states[KEY]
    assert (state.period, state.gpu_ps, state.window) == (big + 1, big + 1, 100)  # same minute: its window continues


def test_a_published_update_parses_to_what_the_state_held():
    book = SpendBook()
    book.add(("acme", "", "", "", "s1"), NOW, 1_234_567, 10, 2, gpu_ps=5 * 10**12, gpu_cost=7, cpu_ps=3)
    (key, snap), = [(k, u) for k, u in book.drain(NOW) if k == KEY]
    assert parked_from_update(encode(snap)) == (KEY, book.states[KEY].park())


def test_a_closed_or_dropped_store_leaves_no_file():
    store = StateStore()
    path = store.path
    store.put_many([(KEY, (MONTH, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0))])
    assert path.exists()
    del store
    assert not path.exists()


def test_every_stored_key_passes_the_filter_as_it_grows_and_most_absent_ones_do_not():
    """The Bloom filter may say yes wrongly (a lookup wasted), never no wrongly (a stored scope read as new: from zero)."""
    store = StateStore()
    keys = [("t", "session", f"s{i}") for i in range(150_000)]  # past the first filter's 65,536 keys: rebuilt twice
    for i in range(0, len(keys), 25_000):
        store.put_many((k, (MONTH, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)) for k in keys[i:i + 25_000])
    assert all(store.get(k) is not None for k in keys)
    assert store.filter.capacity >= 150_000
    false = sum(hash(("t", "session", f"x{i}")) in store.filter for i in range(20_000))
    assert false < 400, false  # ~0.5 % expected


def test_a_dead_workers_store_file_is_removed_and_a_live_ones_kept(tmp_path):
    """Files of workers killed without stopping (<group>-<pid>-<tag>.sqlite3) are a cache nobody reads again."""
    import os
    import subprocess

    from meterline.streams.worker import _remove_orphan_stores

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has exited
    dead, alive = tmp_path / f"g-{gone.pid}-ab12cd34.sqlite3", tmp_path / f"g-{os.getppid()}-ab12cd34.sqlite3"
    other_group, named = tmp_path / f"h-{gone.pid}-ab12cd34.sqlite3", tmp_path / "g-w1.sqlite3"
    for path in (dead, alive, other_group, named):
        path.write_bytes(b"")
    _remove_orphan_stores(tmp_path, "g")
    assert not dead.exists() and alive.exists() and other_group.exists() and named.exists()


BAD_BUT_WELL_FORMED = {  # each passes the msgspec mirror; the contract refuses it
    "a hidden character in the tenant": {"tenant_id": "ac\x00me"},
    "a hidden non-ASCII character in the scope id": {"scope_id": "acme////s\u200b1"},
    "a time before the ledger's years": {"window_start": "1899-12-31T23:59:00+00:00"},
    "a time with no zone": {"window_end": "2026-03-10T12:00:00"},
    "money below zero": {"period_cost_usd": "-0.000000000001"},
    "money beyond 12 places": {"gpu_cost_usd": "0.0000000000001"},
    "money beyond 16 whole digits": {"cpu_seconds": "12345678901234567.000000000000"},
    "money in exponent form": {"window_cost_usd": "1E+400"},
}


def test_the_contract_judges_a_spend_state_record_the_fast_path_would_read():
    """Fast accepts => the contract accepts: every rule the msgspec mirror cannot say is checked or left to pydantic."""
    for why, change in BAD_BUT_WELL_FORMED.items():
        raw = encode({**update("5.000000000000", 5), **change})
        with pytest.raises(ev.InvalidEvent):
            ev.decode(ev.SpendUpdate, raw)
        with pytest.raises(ev.InvalidEvent, match="|".join(change)):
            parked_from_update(raw)
            pytest.fail(why)
    good = encode(update("0.5", 5))  # not the worker's form, yet valid: the contract reads it
    assert parked_from_update(good)[1][1] == 5 * 10**11


def test_a_failed_write_leaves_the_store_as_it_was_and_usable():
    store, parked = StateStore(), (MONTH, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(sqlite3.IntegrityError):  # a key part NULL: refused mid-batch
        store.put_many([(KEY, parked), ((None, "session", "x"), parked)])
    assert len(store) == 0  # rolled back, the good row with it
    store.put_many([(KEY, parked)])  # no transaction left open
    assert store.get(KEY) == parked
