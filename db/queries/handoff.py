"""The statements of retries handed to the fleet (SPEC §12): the room the concurrency cap leaves,
handing a delivered retry over, and the handed-off attempts the fleet failed, whose chains
stuck-runs continues.

A handed-off retry is one whose `handed_off` is set (`webhook` or `queue`); it counts against
MAX_CONCURRENT_RETRIES until it ends (neither queued nor running), like a retry executing here,
which holds a slot lock instead.
"""

from __future__ import annotations

import sqlalchemy as sa

from db import locks
from db.queries.common import NOW, TableStatements
from db.table import RunsTable


class HandoffStatements(TableStatements):
    """`room`, `handoff_lock`, `hand_over` and `fleet_failures` for one table."""

    def __init__(self, runs: RunsTable) -> None:
        super().__init__(runs)
        t = self.t
        self.handoff_ns = locks.namespace(runs.canonical_name, locks.HANDOFF)
        slots_ns = locks.namespace(runs.canonical_name, locks.SLOTS)
        # Not yet ended: queued (only a mapped value: an enum may lack the word) or running.
        waiting = [runs.in_state(t.c.status, "queued")] if "queued" in runs.layout.statuses else []
        handed = sa.select(sa.func.count()).where(
            t.c.handed_off.is_not(None), sa.or_(runs.in_state(t.c.status, "running"), *waiting)
        )
        held = sa.select(sa.func.count()).select_from(locks.held_keys(slots_ns).subquery())
        # Read under `handoff_lock`, so no hand-off or slot changes hands unseen while it is counted.
        self.room = sa.select(
            sa.bindparam("sr_max", type_=sa.Integer) - handed.scalar_subquery() - held.scalar_subquery()
        )
        self.handoff_lock = sa.select(sa.func.pg_advisory_xact_lock(self.handoff_ns, 0))
        values: dict[str, object] = {"handed_off": sa.bindparam("sr_mode", type_=sa.Text), "started_at": NOW}
        if runs.heartbeat:
            values[runs.heartbeat] = NOW
        self.hand_over = (
            self._update()
            .values(**values)
            .where(t.c.id == sa.bindparam("sr_run_id"), runs.in_state(t.c.status, "running"))
            .returning(t.c.id)
        )
        # The scraper wrote `failed` on a retry it was handed: its chain goes on like any
        # execution's failure (fail_reported writes the pattern, so each is taken once).
        self.fleet_failures = (
            sa.select(*runs.keyed())
            .where(
                t.c.handed_off.is_not(None),
                runs.in_state(t.c.status, "failed"),
                t.c.failure_pattern.is_(None),
                t.c.next_retry_at.is_(None),
            )
            .limit(sa.bindparam("sr_limit"))
            .with_for_update(skip_locked=True, of=t)
        )
