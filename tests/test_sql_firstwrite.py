"""sql/firstwrite.py alone (pure logic): which copy of an id is the charge, and what the others are."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from meterline.sql.firstwrite import Copy, judge

T0 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=timezone.utc)


def copy(partition: int, offset: int, priced_at: datetime, stored: bool = False, **values) -> Copy:
    body = {"tenant_id": "acme", "ts": T0, "cost_usd": Decimal("0.5"), "priced_at": priced_at, **values}
    return Copy("id-1", body, "priced", partition, offset, None if stored else f"msg{partition}@{offset}")


def test_the_first_priced_copy_wins_whatever_its_partition():
    genuine, forged = copy(7, 0, T0), copy(2, 0, T0 + timedelta(seconds=1), tenant_id="attacker", cost_usd=Decimal(0))
    verdict = judge("priced_events", [forged, genuine])
    assert verdict.duplicates == []
    [(first, conflict, differ)] = verdict.conflicts
    assert (first, conflict, differ) == (genuine, forged, ["tenant_id", "cost_usd"])


def test_a_stored_copy_wins_and_a_repriced_copy_is_a_duplicate():
    stored = copy(7, 0, T0, stored=True, ts=T0.replace(microsecond=123000), cost_usd=Decimal("0.500000000000000000"))
    again = copy(3, 9, T0 - timedelta(hours=1))  # priced earlier by its own clock, but the ledger has one already
    verdict = judge("priced_events", [again, stored])
    assert verdict.duplicates == [again] and verdict.conflicts == []  # times compare to the ms, money by value


def test_a_re_emitted_anomaly_is_a_duplicate_and_another_tenant_s_is_a_conflict():
    """`dlq replay` and a worker's crash replay re-send anomalies: the same notice with new times is a duplicate."""
    notice = {"tenant_id": "acme", "kind": "conflicting_duplicate", "scope": "tenant", "scope_id": "acme", "ts": T0}
    stored = Copy("a-1", notice, "anomalies", 0, 3)
    again = Copy("a-1", {**notice, "ts": T0 + timedelta(hours=2)}, "anomalies", 1, 8, "msg1@8")
    forged = Copy("a-1", {**notice, "tenant_id": "other"}, "anomalies", 2, 9, "msg2@9")
    verdict = judge("anomalies", [again, forged, stored])
    assert verdict.duplicates == [again]
    assert [(c, differ) for _, c, differ in verdict.conflicts] == [(forged, ["tenant_id"])]
