"""Real-time spend state (streams/spend.py, pure logic): idle sessions leave memory and come back whole.

Ground truth is a plain sum per (session, month) of the costs the test generated; the book is driven
the way the worker drives it (add per event; at a checkpoint drain what changed, then evict the idle).
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st

from meterline.schemas.scopes import scope_ids
from meterline.streams.spend import SpendBook, _minute, _minute_key, month_of

START = datetime(2026, 1, 31, 22, 0, tzinfo=timezone.utc)  # two hours before a month turns

steps = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 90), st.integers(1, 10**9), st.booleans()),
                 min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(steps, st.integers(1, 60))
def test_an_evicted_session_continues_its_month_to_date_totals(script, idle_minutes):
    book, now = SpendBook(), START
    truth: dict[tuple[str, str], int] = defaultdict(int)  # (session scope id, month) -> pico-USD
    for session, gap, cost, checkpoint in script:
        now += timedelta(minutes=gap)
        ids = ("acme", "", "", "bot", f"s{session}")
        sid, month = scope_ids(*ids)["session"], f"{now:%Y-%m}"
        book.add(ids, now, cost)
        truth[(sid, month)] += cost
        if checkpoint:
            list(book.drain(now))  # published: clean, so it may leave memory
            book.evict_idle(now, timedelta(minutes=idle_minutes))
    for session in {step[0] for step in script}:
        ids = ("acme", "", "", "bot", f"s{session}")
        book.add(ids, now, 0)  # it spends again (nothing): where does it stand?
        sid = scope_ids(*ids)["session"]
        assert book.states[("acme", "session", sid)].period == truth.get((sid, f"{now:%Y-%m}"), 0), sid

def test_parked_totals_of_an_old_month_are_dropped_and_a_new_month_starts_from_zero():
    book = SpendBook()
    ids = ("acme", "", "", "bot", "s1")
    key = ("acme", "session", scope_ids(*ids)["session"])
    book.add(ids, START, 5)
    list(book.drain(START))
    assert book.evict_idle(START + timedelta(hours=1, minutes=30), timedelta(hours=1)) == 2  # the agent and the session
    assert key not in book.states and book.store.get(key)[1] == 5  # out of memory, on disk
    later = START + timedelta(days=2)  # February
    book.evict_idle(later, timedelta(hours=1))
    assert len(book.store) == 0
    book.add(ids, later, 7)
    assert book.states[key].period == 7


# add_many (the worker's per-batch path: ancestors pre-aggregated per batch) against add() per row and a plain sum.
IDS = [("acme", "r", "chat", "bot", "s1"), ("acme", "r", "chat", "bot", "s2"), ("acme", "r", "chat", "bot2", "s3"),
       ("acme", "", "chat", "bot", "s4"), ("acme", "r", "", "", ""), ("globex", "", "", "bot", "s1"), ("acme", "r", "chat", "bot", "")]
FIELDS = ("period", "window", "window_key", "events", "input_tokens", "output_tokens", "unpriced", "month", "dirty")
rows_st = st.lists(st.tuples(st.integers(0, len(IDS) - 1), st.integers(-3, 200), st.integers(-5, 10**9),
                             st.integers(0, 10**6), st.integers(0, 10**5), st.integers(0, 1)), min_size=1, max_size=40)


def _state_of(book: SpendBook) -> dict:
    return {key: tuple(getattr(s, f) for f in FIELDS) for key, s in book.states.items()}


@settings(max_examples=300, deadline=None)
@given(st.lists(rows_st, min_size=1, max_size=6),
       st.one_of(st.integers(0, 24 * 60 * 40), st.integers(44_640 - 150, 44_640 + 10)))  # or near Jan's end
def test_a_batch_charged_at_once_equals_each_event_charged_in_turn(batches, offset):
    """Batches (some spanning a month's end, minutes out of order, late ones) leave add_many's book exactly where
    add() per row leaves it, and every scope's month-to-date equals the plain sum of its events in that month."""
    base = _minute_key(datetime(2026, 1, 1, tzinfo=timezone.utc)) + offset
    by_row, by_batch = SpendBook(), SpendBook()
    newest: dict[tuple, int] = {}
    truth: dict[tuple, int] = defaultdict(int)  # (scope key, month start minute) -> pico-USD, events it takes
    for batch in batches:
        rows = [(IDS[i], base + m, cost, inp, out, unp) for i, m, cost, inp, out, unp in batch]
        for ids, minute, cost, inp, out, unp in rows:
            by_row.add(ids, _minute(minute), cost, inp, out, unp, minute=minute)
        by_batch.add_many(rows)
        assert _state_of(by_batch) == _state_of(by_row)
        assert by_batch.late == by_row.late
        for ids, minute, cost, *_ in rows:
            for scope, sid in scope_ids(*ids).items():
                key, month = (ids[0], scope, sid), month_of(minute)[2]
                if month >= newest.get(key, month):  # an event of an earlier month than the scope's is the ledger's
                    newest[key] = max(newest.get(key, month), month)
                    truth[(key, month)] += cost
    for key, state in by_batch.states.items():
        assert state.period == truth[(key, state.month[2])], key


def test_ancestors_of_a_batch_are_charged_once_per_group_not_per_event():
    """Pre-aggregation is real: 500 sessions of one agent in one minute cost each ancestor level one group."""
    book, minute = SpendBook(), _minute_key(START)
    rows = [(("acme", "t", "p", "bot", f"s{i}"), minute, 10, 1, 1, 0) for i in range(500)]
    levels = []
    real = SpendBook._charge_level
    SpendBook._charge_level = staticmethod(lambda level, late: levels.append(len(level)) or real(level, late))
    try:
        book.add_many(rows)
    finally:
        SpendBook._charge_level = staticmethod(real)
    assert levels == [1, 1, 1, 1]  # agent, project, team, tenant: one (state, minute) group each
    assert book.states[("acme", "agent", "acme/t/p/bot")].period == 5000
    assert book.states[("acme", "tenant", "acme")].events == 500
