"""The hourly timeline behind the overview's chart and `GET /api/stats/hourly`: per UTC hour, the
retries that ended and how, and the stuck detections.

It reads the attempts stuck-runs touched by when they ended, the rows the ended-attempts index
holds (`completed_at` WHERE `is_retry OR failure_pattern IS NOT NULL`): a week of hours is an
index range, whatever the table's size. Hours without a row are not returned; the service fills them.
"""

from __future__ import annotations

import sqlalchemy as sa

from db.messages import STUCK_PATTERN
from db.queries.common import TableStatements


class TimelineStatements(TableStatements):
    """`hourly`, for one table."""

    def hourly(self) -> sa.Select:
        """Per hour (`hour`, its start; connections run in UTC) since `:sr_since`: retries that
        completed, retries that failed (`stats`' population: a retry cancelled before it ran is not
        counted) and stuck detections (attempts the checker failed as stuck)."""
        t, runs = self.t, self.runs
        hour = sa.func.date_trunc("hour", t.c.completed_at)
        return (
            sa.select(
                hour.label("hour"),
                sa.func.count().filter(t.c.is_retry, runs.in_state(t.c.status, "completed")).label("retries_succeeded"),
                sa.func.count().filter(t.c.is_retry, runs.in_state(t.c.status, "failed")).label("retries_failed"),
                sa.func.count().filter(t.c.failure_pattern == STUCK_PATTERN).label("stuck_detections"),
            )
            .where(sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None)), t.c.completed_at >= sa.bindparam("sr_since"))
            .group_by(hour)
            .order_by(hour)
        )
