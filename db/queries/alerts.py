"""What the notifications read of the runs table (SPEC §15): how many retries ended in a window and
how many of them failed, overall and for the worst target. Counted over the rows, since a fleet's
successes reach stuck-runs only through them; on the ended-attempts index, like `stats`.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from db.queries.common import TableStatements

# Given the runs table, the expression that names what a run scrapes (TARGET, SPEC §15).
TargetOf = Callable[[sa.Table], sa.ColumnElement]


class AlertStatements(TableStatements):
    def _retries_ended_since(self) -> list[sa.ColumnElement]:
        t, runs = self.t, self.runs
        return [
            # The ended-attempts index's own predicate, then what narrows it to retries that ran and ended.
            sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None)),
            t.c.completed_at >= sa.bindparam("sr_since"),
            t.c.is_retry,
            sa.or_(runs.in_state(t.c.status, "completed"), runs.in_state(t.c.status, "failed")),
        ]

    def retry_failures(self) -> sa.Select:
        """Retries that ended since `:sr_since` (completed or failed; a cancelled one never ran) and
        how many of them failed."""
        t = self.t
        return sa.select(
            sa.func.count().label("ended"),
            sa.func.count().filter(self.runs.in_state(t.c.status, "failed")).label("failed"),
        ).where(*self._retries_ended_since())

    def worst_target(self, target: TargetOf) -> sa.Select:
        """The target whose retries ended since `:sr_since` failed most often, among those with at
        least `:sr_min` of them: (target, ended, failed), one row or none."""
        t = self.t
        name = target(t)
        failed = sa.func.count().filter(self.runs.in_state(t.c.status, "failed"))
        rate = sa.cast(failed, sa.Float) / sa.func.count()
        return (
            sa.select(sa.cast(name, sa.Text).label("target"), sa.func.count().label("ended"), failed.label("failed"))
            .where(*self._retries_ended_since(), name.is_not(None))
            .group_by(name)
            .having(sa.func.count() >= sa.bindparam("sr_min"))
            .order_by(rate.desc(), sa.func.count().desc())
            .limit(1)
        )
