"""Agent side: obey the allocator's decisions before every call, with no network I/O on the check path.

    feed = DecisionFeed(settings, tenants={"acme"}).start()      # one per process
    guard = Guard(feed, tenant_id="acme", team="research", session_id="s-42", priority="normal")
    model = guard.check("gpt-4o", cost_usd=estimate)            # raises, waits, or hands back the model to use
    ... make the call ...
    guard.record(actual_cost, reserved=estimate)

The feed reads the compacted control topic from the beginning (own unique group, every
partition assigned) on a background thread and keeps the latest decision per key.
`check` looks up the guard's scopes in that dict and enforces, in order of severity:
deny/preempt raise `BudgetExceeded`; queue waits for a new decision up to a timeout;
throttle takes a token from a local token bucket (waits, or raises `Throttled` when the
caller asked not to wait); downgrade hands back `max_model`; a spend lease caps what
the session may spend, debited locally from the costs the guard records. Under a hard
budget a guard without a lease (or with one used up) announces its session and class to
the allocator (`DecisionFeed.announce`: a zero-cost SpendUpdate on the spend topic, the
class in the `meterline-announce` header) and waits for a lease; until one arrives it may
spend only the starter the budget's decision names.
Expired decisions are ignored (fail_open) or make every call fail (fail_closed).
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import Literal

from meterline.schemas.events import (InvalidEvent, Priority, SpendUpdate, ThrottleDecision, decision_key, decode,
                                      new_id, utcnow)

from ._kafka import (ANNOUNCE_HEADER, GPU_WAIT_HEADER, NEED_HEADER, RELEASE_HEADER, SPENT_HEADER, assign_from_beginning,
                     caught_up)
from meterline.schemas.scopes import bare, scope_ids, tenant_of

NANO = Decimal(10**9)
FailMode = Literal["open", "closed"]
SEVERITY = {"allow": 0, "downgrade": 1, "throttle": 2, "queue": 3, "preempt": 4, "deny": 5}


class GuardError(Exception):
    """Base class: the allocator says this call must not go ahead now."""


class BudgetExceeded(GuardError):
    """A budget forbids the call. `policy_id` names the budget; `reset_at` is when it resets."""

    def __init__(self, message: str, policy_id: str = "", reset_at: datetime | None = None):
        self.policy_id, self.reset_at = policy_id, reset_at
        when = f"; it resets at {reset_at.isoformat()}" if reset_at else ""
        super().__init__(f"{message} (budget {policy_id or 'unknown'}{when})")


class Throttled(GuardError):
    """Over the allowed rate (or still queued) and the caller asked not to wait. Retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"{message}; retry after {retry_after:.3f} s")


class AllocatorUnavailable(GuardError):
    """fail_closed, and no live decision covers this guard (the allocator is silent)."""


def to_nanos(usd: Decimal) -> int:
    return int((usd * NANO).to_integral_value(rounding=ROUND_CEILING))


class Compiled:
    """A decision in the shape the check path wants: floats for times, int nano-USD for money."""

    __slots__ = ("decision", "action", "expires", "rpm", "max_model", "limit", "spent", "starter", "severity")

    def __init__(self, d: ThrottleDecision):
        self.decision = d
        self.action = d.action
        self.severity = SEVERITY[d.action]
        self.expires = d.expires_at.timestamp()
        self.rpm = d.limits.requests_per_min
        self.max_model = d.max_model
        self.limit = to_nanos(d.spend_limit_usd) if d.spend_limit_usd is not None else None
        self.spent = to_nanos(d.spent_usd) if d.spent_usd is not None else 0
        self.starter = to_nanos(d.session_lease_usd) if d.session_lease_usd is not None else None


class DecisionFeed:
    """The latest decision per key from the control topic, kept current by a background thread."""

    def __init__(self, settings, tenants: set[str] | None = None, poll_timeout: float = 0.05):
        self.settings = settings
        self.tenants = tenants
        self.poll_timeout = poll_timeout
        self.decisions: dict[str, Compiled] = {}
        self.version = 0
        self.changed = threading.Condition()
        self.ready = threading.Event()
        self.received: dict[str, float] = {}      # key -> time.time() it arrived (for latency benchmarks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = None

    def start(self) -> DecisionFeed:
        from confluent_kafka import Consumer

        self._consumer = Consumer(self.settings.kafka_config(**{
            "group.id": f"meterline-guard-{uuid.uuid4().hex}", "enable.auto.commit": False,
            "fetch.wait.max.ms": 10, "fetch.min.bytes": 1}))
        self._ends = assign_from_beginning(self._consumer, self.settings.topic("control"))
        self._thread = threading.Thread(target=self._run, name="meterline-guard-feed", daemon=True)
        self._thread.start()
        return self

    def announce(self, session_id: str, priority: str, need_usd: Decimal = Decimal(0), spent_usd: Decimal = Decimal(0)) -> None:
        """Tell the allocator a session wants a lease: a zero-cost SpendUpdate; its class, the cost of
        the call it waits to fit and what it has spent this lease period in headers."""
        self._send(session_id, priority, need_usd, spent_usd)

    def release(self, session_id: str, priority: str, ceiling_usd: Decimal, spent_usd: Decimal, need_usd: Decimal) -> None:
        """Tell the allocator a session gives back its lease above `spent_usd` (it already stopped at it)."""
        self._send(session_id, priority, need_usd, spent_usd, [(RELEASE_HEADER, str(ceiling_usd).encode())])

    def announce_gpu(self, session_id: str, priority: str, gpus: Decimal) -> None:
        """Tell the allocator a session waits for `gpus` GPUs (0: it no longer waits)."""
        self._send(session_id, priority, Decimal(0), Decimal(0), [(GPU_WAIT_HEADER, str(gpus).encode())])

    def _send(self, session_id: str, priority: str, need_usd: Decimal, spent_usd: Decimal, extra: list | None = None) -> None:
        from confluent_kafka import Producer

        if self._producer is None:
            self._producer = Producer(self.settings.kafka_config(**{"linger.ms": 0}))
        now, tenant = utcnow(), tenant_of(session_id)
        update = SpendUpdate(update_id=new_id(), ts=now, tenant_id=tenant, scope="session", scope_id=session_id,
                             window_start=now, window_end=now, window_cost_usd=0, period_start=now, period_cost_usd=0)
        self._producer.produce(self.settings.topic("spend"), key=tenant.encode(), value=update.to_json(),
                               headers=[(ANNOUNCE_HEADER, priority.encode()), (NEED_HEADER, str(need_usd).encode()),
                                        (SPENT_HEADER, str(spent_usd).encode()), *(extra or ())])
        self._producer.poll(0)   # enqueued locally: the check path still waits on no network I/O

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once everything on the topic at start-up has been read."""
        return self.ready.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._consumer.close()
        if self._producer is not None:
            self._producer.flush(5)

    def _run(self) -> None:
        positions: dict[int, int] = {}
        if not any(self._ends.values()):
            self.ready.set()
        while not self._stop.is_set():
            first = self._consumer.poll(self.poll_timeout)   # returns as soon as a record is there
            batch = [first, *self._consumer.consume(500, 0)] if first is not None else []
            applied = 0
            for msg in batch:
                if msg.error():
                    continue
                positions[msg.partition()] = msg.offset() + 1
                applied += self._apply(msg.key(), msg.value())
            if applied:   # guards rebuild their plans only when a decision for a wanted tenant changed
                with self.changed:
                    self.version += 1
                    self.changed.notify_all()
            if not self.ready.is_set() and (all(positions.get(p, 0) >= end for p, end in self._ends.items())
                                            or not batch and caught_up(self._consumer, self._ends)):
                self.ready.set()

    def _apply(self, raw_key: bytes | None, value: bytes | None) -> bool:
        if raw_key is None:
            return False
        key = raw_key.decode()
        if self.tenants is not None and tenant_of(key[key.find(":") + 1:key.rfind(":")]) not in self.tenants:
            return False  # someone else's decision: not even decoded
        if value is None:
            return self.decisions.pop(key, None) is not None
        try:
            self.decisions[key] = Compiled(decode(ThrottleDecision, value))
        except InvalidEvent:
            return False
        self.received[key] = time.time()
        return True


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, per_min: int, now: float):
        self.rate = per_min / 60.0
        self.capacity = max(1.0, self.rate)  # one second of burst
        self.tokens, self.stamp = self.capacity, now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _Plan:
    version: int
    valid_until: float
    decisions: list[tuple[str, Compiled]]    # (key, decision) in force, one per scope
    lease: Compiled | None                   # the session's own lease
    starter: int | None                      # nano-USD a session without a lease may spend
    simple: bool                             # nothing to enforce: the fast path
    unavailable: bool                        # fail_closed and nothing live


class Guard:
    def __init__(self, feed: DecisionFeed, tenant_id: str, team: str = "", project: str = "", agent_id: str = "",
                 session_id: str = "", *, priority: Priority = "normal", fail_mode: FailMode = "open",
                 queue_timeout: float = 30.0, lease_timeout: float = 30.0, announce_every: float = 1.0,
                 clock: Callable[[], float] = time.time):
        self.feed = feed
        self.priority = priority
        self.fail_mode = fail_mode
        self.queue_timeout, self.lease_timeout, self.announce_every = queue_timeout, lease_timeout, announce_every
        self.clock = clock
        self.scopes = scope_ids(tenant_id, team, project, agent_id, session_id)
        # each scope under its path id and its bare id (what a tenant-qualified spend job's ids become)
        self._ids = {scope: tuple(dict.fromkeys((sid, bare(sid)))) for scope, sid in self.scopes.items()}
        self._session_keys = tuple(decision_key("session", sid, None) for sid in self._ids.get("session", ()))
        self._plans: dict[str, _Plan] = {}
        self._buckets: dict[str, tuple[str, TokenBucket]] = {}
        self._lock = threading.Lock()
        self.spent = 0            # nano-USD recorded (and reserved) in the current lease period
        self.spent_unleased = 0   # nano-USD spent while holding no lease of its own
        self.reserved = 0         # nano-USD reserved by checks and not yet settled by record()
        self._released: tuple[int, int] | None = None   # (lease ceiling given back, the spend it stopped at)
        self._gpu_wait: tuple[float, Decimal] | None = None
        self._lease_reset: float | None = None
        self._announced: tuple[float, int | None, int] | None = None   # when this guard last announced, at which ceiling, need

    # ---- the check path -----------------------------------------------------------------
    def check(self, model: str | None = None, *, cost_usd: Decimal | None = None, cost_nanos: int = 0,
              priority: Priority | None = None, wait: bool = True) -> str | None:
        """Enforce the decisions in force; return the model to use. Reserves the estimated cost."""
        plan = self._plan(priority or self.priority)
        if plan.simple:
            return model
        cost = cost_nanos or (to_nanos(cost_usd) if cost_usd else 0)
        return self._enforce(plan, priority or self.priority, model, cost, wait)

    def record(self, cost_usd: Decimal | None = None, *, cost_nanos: int = 0, reserved_usd: Decimal | None = None,
               reserved_nanos: int = 0) -> None:
        """Debit what a call cost (less what its check reserved) from the local lease counters.

        Only a reservation the guard really made is taken back: a check that had nothing to
        enforce reserved nothing, and taking its estimate back would let the session spend
        that much past a lease that arrives later (found by the demo: hooli 128 % used)."""
        cost = cost_nanos or (to_nanos(cost_usd) if cost_usd else 0)
        self._debit(cost, reserved_nanos or (to_nanos(reserved_usd) if reserved_usd else 0))

    def wait_for_gpus(self, gpus: Decimal | int) -> None:
        """Say this session waits for `gpus` GPUs (a job in its scheduler's queue; 0 once it runs or gives up):
        the allocator's reclaim and fair-share rules act on it. Call it while waiting, at any rate: it is sent
        at most every `announce_every` unless the number changed, and a wait not renewed lapses (30 s)."""
        announce, session = getattr(self.feed, "announce_gpu", None), self.scopes.get("session")
        if announce is None or session is None:
            return
        gpus, now = Decimal(gpus), self.clock()
        if self._gpu_wait is not None and self._gpu_wait[1] == gpus and now - self._gpu_wait[0] < self.announce_every:
            return
        self._gpu_wait = (now, gpus)
        announce(session, self.priority, gpus)

    def _debit(self, nanos: int, reserved: int = 0) -> None:
        with self._lock:
            released = min(max(0, reserved), self.reserved)
            self.reserved -= released
            nanos -= released
            self.spent += nanos
            now = self.clock()
            if not any((d := self.feed.decisions.get(k)) is not None and d.expires > now for k in self._session_keys):
                self.spent_unleased += nanos

    def _plan(self, priority: str) -> _Plan:
        plan = self._plans.get(priority)
        now = self.clock()
        if plan is None or plan.version != self.feed.version or now >= plan.valid_until:
            plan = self._plans[priority] = self._build_plan(priority, now)
        return plan

    def _build_plan(self, priority: str, now: float) -> _Plan:
        version, table = self.feed.version, self.feed.decisions
        live, valid_until, expired = [], now + 3600.0, False
        for scope, ids in self._ids.items():
            found = [d for sid in ids for d in (table.get(decision_key(scope, sid, priority)), table.get(decision_key(scope, sid, None))) if d]
            current = next((d for d in found if d.expires > now), None)
            if current is not None:
                key = decision_key(scope, current.decision.scope_id, current.decision.priority)
                live.append((key, current))
                valid_until = min(valid_until, current.expires)
            elif found:
                expired = True
        lease = next((d for k, d in live if d.decision.scope == "session" and d.limit is not None), None)
        starters = [d.starter for _, d in live if d.starter is not None]
        starter = None if lease or not starters else min(starters)
        if lease is not None and lease.limit is not None:
            self._roll_lease_period(lease)
            if self._released is not None and lease.limit != self._released[0]:
                self._released = None   # a lease decided after the release: it counts what was given back
        unavailable = self.fail_mode == "closed" and (not live or expired)
        simple = not unavailable and lease is None and starter is None and all(d.action == "allow" for _, d in live)
        return _Plan(version, valid_until, live, lease, starter, simple, unavailable)

    def _roll_lease_period(self, lease: Compiled) -> None:
        reset_at = lease.decision.reset_at.timestamp() if lease.decision.reset_at else None
        with self._lock:
            if self._lease_reset is not None and reset_at is not None and reset_at > self._lease_reset:
                self.spent = self.reserved = 0   # a new lease period: the old spend no longer counts
            self._lease_reset = reset_at
            self.spent_unleased = 0     # the allocator charged our starter draw into this lease

    def _enforce(self, plan: _Plan, priority: str, model: str | None, cost: int, wait: bool) -> str | None:
        if plan.unavailable:
            raise AllocatorUnavailable("no live allocator decision covers this guard and fail_mode is 'closed'")
        worst = max((d for _, d in plan.decisions), key=lambda d: d.severity, default=None)
        if worst is not None and worst.action in ("deny", "preempt"):
            d = worst.decision
            if plan.lease is not None and plan.lease.action == "deny":
                if priority in ("critical", "high"):   # denied the call it waited for: a cheaper one may fit
                    self._announce(priority, cost, plan.lease.limit)
                else:
                    self._release(plan.lease, priority, cost)   # a lower class gives back the rest it cannot use
            raise BudgetExceeded(f"{d.action}: {d.reason}", d.policy_id, d.reset_at)
        if worst is not None and worst.action == "queue":
            why = "queued: " + worst.decision.reason
            return self._wait_for_change(plan, priority, model, cost, wait, lambda left: Throttled(why, left or 1.0), self.queue_timeout)
        for key, d in plan.decisions:
            if d.action == "throttle" and d.rpm:
                self._take_token(key, d, wait)
            if d.action == "downgrade" and d.max_model:
                model = d.max_model
        if plan.lease is None and plan.starter is not None:
            self._announce(priority, cost, None)  # under a hard budget without a lease: ask for one
        if not self._reserve(plan, cost):
            if plan.lease is not None:
                self._announce(priority, cost, plan.lease.limit)   # used up: stay live while waiting for a top-up
            lease = plan.lease.decision if plan.lease else None
            why = f"spend lease used up under budget {lease.policy_id}" if lease else "waiting for a spend lease"
            return self._wait_for_change(plan, priority, model, cost, wait, lambda left: BudgetExceeded(
                why, lease.policy_id if lease else "", lease.reset_at if lease else None), self.lease_timeout)
        return model

    def _release(self, lease: Compiled, priority: str, cost: int) -> None:
        """Its own lease says nothing is left for its class: give back what it holds above its spend
        (a rest too small for its calls that a cheaper session can use). It stops at that spend first,
        so the allocator may re-grant the rest at once: until a lease with another ceiling arrives it
        spends nothing more. The allocator ignores a release of a ceiling it has raised since."""
        release, session = getattr(self.feed, "release", None), self.scopes.get("session")
        if release is None or session is None or lease.limit is None:
            return
        with self._lock:
            if self._released is not None and self._released[0] == lease.limit:
                return
            spent = max(self.spent, lease.spent)
            if spent >= lease.limit:
                return   # nothing to give back
            self._released = (lease.limit, spent)
        release(session, priority, Decimal(lease.limit) / NANO, Decimal(spent) / NANO, Decimal(cost) / NANO)

    def _ceiling(self, lease: Compiled) -> int:
        """The lease's ceiling, or the spend this guard stopped at when it gave the rest back."""
        released = self._released
        return released[1] if released is not None and released[0] == lease.limit else lease.limit

    def _reserve(self, plan: _Plan, cost: int) -> bool:
        with self._lock:
            if plan.lease is not None and plan.lease.limit is not None:
                if max(self.spent, plan.lease.spent) + cost > self._ceiling(plan.lease):
                    return False
            elif not self._fits_starter(plan, cost):
                return False
            self.spent += cost
            self.reserved += cost
            if plan.lease is None:
                self.spent_unleased += cost
            return True

    def _announce(self, priority: str, cost: int, ceiling: int | None) -> None:
        """At most once per `announce_every`, unless the allocator answered (a new ceiling) since or the
        call is cheaper than the one announced (it may fit where that one was denied)."""
        announce, session = getattr(self.feed, "announce", None), self.scopes.get("session")
        now = self.clock()
        last = self._announced
        if announce is None or session is None or (last is not None and last[1] == ceiling and cost >= last[2]
                                                    and now - last[0] < self.announce_every):
            return
        self._announced = (now, ceiling, cost)
        with self._lock:
            spent = self.spent   # ahead of what the allocator has heard: it sizes the grant from this
        announce(session, priority, Decimal(cost) / NANO, Decimal(spent) / NANO)

    def _take_token(self, key: str, d: Compiled, wait: bool) -> None:
        now = self.clock()
        held = self._buckets.get(key)
        if held is None or held[0] != str(d.decision.decision_id):
            held = self._buckets[key] = (str(d.decision.decision_id), TokenBucket(d.rpm, now))
        delay = held[1].take(now)
        while delay > 0:
            if not wait:
                raise Throttled(f"throttled: {d.decision.reason}", delay)
            time.sleep(delay)
            delay = held[1].take(self.clock())

    def _wait_for_change(self, plan: _Plan, priority: str, model: str | None, cost: int, wait: bool,
                         on_timeout: Callable[[float], GuardError], timeout: float) -> str | None:
        """Block until the feed brings a new decision (or the plan expires), then check again."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if not wait or left <= 0:
                raise on_timeout(max(0.0, left))
            with self.feed.changed:
                if self.feed.version == plan.version:
                    self.feed.changed.wait(min(left, self.announce_every, max(0.001, plan.valid_until - self.clock())))
            plan = self._plan(priority)
            if plan.simple:
                return model
            try:
                return self._enforce_once(plan, priority, model, cost)
            except _StillBlocked:
                continue

    def _enforce_once(self, plan: _Plan, priority: str, model: str | None, cost: int) -> str | None:
        worst = max((d for _, d in plan.decisions), key=lambda d: d.severity, default=None)
        if plan.unavailable or (worst is not None and worst.action in ("deny", "preempt")):
            return self._enforce(plan, priority, model, cost, False)
        if (worst is not None and worst.action == "queue") or not self._would_fit(plan, cost):
            if plan.lease is not None or plan.starter is not None:   # still waiting for a lease: keep asking
                self._announce(priority, cost, plan.lease.limit if plan.lease else None)
            raise _StillBlocked
        return self._enforce(plan, priority, model, cost, True)

    def _would_fit(self, plan: _Plan, cost: int) -> bool:
        if plan.lease is not None and plan.lease.limit is not None:
            return max(self.spent, plan.lease.spent) + cost <= self._ceiling(plan.lease)
        return self._fits_starter(plan, cost)

    def _fits_starter(self, plan: _Plan, cost: int) -> bool:
        """A session without a lease spends only from the starter (no free first call: it has
        announced itself, so a lease is on its way)."""
        return plan.starter is None or self.spent_unleased + cost <= plan.starter


class _StillBlocked(Exception):
    pass
