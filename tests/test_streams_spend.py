"""Real-time spend state (streams/spend.py, pure logic): idle sessions leave memory and come back whole.

Ground truth is a plain sum per (session, month) of the costs the test generated; the book is driven
the way the worker drives it (add per event; at a checkpoint drain what changed, then evict the idle).
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st

from meterline.schemas.scopes import scope_ids
from meterline.streams.spend import SpendBook

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
    assert key in book.parked
    later = START + timedelta(days=2)  # February
    book.evict_idle(later, timedelta(hours=1))
    assert book.parked == {}
    book.add(ids, later, 7)
    assert book.states[key].period == 7
