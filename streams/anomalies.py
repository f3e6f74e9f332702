"""Streaming cost anomaly detection: pure classes driven by event time (no Kafka, no clock).

Detectors (each returns schemas.Anomaly records; evidence numbers are exact strings):
- runaway_session: a session's spend in the current minute far above what sessions of the
  same agent usually spend in a minute (robust baseline per agent, below).
- repeated_calls: one session repeating a near-identical call (same model/tool, token
  counts within ~6 %) far more often per minute than the agent's sessions do.
- spend_spike: a tenant's spend in a 10-second bucket far above its own EWMA baseline.
- unpriced_model: a model or tool nobody can price (once per tenant/provider/model/hour).
- idle_gpu: a GPU, MIG slice or process holding memory at ~0 % utilisation for a window.
- idle_cpu: a cgroup with a CPU limit (ComputeSample.cpu_limit_cores, from cpu.max: the cores a container
  reserved) that used at most idle_cpu_pct of it for a window (the CPU twin of idle_gpu).
- unmetered_calls: an agent's calls that completed with no usage reported (usage="missing", e.g. a
  stream without include_usage): once per tenant/agent/hour, with the fix in the message.

Robust baseline: integer EWMA of the level and of the absolute deviation from it (a
streaming stand-in for median/MAD; alpha = 1/8). "Far above" = level + k x deviation, with
the deviation floored at level/4 and an absolute floor so that perfectly regular traffic
does not make the band zero-width. Flagged values feed the baseline clipped to the
threshold (a runaway cannot teach the detector that runaways are normal). Each detector
needs `warmup` observations before it raises, and holds a cooldown per key. Money inside
is integer pico-USD; nothing is float.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from meterline.schemas.events import MAX_TEXT_LEN, Anomaly, build, new_id
from meterline.schemas.scopes import SEP

from .codec import usd

PICO = 10**12
NOTHING: tuple = ()  # what a detector returns when it raises nothing (no new list per event)
MINUTE = timedelta(minutes=1)
_ORDINAL_EPOCH = datetime(1, 1, 1)
CONFLICT_NAMESPACE = uuid.UUID("0f3c9a52-6a57-4d2e-9d8e-2b6f6f1c8a41")  # a replayed alert keeps its id


def second_of(ts: datetime) -> int:
    """Whole seconds since 0001-01-01 of ts's wall clock (UTC in the worker): integer time keys
    for minutes and buckets, ~5x cheaper than ts.replace(second=0, microsecond=0)."""
    return ts.toordinal() * 86400 + ts.hour * 3600 + ts.minute * 60 + ts.second


def minute_datetime(minute: int, tz: Any) -> datetime:
    """The datetime of an integer minute key (second_of(ts) // 60)."""
    return (_ORDINAL_EPOCH + timedelta(minutes=minute - 1440)).replace(tzinfo=tz)


class Baseline:
    """Integer EWMA level + EWMA absolute deviation (alpha = 1 / 2**shift)."""

    __slots__ = ("level", "dev", "n")

    def __init__(self) -> None:
        self.level = self.dev = self.n = 0

    def threshold(self, k: int, floor: int) -> int:
        return self.level + k * max(self.dev, self.level // 4, floor)

    def update(self, x: int, shift: int = 3) -> None:
        if self.n == 0:
            self.level = x
        else:
            self.dev += (abs(x - self.level) - self.dev) >> shift
            self.level += (x - self.level) >> shift
        self.n += 1


@dataclass
class DetectorConfig:
    k: int = 6                                  # deviations above the level that count as "far above"
    warmup: int = 12                            # observations before a baseline may raise
    session_floor_usd: int = PICO // 100        # $0.01 per session-minute: never flag below
    spike_bucket: timedelta = timedelta(seconds=10)
    spike_floor_usd: int = PICO // 10           # $0.10 per tenant bucket: never flag below
    repeat_floor: int = 20                      # identical calls per session-minute: never flag below
    cooldown: timedelta = timedelta(minutes=5)
    idle_window: timedelta = timedelta(minutes=5)
    idle_util_pct: int = 1
    idle_min_memory_bytes: int = 256 * 2**20
    idle_cpu_pct: int = 5                       # of a group's CPU limit, used at most, for idle_window: idle_cpu
    unpriced_every: timedelta = timedelta(hours=1)


def _anomaly(kind: str, severity: str, tenant: str, scope: str, scope_id: str, start: datetime, end: datetime,
             evidence: dict[str, Any], message: str) -> Anomaly:
    return build(Anomaly, anomaly_id=new_id(), ts=end, kind=kind, severity=severity, tenant_id=tenant or "unattributed",
                 scope=scope, scope_id=scope_id or "unknown", window_start=start, window_end=end,
                 evidence={k: str(v) for k, v in evidence.items()}, message=message)


def conflicting_duplicate(id_name: str, record_id: str, first: tuple[str, str], copy: tuple[str, str], *, stage: str,
                          first_stored: bool = False, differ: tuple[str, ...] = ()) -> tuple[str, Anomaly]:
    """A copy of an id whose body differs from the first copy's (first write wins; both stages):
    the dead letter's reason and the alert, critical when the copy names another tenant.
    `first` and `copy` are (tenant, "topic[partition]@offset")."""
    (first_tenant, first_at), (copy_tenant, copy_at) = first, copy
    reason = (f"conflicting_duplicate: {id_name} {record_id} was first {'stored' if first_stored else 'seen'} for tenant "
              f"{first_tenant!r} at {first_at}; this copy for tenant {copy_tenant!r} at {copy_at} "
              f"{'differs in ' + ', '.join(differ) if differ else 'has another body'}; only the first copy is charged")
    now = datetime.now(timezone.utc)
    tenant = first_tenant or copy_tenant or "unattributed"
    anomaly = build(Anomaly, anomaly_id=uuid.uuid5(CONFLICT_NAMESPACE, f"{stage}:{copy_at}"), ts=now,
                    kind="conflicting_duplicate", severity="critical" if first_tenant != copy_tenant else "warning",
                    tenant_id=tenant, scope="tenant", scope_id=tenant, window_start=now, window_end=now,
                    evidence={id_name: record_id, "first_tenant": first_tenant, "first_at": first_at, "copy_tenant": copy_tenant,
                              "copy_at": copy_at, "stage": stage, **({"differs": ",".join(differ)[:1024]} if differ else {})},
                    message=reason[:MAX_TEXT_LEN])
    return reason, anomaly


def _severity(observed: int, threshold: int) -> str:
    return "critical" if observed >= 3 * max(threshold, 1) else "warning"


_CALLS: dict[tuple[str, str, str], int] = {}  # (kind, model, tool) -> a number never reused (bounded table)
_NEXT_CALL = [0]


def _call_number(kind: str, model: str, tool: str) -> int:
    """A number for a call's (kind, model, tool) (the fingerprint's first part), never reused: after a clear of
    the bounded table (garbage names), no two calls alias."""
    call = _CALLS.get((kind, model, tool))
    if call is None:
        if len(_CALLS) > 100_000:
            _CALLS.clear()
        call = _CALLS[(kind, model, tool)] = _NEXT_CALL[0]
        _NEXT_CALL[0] += 1
    return call


class _SessionMinute:
    """One session's current minute (one per active session, so small: the agent's two baselines are one shared
    pair, the call fingerprints a dict only once a second distinct one appears)."""

    __slots__ = ("minute", "cost", "calls", "fp", "fp2", "n2", "repeats", "top_repeat", "flagged_cost", "flagged_repeat",
                 "costs", "reps")

    def __init__(self, minute: int, base: tuple[Baseline, Baseline]) -> None:
        self.start(minute, base)

    def start(self, minute: int, base: tuple[Baseline, Baseline]) -> None:
        self.minute, (self.costs, self.reps) = minute, base  # minute: integer key
        self.cost = self.calls = self.top_repeat = 0
        self.fp = self.fp2 = -1  # the first two distinct fingerprints, counted in top_repeat (fp) and n2
        self.n2 = 0
        self.repeats: dict[int, int] | None = None  # a third distinct one: all counts in a dict
        self.flagged_cost = self.flagged_repeat = False

    def repeat(self, fp: int) -> None:
        """Count a call's fingerprint; top_repeat = the most repeated one's count."""
        if self.repeats is None:
            if self.fp == fp or self.fp < 0:
                self.fp = fp
                self.top_repeat += 1
                return
            if self.fp2 == fp or self.fp2 < 0:
                self.fp2 = fp
                self.n2 += 1
                if self.n2 > self.top_repeat:  # fp2 leads: swap, so top_repeat stays fp's count
                    self.fp, self.fp2, self.top_repeat, self.n2 = self.fp2, self.fp, self.n2, self.top_repeat
                return
            self.repeats = {self.fp: self.top_repeat, self.fp2: self.n2}
        repeats = self.repeats[fp] = self.repeats.get(fp, 0) + 1
        if repeats > self.top_repeat:
            self.top_repeat = repeats


class RunawaySessions:
    """runaway_session + repeated_calls against the agent's own per-session-minute history."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.sessions: dict[tuple[str, str], _SessionMinute] = {}
        self.baselines: dict[tuple[str, str], tuple[Baseline, Baseline]] = {}  # agent -> (cost, repeat) baselines
        self.cooldown_until: dict[tuple[str, str, str], datetime] = {}
        self.tenant_minute: dict[str, int] = {}  # stream time per tenant (integer minute): partitions advance unevenly
        self._swept = -1
        self._warmup = self.config.warmup

    def _base(self, tenant: str, agent: str) -> tuple[Baseline, Baseline]:
        key = (tenant, agent or "*")
        base = self.baselines.get(key)
        if base is None:
            base = self.baselines[key] = (Baseline(), Baseline())
        return base

    def observe(self, tenant: str, agent: str, session: str, ts: datetime, cost: int, kind: str = "llm_call",
                model: str = "", tool: str = "", input_tokens: int = 0, output_tokens: int = 0,
                second: int | None = None) -> list[Anomaly]:
        """One call of a session; `second` = second_of(ts) when the caller has it already."""
        if not session:
            return []
        key, minute = (tenant, session), (second_of(ts) if second is None else second) // 60
        current = self.sessions.get(key)
        if current is None or minute > current.minute:
            if current is None:
                current = self.sessions[key] = _SessionMinute(minute, self._base(tenant, agent))
            else:
                self._close(current)
                current.start(minute, self._base(tenant, agent))  # the same object, reused
            if minute > self.tenant_minute.get(tenant, minute - 1):
                self.tenant_minute[tenant] = minute
        elif minute < current.minute:
            return []  # late event of a closed minute: its spend is in the ledger, not in the detector
        current.cost += cost
        current.calls += 1
        # the call's fingerprint, one int: its number, then the token counts rounded to their top 4 bits (within
        # ~6 %: near-identical calls compare equal), 4 + 6 bits each (inline, with the table's hit: it runs per event)
        call = _CALLS.get((kind, model, tool))
        if call is None:
            call = _call_number(kind, model, tool)
        si, so = input_tokens.bit_length() - 4, output_tokens.bit_length() - 4
        si, so = (si if si > 0 else 0), (so if so > 0 else 0)
        fp = (((call << 4 | input_tokens >> si) << 7 | si) << 4 | output_tokens >> so) << 7 | so
        repeats = current.repeats
        if repeats is not None:  # repeat()'s two common cases, inline: a dict of counts, or the first fingerprint again
            count = repeats[fp] = repeats.get(fp, 0) + 1
            if count > current.top_repeat:
                current.top_repeat = count
        elif current.fp == fp or current.fp < 0:
            current.fp = fp
            current.top_repeat += 1
        else:
            current.repeat(fp)
        costs, reps, warmup = current.costs, current.reps, self._warmup
        if (costs.n < warmup or current.flagged_cost) and (reps.n < warmup or current.flagged_repeat):
            return NOTHING  # the common case: nothing to check
        return self._check(current, tenant, agent, session, ts, kind, model, tool, input_tokens, output_tokens)

    def _check(self, current: _SessionMinute, tenant: str, agent: str, session: str, ts: datetime, kind: str,
               model: str, tool: str, input_tokens: int, output_tokens: int) -> list[Anomaly]:
        cfg, costs, reps = self.config, current.costs, current.reps
        cost_limit = costs.threshold(cfg.k, cfg.session_floor_usd) if costs.n >= cfg.warmup and not current.flagged_cost else None
        repeat_limit = (max(cfg.repeat_floor, reps.threshold(cfg.k, 1)) if reps.n >= cfg.warmup and not current.flagged_repeat
                        else None)
        if not ((cost_limit is not None and current.cost > cost_limit)
                or (repeat_limit is not None and current.top_repeat > repeat_limit)):
            return NOTHING  # where every event of a warmed-up agent ends: no datetime, no list (BENCHMARKS.md, session 19)
        found, minute = [], minute_datetime(current.minute, ts.tzinfo)
        if cost_limit is not None and current.cost > cost_limit and self._cool(("runaway_session", tenant, session), ts):
            current.flagged_cost = True
            found.append(_anomaly(
                "runaway_session", _severity(current.cost, cost_limit), tenant, "session", session, minute, ts,
                {"session_minute_cost_usd": usd(current.cost), "threshold_usd": usd(cost_limit),
                 "agent_baseline_usd": usd(costs.level), "agent_deviation_usd": usd(costs.dev),
                 "calls": current.calls, "agent_id": agent, "window_seconds": int((ts - minute).total_seconds()) + 1},
                f"session {session} of agent {agent or '?'} spent {usd(current.cost)} USD this minute; "
                f"its agent's sessions usually spend {usd(costs.level)} USD a minute"))
        if repeat_limit is not None and current.top_repeat > repeat_limit and self._cool(("repeated_calls", tenant, session), ts):
            current.flagged_repeat = True
            found.append(_anomaly(
                "repeated_calls", _severity(current.top_repeat, repeat_limit), tenant, "session", session, minute, ts,
                {"identical_calls": current.top_repeat, "threshold_calls": repeat_limit, "agent_baseline_calls": reps.level,
                 "model": model or tool, "input_tokens": input_tokens, "output_tokens": output_tokens,
                 "session_minute_cost_usd": usd(current.cost), "agent_id": agent},
                f"session {session} repeated a near-identical {model or tool} call {current.top_repeat} times this minute"))
        return found

    def _close(self, closed: _SessionMinute) -> None:
        cfg, costs = self.config, closed.costs
        value = min(closed.cost, costs.threshold(cfg.k, cfg.session_floor_usd)) if costs.n >= cfg.warmup else closed.cost
        costs.update(value)
        closed.reps.update(min(closed.top_repeat, 4 * cfg.repeat_floor))

    def _cool(self, key: tuple[str, str, str], ts: datetime) -> bool:
        if ts < self.cooldown_until.get(key, datetime.min.replace(tzinfo=ts.tzinfo)):
            return False
        self.cooldown_until[key] = ts + self.config.cooldown
        return True

    def tick(self, stream_now: datetime) -> None:
        """Close session-minutes their tenant's stream time has left behind by over a minute (quiet sessions).

        Per tenant, because partitions advance unevenly: one tenant's clock must not close another's minutes.
        """
        minute = second_of(stream_now) // 60
        if minute <= self._swept:
            return
        self._swept = minute
        now = self.tenant_minute
        for key in [k for k, s in self.sessions.items() if s.minute < now.get(k[0], s.minute) - 1]:
            self._close(self.sessions.pop(key))
        horizon = stream_now - self.config.cooldown
        self.cooldown_until = {k: v for k, v in self.cooldown_until.items() if v > horizon}


class _TenantBucket:
    __slots__ = ("start", "bucket", "cost", "baseline", "flagged", "cooldown_until")

    def __init__(self, start: datetime, bucket: int) -> None:
        self.start, self.bucket, self.cost, self.baseline, self.flagged = start, bucket, 0, Baseline(), False
        self.cooldown_until = start


class SpendSpikes:
    """spend_spike: a tenant's spend per bucket against its own robust EWMA baseline."""

    MAX_GAP_BUCKETS = 6  # quiet buckets between events feed zeros, at most this many

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.tenants: dict[str, _TenantBucket] = {}
        self._bucket_s = int(self.config.spike_bucket.total_seconds())

    def observe(self, tenant: str, ts: datetime, cost: int, second: int | None = None) -> list[Anomaly]:
        cfg = self.config
        bucket = (second_of(ts) if second is None else second) // self._bucket_s
        state = self.tenants.get(tenant)
        if state is None:
            state = self.tenants[tenant] = _TenantBucket(self._start_of(ts), bucket)
        if bucket > state.bucket:
            self._close(state, self._start_of(ts), bucket)
        elif bucket < state.bucket:
            return []
        state.cost += cost
        base = state.baseline
        if base.n < cfg.warmup or state.flagged:
            return NOTHING
        limit = base.threshold(cfg.k, cfg.spike_floor_usd)
        if state.cost <= limit or ts < state.cooldown_until:
            return NOTHING
        state.flagged, state.cooldown_until = True, ts + cfg.cooldown
        return [_anomaly(
            "spend_spike", _severity(state.cost, limit), tenant, "tenant", tenant, state.start, ts,
            {"bucket_cost_usd": usd(state.cost), "threshold_usd": usd(limit), "baseline_usd": usd(base.level),
             "deviation_usd": usd(base.dev), "bucket_seconds": self._bucket_s, "k": cfg.k},
            f"tenant {tenant} spent {usd(state.cost)} USD in {self._bucket_s} s; its usual is {usd(base.level)} USD")]

    def _start_of(self, ts: datetime) -> datetime:
        return ts - (ts - ts.replace(minute=0, second=0, microsecond=0)) % self.config.spike_bucket

    def _close(self, state: _TenantBucket, new_start: datetime, new_bucket: int) -> None:
        cfg, base = self.config, state.baseline
        clip = base.threshold(cfg.k, cfg.spike_floor_usd) if base.n >= cfg.warmup else state.cost
        base.update(min(state.cost, clip))
        for _ in range(min(new_bucket - state.bucket - 1, self.MAX_GAP_BUCKETS)):
            base.update(0)
        state.start, state.bucket, state.cost, state.flagged = new_start, new_bucket, 0, False


class _OncePerPeriod:
    """Counts events per key; says when a key is due an alert: its first event, then once per `every`
    of stream time (with how many came since the last alert)."""

    def __init__(self, every: timedelta) -> None:
        self.every = every
        self.seen: dict[tuple, tuple[datetime, int]] = {}

    def due(self, key: tuple, ts: datetime) -> int | None:
        first, count = self.seen.get(key, (None, 0))
        if first is not None and ts - first < self.every:
            self.seen[key] = (first, count + 1)
            return None
        self.seen[key] = (ts, 1)
        return count


class UnpricedModels(_OncePerPeriod):
    """unpriced_model: raised once per (tenant, provider, model) per `unpriced_every` of stream time."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        super().__init__(self.config.unpriced_every)

    def observe(self, tenant: str, provider: str, model: str, ts: datetime) -> list[Anomaly]:
        count = self.due((tenant, provider, model), ts)
        if count is None:
            return []
        return [_anomaly("unpriced_model", "warning", tenant, "model", f"{provider}/{model}"[:128], ts, ts,
                         {"provider": provider, "model": model, "events_last_period": count},
                         f"no price for {provider or '?'}/{model}: events are kept at cost 0 (cost_source=unpriced); "
                         "add it under [[models]] of the price catalog (METERLINE_CATALOG, default streams/catalog.toml)")]


class UnmeteredCalls(_OncePerPeriod):
    """unmetered_calls: calls of an agent that completed with no usage reported, once per (tenant, agent)
    per `unpriced_every` of stream time. Their cost is unknown, not zero: the message says how to meter them."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        super().__init__(self.config.unpriced_every)

    def observe(self, event: Any) -> list[Anomaly]:
        tenant, agent, provider, model, ts = event.tenant_id, event.agent_id, event.provider, event.model, event.ts
        count = self.due((tenant, event.team, event.project, agent), ts)
        if count is None:
            return []
        scope_id = SEP.join((tenant, event.team, event.project, agent))  # the agent's scope id (schemas/scopes.py)
        return [_anomaly("unmetered_calls", "warning", tenant, "agent", scope_id, ts, ts,
                         {"provider": provider, "model": model, "calls_last_period": count},
                         f"agent {agent or '?'} made {provider or '?'}/{model} calls that reported no usage, so they are "
                         "not charged: stream with stream_options={\"include_usage\": true} (OpenAI) or use an "
                         "instrumentation that records usage")]


class _Idle:
    __slots__ = ("since", "last", "gpu_ps", "cost", "memory", "flagged")

    def __init__(self, ts: datetime) -> None:
        self.since = self.last = ts
        self.gpu_ps = self.cost = self.memory = 0
        self.flagged = False


class IdleGpus:
    """idle_gpu: memory held at <= idle_util_pct utilisation for idle_window of stream time."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.devices: dict[tuple, _Idle] = {}

    def observe(self, sample: Any, gpu_ps: int, cost: int) -> list[Anomaly]:
        cfg = self.config
        if sample.level == "process":
            util, memory = sample.sm_util_pct, sample.process_memory_bytes
        else:
            util, memory = sample.utilization_pct, sample.memory_used_bytes
        key = (sample.node, sample.gpu_uuid, sample.mig_uuid, sample.pid, sample.namespace, sample.pod, sample.container)
        if util is None or memory is None or util > cfg.idle_util_pct or memory < cfg.idle_min_memory_bytes:
            self.devices.pop(key, None)
            return []
        interval = timedelta(milliseconds=sample.interval_ms)
        state = self.devices.get(key)
        if state is None:
            state = self.devices[key] = _Idle(sample.ts - interval)
        state.last, state.memory = sample.ts, max(state.memory, memory)
        state.gpu_ps += gpu_ps
        state.cost += cost
        idle_for = state.last - state.since
        if state.flagged or idle_for < cfg.idle_window:
            return []
        state.flagged = True
        attributed = sample.level == "process" and sample.attributed and sample.session_id
        scope, scope_id = ("session", sample.session_id) if attributed else ("gpu", sample.mig_uuid or sample.gpu_uuid)
        return [_anomaly(
            "idle_gpu", "critical" if idle_for >= 4 * cfg.idle_window else "warning", sample.tenant_id, scope, scope_id,
            state.since, state.last,
            {"idle_seconds": int(idle_for.total_seconds()), "max_utilization_pct": cfg.idle_util_pct,
             "memory_held_bytes": state.memory, "gpu_seconds": usd(state.gpu_ps), "paid_usd": usd(state.cost),
             "node": sample.node, "gpu_uuid": sample.gpu_uuid, "mig_uuid": sample.mig_uuid, "pid": sample.pid or ""},
            f"{sample.gpu_name or 'GPU'} on {sample.node} held {state.memory} bytes at ~0% utilisation for "
            f"{int(idle_for.total_seconds())} s ({usd(state.cost)} USD paid)")]


class _IdleCpu:
    __slots__ = ("since", "last", "used", "reserved", "cost", "flagged")

    def __init__(self, ts: datetime) -> None:
        self.since = self.last = ts
        self.used = self.reserved = Decimal(0)
        self.cost = 0
        self.flagged = False


class IdleCpus:
    """idle_cpu: a group that used at most idle_cpu_pct of its CPU limit for idle_window of stream time
    (exact: CPU-seconds against limit x interval core-seconds). Groups without a limit are never idle."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.groups: dict[tuple, _IdleCpu] = {}

    def observe(self, sample: Any, cost: int) -> list[Anomaly]:
        cfg, limit = self.config, sample.cpu_limit_cores
        key = (sample.node, sample.cgroup, sample.pid)
        reserved = (limit or 0) * Decimal(sample.interval_ms) / 1000
        if not reserved or sample.cpu_seconds * 100 > reserved * cfg.idle_cpu_pct:
            self.groups.pop(key, None)
            return []
        state = self.groups.get(key)
        if state is None:
            if len(self.groups) > 100_000:
                self.groups.clear()  # bounded: groups that vanish while idle are forgotten
            state = self.groups[key] = _IdleCpu(sample.ts - timedelta(milliseconds=sample.interval_ms))
        state.last = sample.ts
        state.used += sample.cpu_seconds
        state.reserved += reserved
        state.cost += cost
        idle_for = state.last - state.since
        if state.flagged or idle_for < cfg.idle_window:
            return []
        state.flagged = True
        owned = sample.attributed and sample.session_id
        scope, scope_id = ("session", sample.session_id) if owned else ("tenant", sample.tenant_id or "unattributed")
        used_pct = (state.used * 100 / state.reserved).quantize(Decimal("0.01"))
        where = f"{sample.namespace}/{sample.pod}" if sample.pod else sample.cgroup or f"pid {sample.pid}"
        return [_anomaly(
            "idle_cpu", "critical" if idle_for >= 4 * cfg.idle_window else "warning", sample.tenant_id, scope, scope_id,
            state.since, state.last,
            {"idle_seconds": int(idle_for.total_seconds()), "cpu_limit_cores": limit, "used_pct": used_pct,
             "max_used_pct": cfg.idle_cpu_pct, "cpu_seconds": state.used, "reserved_core_seconds": state.reserved,
             "paid_usd": usd(state.cost), "node": sample.node, "cgroup": sample.cgroup[:512], "pod": where[:512]},
            f"{where[:200]} on {sample.node} reserved {limit} cores and used {used_pct}% of them for "
            f"{int(idle_for.total_seconds())} s ({usd(state.cost)} USD paid for CPU and memory)")]


class Detectors:
    """All detectors behind one facade the worker calls."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.runaway = RunawaySessions(self.config)
        self.spikes = SpendSpikes(self.config)
        self.unpriced = UnpricedModels(self.config)
        self.unmetered = UnmeteredCalls(self.config)
        self.idle = IdleGpus(self.config)
        self.idle_cpu = IdleCpus(self.config)

    def usage(self, event: Any, cost: int, unpriced: bool, second: int | None = None) -> list[Anomaly]:
        """Anomalies an event raises (usually none); `second` = second_of(event.ts) when the caller has it."""
        ts, tenant = event.ts, event.tenant_id
        second = second_of(ts) if second is None else second
        found = self.runaway.observe(tenant, event.agent_id, event.session_id, ts, cost, event.kind, event.model,
                                     event.tool, event.input_tokens, event.output_tokens, second)
        spikes = self.spikes.observe(tenant, ts, cost, second)
        if spikes:
            found = [*found, *spikes]
        if unpriced:
            found = [*found, *self.unpriced.observe(event.tenant_id, event.provider, event.model or event.tool, event.ts)]
        if event.usage == "missing":
            found = [*found, *self.unmetered.observe(event)]
        return found  # usually NOTHING (shared, immutable: no list per event)

    def gpu(self, sample: Any, gpu_ps: int, cost: int) -> list[Anomaly]:
        return self.idle.observe(sample, gpu_ps, cost)

    def compute(self, sample: Any, cost: int) -> list[Anomaly]:
        return self.idle_cpu.observe(sample, cost)

    def tick(self, stream_now: datetime) -> None:
        self.runaway.tick(stream_now)
