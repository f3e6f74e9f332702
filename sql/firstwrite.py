"""First write wins: of the copies of one id, which the ledger keeps and what the others are.

The stored row, if any, is the charge; otherwise the first copy of the batch in
(priced_at, partition, offset) order, which is the order the stream priced them in. A later copy
with the same body is a duplicate (dropped, counted); one with another body (another tenant,
another cost) is a conflicting duplicate: dropped, dead-lettered naming both copies, and raised
as an anomaly. Bodies are the contract's fields as the ledger stores them (times to the
millisecond), so a copy re-priced after a crash (new priced_at) is still the same event.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

from meterline.schemas import events as ev

# The fields that make two copies the same event: what the producer said, and what it is charged.
BODY_FIELDS = {
    "priced_events": tuple(f for f in ev.UsageEvent.model_fields if f != "event_id"),
    "gpu_samples": tuple(f for f in ev.GpuSample.model_fields if f != "sample_id"),
    "compute_samples": tuple(f for f in ev.ComputeSample.model_fields if f != "sample_id"),
    # A notice, not a charge: what it is about. A re-emitted one (the worker replaying input after a crash makes a
    # conflict's anomaly again, same uuid5 id, new times) is a duplicate, not a conflict that would raise another.
    "anomalies": ("tenant_id", "kind", "scope", "scope_id"),
}


@dataclass(frozen=True)
class Copy:
    """One copy of an id: in the ledger already (index None) or in the batch (index: its Kafka message)."""

    id: str
    values: dict[str, Any]
    topic: str
    partition: int
    offset: int
    index: Any = None

    @property
    def tenant(self) -> str:
        return str(self.values.get("tenant_id") or "")

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def order(self) -> tuple:
        stored = self.index is None
        priced_at = self.values.get("priced_at") or datetime.min.replace(tzinfo=timezone.utc)
        return (not stored, _ms(priced_at), self.partition, self.offset)


@dataclass(frozen=True)
class Verdict:
    duplicates: list[Copy]                    # same body as the first: dropped
    conflicts: list[tuple[Copy, Copy, list[str]]]  # (first, this copy, fields that differ)


def judge(table: str, copies: Iterable[Copy]) -> Verdict:
    """Every copy but the first of each id is a duplicate or a conflict."""
    by_id: dict[str, list[Copy]] = {}
    for copy in copies:
        by_id.setdefault(copy.id, []).append(copy)
    duplicates, conflicts = [], []
    for group in by_id.values():
        first, *later = sorted(group, key=Copy.order)
        for copy in later:
            if copy.index is None:  # another stored copy (from before this rule): not ours to drop
                continue
            differ = [f for f in BODY_FIELDS[table] if _same(first.values.get(f)) != _same(copy.values.get(f))]
            (conflicts.append((first, copy, differ)) if differ else duplicates.append(copy))
    return Verdict(duplicates, conflicts)


def _ms(value: Any) -> Any:
    return value.astimezone(timezone.utc).replace(microsecond=value.microsecond // 1000 * 1000) \
        if isinstance(value, datetime) else value


def _same(value: Any) -> Any:
    """A value as the ledger keeps it: times to the millisecond in UTC, ids as text."""
    return str(value) if isinstance(value, uuid.UUID) else _ms(value)
