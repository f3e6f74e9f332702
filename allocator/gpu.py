"""GPU capacity: nominal shares, borrowing of idle capacity, and reclaim.

Kueue/KAI in small: each tenant has a nominal quota (GPUs it is guaranteed) and a
weight. Capacity nobody uses may be borrowed; when a tenant with unmet demand wants
its quota back, borrowers above their fair share are asked to give GPUs back,
`batch` work first, and never below their own quota (in-quota work is never
preempted). Fair share is water-filling: quotas first, the rest by weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from meterline.schemas.scopes import level_key

ZERO = Decimal(0)


def fair_shares(capacity: Decimal, nominal: dict[str, Decimal], weight: dict[str, Decimal],
                demand: dict[str, Decimal]) -> dict[str, Decimal]:
    """GPUs each tenant may hold: min(demand, quota) first, then spare capacity by weight.

    Quotas that together exceed capacity are scaled down proportionally.
    """
    tenants = set(nominal) | set(demand)
    quota_total = sum(nominal.values(), ZERO)
    scale = min(Decimal(1), capacity / quota_total) if quota_total > 0 else Decimal(1)
    share = {t: min(demand.get(t, ZERO), nominal.get(t, ZERO) * scale) for t in tenants}
    spare = capacity - sum(share.values(), ZERO)
    hungry = {t for t in tenants if demand.get(t, ZERO) > share[t]}
    while spare > Decimal("1e-9") and hungry:
        total_w = sum((weight.get(t) or Decimal(1) for t in hungry), ZERO)
        given = ZERO
        for t in sorted(hungry):
            offer = spare * (weight.get(t) or Decimal(1)) / total_w
            take = min(offer, demand[t] - share[t])
            share[t] += take
            given += take
        spare -= given
        hungry = {t for t in hungry if demand[t] - share[t] > Decimal("1e-9")}
        if given <= Decimal("1e-9"):
            break
    return share


@dataclass
class GpuHolding:
    tenant_id: str
    gpus: Decimal
    utilization_pct: int | None
    seen: datetime
    idle_since: datetime | None = None
    holder: str = ""   # the session (else agent) scope id of the process on it: what an idle reclaim names


@dataclass
class GpuWaits:
    """GPUs each tenant's sessions wait for, as their guards announce them (`Guard.wait_for_gpus`): the
    production stand-in for a scheduler's queue. A wait lasts `ttl` unless re-announced, and ends when
    the session is seen on a GPU (a process row of its session) or announces 0."""

    ttl: timedelta = timedelta(seconds=30)
    waits: dict[tuple, tuple[str, Decimal, datetime]] = field(default_factory=dict)   # level_key -> (tenant, GPUs, heard)

    def note(self, tenant_id: str, session_id: str, gpus: Decimal, now: datetime) -> None:
        if gpus > 0:
            self.waits[level_key(session_id)] = (tenant_id, gpus, now)
        else:
            self.waits.pop(level_key(session_id), None)

    def placed(self, session_id: str) -> None:
        """A session seen on a GPU waits no more (a guard's path id and a collector's bare id alike)."""
        self.waits.pop(level_key(session_id), None)

    def pending(self, tenant_id: str, now: datetime) -> Decimal:
        for sid in [s for s, (_, _, heard) in self.waits.items() if now - heard > self.ttl]:
            del self.waits[sid]
        return sum((g for t, g, _ in self.waits.values() if t == tenant_id), ZERO)


@dataclass
class GpuPool:
    """What the NVML samples say: capacity and who holds which GPU (or MIG slice)."""

    stale_after: timedelta = timedelta(minutes=2)
    idle_pct: int = 5
    devices: dict[str, datetime] = field(default_factory=dict)        # gpu_uuid -> last seen
    holdings: dict[str, GpuHolding] = field(default_factory=dict)    # device or slice -> holder

    def observe(self, level: str, gpu_uuid: str, mig_uuid: str, slices: int, total_slices: int,
                tenant_id: str, utilization_pct: int | None, ts: datetime, holder: str = "") -> None:
        if level == "gpu":
            self.devices[gpu_uuid] = ts
            return
        if level == "mig" and mig_uuid:
            self.devices[gpu_uuid] = ts
        if level != "process" or not tenant_id:
            return
        slot = mig_uuid or gpu_uuid
        gpus = Decimal(slices) / Decimal(total_slices) if mig_uuid and total_slices else Decimal(1)
        held = self.holdings.get(slot)
        idle = utilization_pct is not None and utilization_pct < self.idle_pct
        same = held is not None and held.tenant_id == tenant_id and held.holder == holder
        idle_since = (held.idle_since if same and held.idle_since else ts) if idle else None
        self.holdings[slot] = GpuHolding(tenant_id, gpus, utilization_pct, ts, idle_since, holder)

    def prune(self, now: datetime) -> None:
        for table in (self.devices, self.holdings):
            for key in [k for k, v in table.items() if now - (v if isinstance(v, datetime) else v.seen) > self.stale_after]:
                del table[key]

    @property
    def capacity(self) -> Decimal:
        return Decimal(len(self.devices))

    def usage(self, skip: set[str] = frozenset()) -> dict[str, Decimal]:
        """GPUs each tenant holds (but those of the holders in `skip`)."""
        used: dict[str, Decimal] = {}
        for h in self.holdings.values():
            if h.holder and h.holder in skip:
                continue
            used[h.tenant_id] = used.get(h.tenant_id, ZERO) + h.gpus
        return used

    def idle(self, now: datetime, idle_for: timedelta, skip: set[str] = frozenset()) -> dict[str, Decimal]:
        """GPUs each tenant holds that have been idle for at least `idle_for`."""
        out: dict[str, Decimal] = {}
        for h in self.holdings.values():
            if h.holder and h.holder in skip:
                continue
            if h.idle_since is not None and now - h.idle_since >= idle_for:
                out[h.tenant_id] = out.get(h.tenant_id, ZERO) + h.gpus
        return out
