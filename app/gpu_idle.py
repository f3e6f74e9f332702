"""GPU time no process used, allocated by a stated rule (Settings.gpu_idle_policy).

A GPU that is paid for costs money whether or not a process runs on it, so every GPU-second the
catalog prices lands on a chargeback line: process time on its session (gpu_samples), the rest
(sql/queries/gpu_idle_units.sql: per device or MIG slice, hour and holder) by one of

* `owner`: the tenant (team, project) that holds the device or slice (gpu_allocations, from
  `meterline gpu assign` or `collect gpu --tenant`); nobody holds it: the `idle` line;
* `proportional`: spread over the tenants whose processes used the device in that hour, by the cost
  of their process time; an hour nobody used goes to the holder, else the `idle` line;
* `separate`: an explicit `idle` line (tenant `idle`), per device in `report gpu`.

Splits are exact: each share is rounded down to a pico-dollar (a pico-GPU-second) and the remainder
goes to the largest user, so the lines of a unit always add up to it.
"""
from __future__ import annotations

from collections import defaultdict
from decimal import ROUND_DOWN, Decimal
from typing import Any, Iterable

POLICIES = ("owner", "proportional", "separate")
IDLE = "idle"  # the tenant of idle time no rule places (and of every idle line under `separate`)
QUANTUM = Decimal("1e-12")


def idle_lines(ledger: Any, since, until, policy: str) -> list[dict[str, Any]]:
    """One line per (period, device or slice, tenant/team/project) with its idle gpu_seconds and cost_usd."""
    from .report import load_query

    if policy not in POLICIES:
        raise ValueError(f"the GPU idle policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    window = {"since": since, "until": until}
    units = ledger.query(load_query("gpu_idle_units"), window).dicts()
    if policy == "separate":
        return [_line(u, policy, IDLE, "", "") for u in units]
    if policy == "owner":
        return [_held(u, policy) for u in units]
    users: dict[tuple, dict[str, Decimal]] = defaultdict(dict)
    for row in ledger.query(load_query("gpu_device_users"), window).dicts():
        users[(row["period_start"], row["node"], row["gpu_uuid"])][row["tenant_id"]] = row["cost_usd"]
    out: list[dict[str, Any]] = []
    for unit in units:
        shares = users.get((unit["period_start"], unit["node"], unit["gpu_uuid"]))
        out.extend(_spread(unit, shares, policy) if shares else [_held(unit, policy)])
    return out


def _held(unit: dict[str, Any], policy: str) -> dict[str, Any]:
    if unit["tenant_id"]:
        return _line(unit, policy, unit["tenant_id"], unit["team"], unit["project"])
    return _line(unit, policy, IDLE, "", "")


def _spread(unit: dict[str, Any], shares: dict[str, Decimal], policy: str) -> list[dict[str, Any]]:
    costs, seconds = split(unit["cost_usd"], shares), split(unit["gpu_seconds"], shares)
    return [_line(unit, policy, tenant, "", "", seconds[tenant], costs[tenant]) for tenant in shares]


def split(amount: Decimal, weights: dict[str, Decimal]) -> dict[str, Decimal]:
    """`amount` over the keys by weight, each share rounded down to QUANTUM, the remainder on the largest
    weight (ties: the first key in sorted order): the shares add up to `amount` exactly."""
    total = sum(weights.values(), Decimal(0))
    parts = {k: (amount * w / total).quantize(QUANTUM, ROUND_DOWN) for k, w in weights.items()}
    largest = min(weights, key=lambda k: (-weights[k], k))
    parts[largest] += amount - sum(parts.values(), Decimal(0))
    return parts


def _line(unit: dict[str, Any], policy: str, tenant: str, team: str, project: str,
          seconds: Decimal | None = None, cost: Decimal | None = None) -> dict[str, Any]:
    return {"hour": unit["period_start"], "period_end": unit["period_end"], "node": unit["node"],
            "gpu_uuid": unit["gpu_uuid"], "mig_uuid": unit["mig_uuid"],
            "gpu_name": unit["gpu_name"], "tenant_id": tenant, "team": team, "project": project,
            "gpu_seconds": unit["gpu_seconds"] if seconds is None else seconds,
            "cost_usd": unit["cost_usd"] if cost is None else cost, "policy": policy,
            "catalog_version": unit["catalog_version"], "list_rate_per_hour": list_rate(unit["gpu_name"])}


def list_rate(gpu_name: str) -> Decimal | None:
    """The catalog's $/hour for the whole device (FOCUS ListUnitPrice); None if it has none."""
    from meterline.streams.pricing import load_catalog

    return load_catalog().gpu_hourly(gpu_name)


def matching(lines: Iterable[dict[str, Any]], tenant: str = "", team: str = "", project: str = "") -> list[dict[str, Any]]:
    """The lines a report's --tenant / --team / --project filters keep (as the SQL filters do)."""
    return [line for line in lines if all(not want or line[col] == want
                                          for col, want in (("tenant_id", tenant), ("team", team), ("project", project)))]
