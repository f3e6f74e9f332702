"""Budget periods, computed in the budget's own time zone (DST-safe).

day / week / month repeat from a reset anchor: its local time of day, its weekday
(week) or its day of the month (month, clamped to short months). Without an anchor a
period starts at local midnight, on Monday, on the 1st. `custom` repeats every
`period_seconds` from `period_anchor`.
"""
from __future__ import annotations

import calendar
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from meterline.schemas.events import BudgetPolicy


def period_bounds(policy: BudgetPolicy, at: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the period that contains `at`, both in UTC."""
    if policy.period == "custom":
        assert policy.period_anchor is not None and policy.period_seconds is not None
        step = timedelta(seconds=policy.period_seconds)
        start = policy.period_anchor + ((at - policy.period_anchor) // step) * step
        return start.astimezone(timezone.utc), (start + step).astimezone(timezone.utc)
    tz = ZoneInfo(policy.timezone)
    anchor = (policy.period_anchor or datetime(2024, 1, 1, tzinfo=tz)).astimezone(tz)
    local = at.astimezone(tz).replace(tzinfo=None)
    start = _start_on_or_before(policy.period, anchor, local)
    end = _next_start(policy.period, anchor, start)
    return _to_utc(start, tz), _to_utc(end, tz)


def _at_anchor_time(day: datetime, anchor: datetime) -> datetime:
    return day.replace(hour=anchor.hour, minute=anchor.minute, second=anchor.second, microsecond=0)


def _month_start(year: int, month: int, anchor: datetime) -> datetime:
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return _at_anchor_time(datetime(year, month, day), anchor)


def _start_on_or_before(period: str, anchor: datetime, local: datetime) -> datetime:
    if period == "day":
        start = _at_anchor_time(local, anchor)
        return start if start <= local else start - timedelta(days=1)
    if period == "week":
        start = _at_anchor_time(local - timedelta(days=(local.weekday() - anchor.weekday()) % 7), anchor)
        return start if start <= local else start - timedelta(days=7)
    start = _month_start(local.year, local.month, anchor)
    if start > local:
        year, month = (local.year, local.month - 1) if local.month > 1 else (local.year - 1, 12)
        start = _month_start(year, month, anchor)
    return start


def _next_start(period: str, anchor: datetime, start: datetime) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    year, month = (start.year, start.month + 1) if start.month < 12 else (start.year + 1, 1)
    return _month_start(year, month, anchor)


def _to_utc(wall: datetime, tz: ZoneInfo) -> datetime:
    return wall.replace(tzinfo=tz).astimezone(timezone.utc)
