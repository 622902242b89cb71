"""Retries and outcomes per hour: the overview's chart and `GET /api/stats/hourly` read this one function.

Hours are UTC hours, every hour of the window present (an hour with nothing in it counts zeros), the
current hour last and still filling. The counts are `stats`' own: retries that ended (completed or
failed) and stuck detections, by when the attempt ended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from db.engine import database_errors
from db.errors import UsageError
from jobs.listing import DASHBOARD_STATEMENT_TIMEOUT_MS
from jobs.model import as_utc
from jobs.runtime import Runtime

HOUR = timedelta(hours=1)
MAX_WINDOW = timedelta(days=31)  # 745 hours: a chart, not an export


@dataclass(frozen=True)
class HourCounts:
    hour: datetime  # the hour's start, UTC
    retries_succeeded: int = 0
    retries_failed: int = 0
    stuck_detections: int = 0

    @property
    def retries(self) -> int:
        return self.retries_succeeded + self.retries_failed


@dataclass(frozen=True)
class HourlyTimeline:
    since: datetime  # the first hour's start
    hours: tuple[HourCounts, ...]  # oldest first, one per hour up to the current one

    @property
    def retries(self) -> int:
        return sum(h.retries for h in self.hours)

    @property
    def stuck_detections(self) -> int:
        return sum(h.stuck_detections for h in self.hours)


def hour_start(at: datetime) -> datetime:
    """The start of `at`'s UTC hour."""
    return as_utc(at).astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def every_hour(first: datetime, last: datetime, counted: Iterable[HourCounts]) -> tuple[HourCounts, ...]:
    """One `HourCounts` per hour from `first`'s to `last`'s, both included: the counted ones as
    given, zeros for the rest. Counts outside the range are dropped."""
    by_hour: Mapping[datetime, HourCounts] = {hour_start(c.hour): c for c in counted}
    start, end = hour_start(first), hour_start(last)
    hours = []
    at = start
    while at <= end:
        hours.append(by_hour.get(at) or HourCounts(at))
        at += HOUR
    return tuple(hours)


def hourly_timeline(rt: Runtime, since: timedelta = timedelta(days=7)) -> HourlyTimeline:
    """The window's hours, from the hour `since` ago to the current one."""
    if since > MAX_WINDOW:
        raise UsageError(
            f"since={since.days}d is longer than the hourly timeline shows: use at most {MAX_WINDOW.days}d"
        )
    now = rt.clock.now()
    first = hour_start(now - since)
    with database_errors(rt.engine, "reading the hourly timeline"), rt.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {DASHBOARD_STATEMENT_TIMEOUT_MS}")
        rows = conn.execute(rt.queries.hourly(), {"sr_since": first}).mappings().all()
    counted = [HourCounts(**{**row, "hour": as_utc(row["hour"])}) for row in rows]
    return HourlyTimeline(first, every_hour(first, now, counted))
