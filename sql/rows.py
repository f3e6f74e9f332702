"""Contract objects (schemas/events.py) → ledger rows (column name → value).

The general, obviously-correct path: used by tests, tools and the sink's low-volume
tables. The sink's hot path for priced events (sql/fastrows.py) must produce the
same rows; a test checks that it does.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any

from meterline.schemas.events import (
    Anomaly,
    BudgetPolicy,
    ComputeSample,
    Contract,
    DeadLetter,
    GpuAllocation,
    GpuSample,
    PricedEvent,
    ScaleRecommendation,
    SpendUpdate,
    ThrottleDecision,
)

ZERO = Decimal(0)


def priced_event_row(event: PricedEvent) -> dict[str, Any]:
    row = event.model_dump()
    row["cost_usd"] = event.cost_usd if event.cost_usd is not None else ZERO  # unpriced rows cost 0, flagged
    return row


def gpu_sample_row(sample: GpuSample, gpu_seconds: Decimal, cost_usd: Decimal, catalog_version: str) -> dict[str, Any]:
    return {**sample.model_dump(), "gpu_seconds": gpu_seconds, "cost_usd": cost_usd, "catalog_version": catalog_version}


def compute_sample_row(sample: ComputeSample, cpu_cost_usd: Decimal, memory_cost_usd: Decimal,
                       catalog_version: str) -> dict[str, Any]:
    return {**sample.model_dump(), "cpu_cost_usd": cpu_cost_usd, "memory_cost_usd": memory_cost_usd,
            "cost_usd": cpu_cost_usd + memory_cost_usd, "catalog_version": catalog_version}


def throttle_decision_row(decision: ThrottleDecision) -> dict[str, Any]:
    row = decision.model_dump()
    limits = row.pop("limits")
    row.update(limits)
    row["priority"] = decision.priority or ""  # '' = every priority class
    return row


def budget_policy_row(policy: BudgetPolicy) -> dict[str, Any]:
    row = policy.model_dump()
    slo = row.pop("slo") or {}  # one nullable column per objective (migration 0014)
    for name in ("p95_latency_ms", "success_rate_pct", "cost_per_success_usd", "min_calls"):
        row[f"slo_{name}"] = slo.get(name)
    return {**row, "deleted": False}


def plain_row(record: Contract) -> dict[str, Any]:
    return record.model_dump()


ROW_BUILDERS = {
    PricedEvent: priced_event_row,
    SpendUpdate: plain_row,
    Anomaly: plain_row,
    ThrottleDecision: throttle_decision_row,
    BudgetPolicy: budget_policy_row,
    GpuAllocation: plain_row,
    ScaleRecommendation: plain_row,
    DeadLetter: plain_row,
}


def contract_row(record: Contract) -> dict[str, Any]:
    """The ledger row of any contract except GpuSample and ComputeSample (which need their price: gpu_sample_row,
    compute_sample_row)."""
    return ROW_BUILDERS[type(record)](record)


def with_offsets(row: dict[str, Any], topic: str, partition: int, offset: int, batch_start: int | None = None) -> dict[str, Any]:
    row.update(_topic=topic, _partition=partition, _offset=offset, _batch_start=offset if batch_start is None else batch_start)
    return row


def insert_rows(client, table: str, rows: list[dict[str, Any]]) -> None:
    """Insert dict rows (all with the same keys) column-wise."""
    if not rows:
        return
    names = list(rows[0])
    client.insert(table, [[r[n] for r in rows] for n in names], column_names=names, column_oriented=True)
