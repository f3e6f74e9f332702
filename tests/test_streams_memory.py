"""The worker's per-session state stays small (issue 17 item 3), and the compact forms say the same thing.

Pure logic (no Kafka): the dedupe window's packed copies against the tuples they stand for, a session minute's
lazy fingerprint counts against collections.Counter, and the bytes per active session against a bound
(tracemalloc, the same feed as bench.profile --memory).
"""
from __future__ import annotations

import tracemalloc
from collections import Counter
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st

from meterline.streams.anomalies import Detectors, RunawaySessions
from meterline.streams.spend import SpendBook
from meterline.streams.worker import DedupeWindow

copies = st.tuples(st.integers(-(2**63), 2**63 - 1), st.text(max_size=12), st.integers(-1, 2**15), st.integers(-1, 2**47))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**128 - 1), copies), max_size=60), st.integers(1, 40))
def test_the_window_remembers_first_copies_exactly_and_forgets_the_oldest(entries, capacity):
    window, truth = DedupeWindow(capacity), {}  # truth: a plain dict in insertion order, capped the same way
    for event_id, copy in entries:
        first = window.first(event_id, copy)
        assert first == truth.get(event_id)
        if event_id not in truth:
            truth[event_id] = copy
            if len(truth) > capacity:
                del truth[next(iter(truth))]
    assert {k: window.unpack(v) for k, v in window.ids.items()} == truth
    gone = {copy[2] for copy in truth.values()}
    window.forget_partitions(set(list(gone)[:1]))
    assert all(window.unpack(v)[2] not in list(gone)[:1] for v in window.ids.values())


def test_the_tenant_table_is_rebuilt_when_tenants_left_the_window():
    window = DedupeWindow(10)
    for i in range(100_050):
        window.remember(i, (i, f"t{i}", 1, i))
    assert len(window.tenants) <= 100_001  # rebuilt from the 10 ids left, then grew again
    assert {window.unpack(v) for v in window.ids.values()} == {(i, f"t{i}", 1, i) for i in range(100_040, 100_050)}


T0 = datetime(2026, 3, 2, 12, tzinfo=timezone.utc)  # on a minute


def _near(tokens: int) -> tuple[int, int]:
    """A token count as the repeated-calls detector compares it: its bit length and its top 4 bits."""
    return tokens.bit_length(), tokens >> max(tokens.bit_length() - 4, 0)


TOKENS = st.sampled_from([7, 15, 16, 17, 18, 2000, 2047, 2048])  # near each other (within or past 4 bits), on a bit edge


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["llm_call", "tool_call"]), TOKENS, TOKENS,
                          st.sampled_from([0, 1, 7, 70])), min_size=1, max_size=60))
def test_a_session_minute_counts_its_most_repeated_call_like_a_counter(calls):
    """observe()'s inline fingerprint and counts (one, two, then a dict of distinct calls) against a Counter of
    (kind, model, rounded counts) per session minute; the stream's seconds only go forward."""
    detector, second, seen = RunawaySessions(), 0, Counter()
    for model, kind, inp, out, step in calls:
        if (second + step) // 60 != second // 60:
            seen.clear()
        second += step
        detector.observe("t", "a", "s", T0 + timedelta(seconds=second), 1, kind, model, "", inp, out)
        seen[(kind, model, _near(inp), _near(out))] += 1
        assert detector.sessions[("t", "s")].top_repeat == max(seen.values())


def test_state_per_active_session_stays_small():
    """Spend book + detectors for 20,000 sessions of 2 events (as bench.profile --memory feeds them): 1.6 KB with
    the detectors' old per-session dict and 7-tuples, 1.2 KB now (tracemalloc; RSS adds the allocator's overhead); the dedupe window is apart."""
    from datetime import datetime, timedelta, timezone

    start, events = datetime(2026, 3, 2, 12, tzinfo=timezone.utc), []
    for i in range(40_000):
        s = i % 20_000
        events.append((f"tenant{s % 50}", f"team{s % 200}", f"proj{s % 500}", f"agent{s % 2000}", f"sess{s}",
                       start + timedelta(milliseconds=i), 1000 + i, 100 + i % 7))
    tracemalloc.start()
    book, detectors = SpendBook(), Detectors()
    for tenant, team, project, agent, session, ts, inp, out in events:
        book.add((tenant, team, project, agent, session), ts, 1000, inp, out)
        detectors.runaway.observe(tenant, agent, session, ts, 1000, "llm_call", "gpt-4o", "", inp, out)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(book.states) > 20_000 and len(detectors.runaway.sessions) == 20_000
    assert size / 20_000 < 1300, size / 20_000


def test_idle_sessions_leave_process_memory_for_the_store_and_come_back_whole():
    """Three waves of 8,000 new sessions spend, are published (drained) and age out. Process memory after the
    third wave's eviction is what it was after the first (tracemalloc; bounded caches and dict tables reused): an
    idle session costs a few bits of the store's filter, not the session-7 parked tuple (~0.4 KB each, all month).
    Each session returns with its month-to-date."""
    from datetime import datetime, timedelta, timezone

    start, book, n = datetime(2026, 3, 2, 12, tzinfo=timezone.utc), SpendBook(), 8_000
    sessions = lambda wave: [(f"tenant{s % 50}", f"team{s % 200}", "", f"agent{s % 800}", f"w{wave}s{s}")  # noqa: E731
                             for s in range(n)]
    tracemalloc.start()
    for wave in range(3):
        now = start + timedelta(hours=2 * wave)
        for i, ids in enumerate(sessions(wave)):
            book.add(ids, now + timedelta(milliseconds=i), 1000 + i)
        if wave == 0:
            full, _ = tracemalloc.get_traced_memory()
        list(book.drain(now + timedelta(minutes=1)))
        assert book.evict_idle(now + timedelta(hours=2), timedelta(hours=1)) >= n
        if wave == 0:
            first, _ = tracemalloc.get_traced_memory()
    third, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert full - first > n * 300  # the sessions' states did leave memory
    assert (third - first) / (2 * n) < 60, (third - first) / (2 * n)
    later = start + timedelta(hours=9)
    for wave in range(3):
        for i, ids in enumerate(sessions(wave)[:300]):
            book.add(ids, later, 1)
            sid = f"tenant{i % 50}/team{i % 200}//agent{i % 800}/w{wave}s{i}"
            assert book.states[(f"tenant{i % 50}", "session", sid)].period == 1001 + i
