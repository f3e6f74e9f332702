"""Real-time spend state (streams/spend.py, pure logic): idle sessions leave memory and come back whole.

Ground truth is a plain sum per (session, month) of the costs the test generated; the book is driven
the way the worker drives it (add per event; at a checkpoint drain what changed, then evict the idle).
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings, strategies as st

from meterline.schemas.scopes import scope_ids
from meterline.streams import spend
from meterline.streams.spend import SpendBook, _minute, minute_key, month_of

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
    base = minute_key(datetime(2026, 1, 1, tzinfo=timezone.utc)) + offset
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
    book, minute = SpendBook(), minute_key(START)
    rows = [(("acme", "t", "p", "bot", f"s{i}"), minute, 10, 1, 1, 0) for i in range(500)]
    levels = []
    real = spend._charge_group
    spend._charge_group = lambda level, late: levels.append(len(level)) or real(level, late)
    try:
        book.add_many(rows)
    finally:
        spend._charge_group = real
    assert levels == [1, 1, 1, 1]  # agent, project, team, tenant: one (state, minute) group each
    assert book.states[("acme", "agent", "acme/t/p/bot")].period == 5000
    assert book.states[("acme", "tenant", "acme")].events == 500


def _one_at_a_time(batches: list[list[tuple]]) -> tuple[dict, int]:
    """The documented semantics, record by record, written apart from spend.py: a scope's window is the sum of
    its newest minute, its period the sum of its month; a minute of an earlier month than the scope's is late."""
    states: dict[tuple, list] = {}  # key -> [month, window_key, window, period, events, input, output, unpriced]
    late = 0
    for rows in batches:
        for ids, minute, cost, inp, out, unp in rows:
            for scope, sid in scope_ids(*ids).items():
                s = states.setdefault((ids[0], scope, sid), [month_of(minute), minute, 0, 0, 0, 0, 0, 0])
                if minute > s[1]:
                    if minute >= s[0][3]:  # a new month: its totals start from zero
                        s[0], s[3:] = month_of(minute), [0, 0, 0, 0, 0]
                    s[1], s[2] = minute, 0
                elif minute < s[0][2]:
                    late += 1
                    continue
                if minute == s[1]:
                    s[2] += cost
                s[3], s[4], s[5], s[6], s[7] = s[3] + cost, s[4] + 1, s[5] + inp, s[6] + out, s[7] + unp
    return {k: (s[3], s[2], s[1], s[4], s[5], s[6], s[7], s[0]) for k, s in states.items()}, late


@settings(max_examples=300, deadline=None)
@given(st.lists(rows_st, min_size=1, max_size=6),
       st.one_of(st.integers(0, 24 * 60 * 40), st.integers(44_640 - 150, 44_640 + 10)))
def test_the_batch_and_the_single_charge_equal_a_record_by_record_model(batches, offset):
    """add_many and add() (one _charge_group since session 8) against a model written apart: every field of every
    scope and the late count, batches spanning a month's end, minutes out of order, negative and zero costs."""
    base = minute_key(datetime(2026, 1, 1, tzinfo=timezone.utc)) + offset
    batches = [[(IDS[i], base + m, cost, inp, out, unp) for i, m, cost, inp, out, unp in batch] for batch in batches]
    by_batch, by_row = SpendBook(), SpendBook()
    for rows in batches:
        by_batch.add_many(rows)
        for ids, minute, cost, inp, out, unp in rows:
            by_row.add(ids, _minute(minute), cost, inp, out, unp, minute=minute)
    truth, late = _one_at_a_time(batches)
    for book in (by_batch, by_row):
        assert {k: v[:-1] for k, v in _state_of(book).items()} == truth  # FIELDS less `dirty`
        assert book.late == late


def test_gpu_and_cpu_charges_reach_every_level_and_a_late_one_is_counted_per_scope():
    book, minute = SpendBook(), minute_key(datetime(2026, 3, 3, tzinfo=timezone.utc))
    ids = ("acme", "t", "p", "bot", "s1")
    book.add(ids, _minute(minute), 7, gpu_ps=5, gpu_cost=7, events=0, minute=minute, cpu_ps=3)
    assert {(s.period, s.gpu_ps, s.gpu, s.cpu_ps, s.events) for s in book.states.values()} == {(7, 5, 7, 3, 0)}
    assert len(book.states) == 5
    february = minute_key(datetime(2026, 2, 27, tzinfo=timezone.utc))
    book.add(ids, _minute(february), 9, gpu_ps=1, gpu_cost=9, events=0, minute=february)
    assert book.late == 5 and {s.period for s in book.states.values()} == {7}  # the ledger's, not the stream's


# Age-out (issue 17 item 3): two workers' books, each with its own on-disk store, a changelog they both write
# (as publish_spend does), restarts that rebuild a store from it and tenants moving between the workers.
TENANTS = ("acme", "globex")
ops = st.lists(st.one_of(
    st.tuples(st.just("spend"), st.sampled_from(TENANTS), st.integers(0, 4), st.integers(0, 120), st.integers(0, 10**9)),
    st.tuples(st.just("checkpoint"), st.integers(1, 90)),  # idle minutes of the eviction that follows
    st.tuples(st.just("restart"), st.integers(0, 1)),
    st.tuples(st.just("move"), st.sampled_from(TENANTS))), min_size=1, max_size=60)


def _from_changelog(changelog: list, now: datetime):
    """A worker's store as restore_spend builds it: the records, oldest first, into a fresh file."""
    from meterline.streams.state_store import StateStore

    store = StateStore()
    damaged, missing = store.load(changelog, month_of(minute_key(now))[2])
    assert damaged == [] and missing == set()
    return store


@settings(max_examples=120, deadline=None)
@given(ops)
def test_sessions_that_age_out_restart_and_move_keep_their_period_totals(script):
    """Random spend / checkpoint + evict / restart / tenant move sequences across a month turn: every returning
    session and each tenant stands at the plain sum of its events in the current month; a tenant is counted
    by its owner only (the other worker holds nothing of it)."""
    from meterline.streams.codec import encode
    from meterline.streams.worker import KEY_SEP

    now, changelog = START, []
    books, owner = [SpendBook(), SpendBook()], {"acme": 0, "globex": 1}
    truth: dict[tuple, int] = defaultdict(int)  # (tenant, session or "", month) -> pico-USD

    def checkpoint(idle: int | None = None) -> None:
        for book in books:
            for key, update in book.drain(now):
                changelog.append((KEY_SEP.join(key).encode(), encode(update), 0, len(changelog)))
            if idle is not None:
                book.evict_idle(now, timedelta(minutes=idle))

    for op in script:
        if op[0] == "spend":
            _, tenant, session, gap, cost = op
            now += timedelta(minutes=gap)
            books[owner[tenant]].add((tenant, "", "", "bot", f"s{session}"), now, cost)
            truth[(tenant, f"s{session}", f"{now:%Y-%m}")] += cost
            truth[(tenant, "", f"{now:%Y-%m}")] += cost
        elif op[0] == "checkpoint":
            checkpoint(op[1])
        elif op[0] == "restart":  # a clean stop (last checkpoint) and a start on a fresh disk
            checkpoint()
            books[op[1]] = SpendBook(_from_changelog(changelog, now))
        else:  # the tenant's partitions move: the old owner checkpoints and drops it, the new one reloads its store
            tenant = op[1]
            checkpoint()
            books[owner[tenant]].drop_tenants({tenant})
            owner[tenant] = 1 - owner[tenant]
            moved_to = books[owner[tenant]]
            moved_to.store = _from_changelog(changelog, now)
    month = f"{now:%Y-%m}"
    for tenant in TENANTS:
        book, other = books[owner[tenant]], books[1 - owner[tenant]]
        assert not any(k[0] == tenant for k in other.states), "a moved tenant must not stay counted by its old owner"
        for session in range(5):
            ids = (tenant, "", "", "bot", f"s{session}")
            book.add(ids, now, 0)  # it spends again (nothing): where does it stand?
            sid = scope_ids(*ids)["session"]
            assert book.states[(tenant, "session", sid)].period == truth.get((tenant, f"s{session}", month), 0), sid
        assert book.states[(tenant, "tenant", tenant)].period == truth.get((tenant, "", month), 0)


owner_ids = st.sampled_from(["", "acme", "unattributed"])


@settings(max_examples=200, deadline=None)
@given(tenant=owner_ids, team=st.sampled_from(["", "core"]), session=st.sampled_from(["", "s1"]), attributed=st.booleans(),
       compute=st.booleans(), level=st.sampled_from(["process", "cgroup"]))
def test_a_sample_charges_the_tenant_of_its_kafka_key(tenant, team, session, attributed, compute, level):
    """One owner per tenant: a GPU process row or CPU sample is charged to the tenant its key routes it by (the
    usage partition's owner holds every part of the tenant's spend, "unattributed" included). Were they to differ,
    two workers would each publish a partial total of one scope and overwrite each other's changelog record."""
    from decimal import Decimal

    from meterline.schemas.events import ComputeSample, GpuSample, build, new_id
    from meterline.streams.worker import charged_ids

    owner = dict(tenant_id=tenant, team=team, session_id=session, attributed=attributed)
    if compute:
        sample = build(ComputeSample, sample_id=new_id(), ts=START, node="n1", level=level, pid=1, interval_ms=10_000,
                       cpu_user_seconds=Decimal(1), memory_bytes=1, memory_byte_seconds=Decimal(1), **owner)
    else:
        sample = build(GpuSample, sample_id=new_id(), ts=START, node="n1", level="process", gpu_index=0, gpu_uuid="GPU-1",
                       interval_ms=1000, pid=1, **owner)
    ids = charged_ids(sample)
    assert ids[0] == sample.key and ids[0]  # a scope needs a tenant; the key is never a node for a charged row
