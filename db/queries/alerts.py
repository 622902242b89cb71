"""What the notifications read of the runs table (SPEC §15): how many retries ended in a window and
how many of them failed (the worst target is jobs.targets', as `stats --by target` ranks it). Counted over the rows, since a fleet's
successes reach stuck-runs only through them; on the ended-attempts index, like `stats`.
"""

from __future__ import annotations

import sqlalchemy as sa

from db.queries.common import TableStatements


class AlertStatements(TableStatements):
    def _retries_ended_since(self) -> list[sa.ColumnElement]:
        t = self.t
        return [
            # The ended-attempts index's own predicate, then what narrows it to retries that ran and ended.
            sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None)),
            t.c.completed_at >= sa.bindparam("sr_since"),
            self.retry_ended(t),
        ]

    def retry_failures(self) -> sa.Select:
        """Retries that ended since `:sr_since` (completed or failed; a cancelled one never ran) and
        how many of them failed."""
        t = self.t
        return sa.select(
            sa.func.count().label("ended"),
            sa.func.count().filter(self.runs.in_state(t.c.status, "failed")).label("failed"),
        ).where(*self._retries_ended_since())
