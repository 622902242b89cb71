"""The statements of retries handed to the fleet (SPEC §12): the room the concurrency cap leaves,
the hand-over of a delivery (marked, then confirmed or put back), and the handed-off attempts the
fleet failed, whose chains stuck-runs continues.

A delivery's mark is `delivering_by` (the delivering process and delivery) with a lease,
`delivering_until`; every write that ends a delivery is conditional on the mark still being its
own, and touches the status only where it still reads `running`: what the fleet wrote stands.

A handed-off retry is one whose `handed_off` is set (`webhook` or `queue`); it counts against
MAX_CONCURRENT_RETRIES until it ends (neither queued nor running), like a retry executing here,
which holds a slot lock instead.
"""

from __future__ import annotations

import sqlalchemy as sa

from db import locks
from db.queries.common import NOW, TableStatements, _arrays, statement

_UNMARKED = {"delivering_until": None, "delivering_by": None}


class HandoffStatements(TableStatements):
    """`room`, `handoff_lock`, `hand_over` and `fleet_failures` for one table."""

    @property
    def handoff_ns(self) -> int:
        return locks.namespace(self.runs.canonical_name, locks.HANDOFF)

    room = statement(lambda self: self._room())

    def _room(self) -> sa.Select:
        """The free slots: `:sr_max` less the retries handed to the fleet and not yet ended, less the
        slots held by processes executing here. Read under `handoff_lock`, so no hand-off or slot
        changes hands unseen while it is counted."""
        t, runs = self.t, self.runs
        slots_ns = locks.namespace(runs.canonical_name, locks.SLOTS)
        # Not yet ended: queued (only a mapped value: an enum may lack the word) or running.
        waiting = [runs.in_state(t.c.status, "queued")] if "queued" in runs.layout.statuses else []
        handed = sa.select(sa.func.count()).where(
            t.c.handed_off.is_not(None), sa.or_(runs.in_state(t.c.status, "running"), *waiting)
        )
        held = sa.select(sa.func.count()).select_from(locks.held_keys(slots_ns).subquery())
        return sa.select(sa.bindparam("sr_max", type_=sa.Integer) - handed.scalar_subquery() - held.scalar_subquery())

    handoff_lock = statement(lambda self: sa.select(sa.func.pg_advisory_xact_lock(self.handoff_ns, 0)))

    @property
    def handoff_lock_ahead(self) -> str:
        """`handoff_lock` as the SQL that precedes a statement in its query string (db/engine.py
        PRECEDED_BY): the lock and the statement in one round trip. Its keys are numbers, written in."""
        return f"SELECT pg_advisory_xact_lock({int(self.handoff_ns)}, 0)"

    mark_due = statement(lambda self: self._claim(one=False, deliver=True))
    mark_in_room = statement(lambda self: self._mark_in_room())
    mark_one = statement(lambda self: self._claim(one=True, deliver=True))
    mark_expired = statement(lambda self: self._mark_expired())

    def _mine(self) -> list[sa.ColumnElement]:
        t = self.t
        return [t.c.id == sa.bindparam("sr_run_id"), t.c.delivering_by == sa.bindparam("sr_by", type_=sa.Text)]

    @statement
    def end_delivery(self) -> sa.Update:
        """The fleet took it: the mark ends, whatever status the fleet has written since."""
        return self._update().values(**_UNMARKED).where(*self._mine()).returning(self.runs.state_of(self.t.c.status))

    @statement
    def end_deliveries(self) -> sa.Update:
        """The fleet took them (a set of confirms in one statement): the mark of each of `:sr_ids`
        ends if it is still its delivery's (`:sr_bys`, pairwise), whatever status the fleet has
        written since; the (id, mark) pairs whose mark ended, with their status."""
        t, runs = self.t, self.runs
        confirmed = _arrays(id=runs.id_type, by=sa.Text)
        # Their rows locked first, in the table's order: a fleet ending many of them in one statement
        # locks them in its scan's order, the table's; locked in the order given (a join by the key),
        # the two could each hold a row the other waits for, and PostgreSQL ends one after a second.
        locked = (
            sa.select(t.c.id, confirmed.c.by)
            .where(t.c.id == confirmed.c.id, t.c.delivering_by == confirmed.c.by)
            .order_by(sa.literal_column("ctid"))  # the unnest has none: the table's
            .with_for_update(of=t)
            .cte("locked")
            .prefix_with("MATERIALIZED")
        )
        return (
            self._update()
            .values(**_UNMARKED)
            .where(t.c.id == locked.c.id, t.c.delivering_by == locked.c.by)
            .returning(t.c.id, locked.c.by, runs.state_of(t.c.status))
        )

    @statement
    def put_back(self) -> sa.Update:
        """The fleet could not take it (or a signal stopped the delivery): pending again, due
        `:sr_due`, its budget unspent, `:sr_postponed` (0 or 1) more postponements."""
        t, runs = self.t, self.runs
        return (
            self._update()
            .values(
                status=runs.status("pending_retry"),
                next_retry_at=sa.bindparam("sr_due", type_=sa.DateTime(timezone=True)),
                started_at=runs.fresh_attempt_values(NOW).get("started_at", t.c.started_at),
                handed_off=None,
                postponements=t.c.postponements + sa.bindparam("sr_postponed", type_=sa.Integer),
                **_UNMARKED,
            )
            # Still the start the mark wrote: a fleet's worker that set its own start has the retry,
            # and its outcome (written conditionally on `running`) must find the row running.
            .where(
                *self._mine(),
                runs.in_state(t.c.status, "running"),
                t.c.started_at == sa.bindparam("sr_marked_started", type_=t.c.started_at.type),
            )
            .returning(t.c.id)
        )

    @statement
    def fleet_failures(self) -> sa.Select:
        """The scraper wrote `failed` on a retry it was handed: its chain goes on like any
        execution's failure (fail_reported writes the pattern, so each is taken once)."""
        t, runs = self.t, self.runs
        return (
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

    @statement
    def handed_running(self) -> sa.Select:
        """Retries handed over `:sr_mode` (confirmed: no delivery in flight), still `running`: an
        engine that knows its jobs is asked whether theirs ended (jobs/outcomes.py fail_ended_jobs)."""
        t, runs = self.t, self.runs
        return (
            sa.select(*runs.keyed())
            .where(
                t.c.handed_off == sa.bindparam("sr_mode", type_=sa.Text),
                runs.in_state(t.c.status, "running"),
                t.c.delivering_by.is_(None),
            )
            .order_by(t.c.started_at)
            .limit(sa.bindparam("sr_limit"))
        )

    def _mark_in_room(self) -> sa.Select:
        """`mark_due` for at most the room `:sr_max` leaves (`room`), counted in the same statement:
        one round trip fewer under the cap's lock. Each row carries that room (`_sr_room`); when none
        was marked, one row of NULLs (`_sr_locked` NULL) carries it alone: no room, or nothing due,
        told by the statement's own count (one counted after it may already see a slot the fleet
        freed meanwhile, and take "no room" for "nothing due")."""
        counted = self._room().cte("room")  # counted once, not for each row returned
        room = sa.select(counted.c[0]).scalar_subquery()
        taking = sa.func.greatest(0, sa.func.least(sa.bindparam("sr_limit", type_=sa.Integer), room))
        marked = self._claim(one=False, deliver=True, limit=taking).cte("marked")
        return sa.select(marked, counted.c[0].label("_sr_room")).select_from(counted.outerjoin(marked, sa.true()))

    def _mark_expired(self) -> sa.Update:
        """Marks anew up to `:sr_limit` retries whose delivery's lease ran out while still marked
        (their process died between the mark and the confirm): delivered again, with the same
        Idempotency-Key. Only `running` ones: a status the fleet wrote meanwhile ends it."""
        t, runs = self.t, self.runs
        expired = [
            runs.in_state(t.c.status, "running"),
            t.c.handed_off == sa.bindparam("sr_mode", type_=sa.Text),
            t.c.delivering_until < NOW,
        ]
        lapsed = (
            sa.select(t.c.id)
            .where(*expired, self.pauses.not_paused(NOW))
            .order_by(t.c.delivering_until)
            .limit(sa.bindparam("sr_limit"))
            .with_for_update(skip_locked=True)
            .cte("lapsed")
            .prefix_with("MATERIALIZED")
        )
        values: dict[str, object] = {"started_at": NOW, **self._delivery_mark()}
        if runs.heartbeat:
            values[runs.heartbeat] = NOW
        return (
            self._update()
            .values(**values)
            .where(t.c.id == lapsed.c.id, *expired)
            .returning(*runs.keyed(), sa.false().label("_sr_locked"), NOW.label("_sr_was_due"))
        )
