"""Cancelling running retries (SPEC §16): the operators' requests in stuck-runs' own table
`stuck_runs_cancels` (one row per runs table and run, the run's id as text), and the conditional
writes that end a running retry as `cancelled`.

A request is read by the process executing the retry here (by its key, within DISPATCH_POLL), or
claimed by a dispatcher pass for a retry handed to an engine that can be told to stop
(`signalled_at`: the engine was asked; the forceful stop follows CANCEL_TIMEOUT later). The row
itself only ever changes from `running` (or a hand-off's `queued`): a completion that wins the
race stands.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from db import locks
from db.arrays import array_param
from db.queries.common import NOW, TableStatements, statement

CANCELS = "stuck_runs_cancels"

_KEY = sa.bindparam("sr_run_key", type_=sa.Text)  # the run's id as text (str(id): PostgreSQL's own text form)


class CancelStatements(TableStatements):
    """`request_cancel`, `cancel_requested`, `forget_cancel`, `nobody_executes`, `cancel_running`,
    `cancel_queued`, and an engine's `unsignalled_cancels`, `signal_cancels`, `drop_cancels`,
    `claim_overdue`, `unclaim_cancels`."""

    @statement
    def cancels(self) -> sa.Table:
        return sa.Table(
            CANCELS,
            sa.MetaData(),
            sa.Column("runs_table", sa.Text, primary_key=True),
            sa.Column("run_id", sa.Text, primary_key=True),
            sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("requested_by", sa.Text, nullable=False),
            sa.Column("signalled_at", sa.DateTime(timezone=True)),  # an engine was asked to stop it
            schema=self.t.schema,
        )

    def _of_table(self) -> sa.ColumnElement:
        return self.cancels.c.runs_table == sa.literal(self.runs.canonical_name, sa.Text)

    @statement
    def request_cancel(self) -> sa.Insert:
        """Records the request (a second one for the same run changes nothing); RETURNING says
        whether this one was new."""
        c = self.cancels
        return (
            insert(c)
            .values(
                runs_table=self.runs.canonical_name, run_id=_KEY, requested_at=NOW, requested_by=sa.bindparam("sr_by")
            )
            .on_conflict_do_nothing()
            .returning(c.c.run_id)
        )

    @statement
    def cancel_requested(self) -> sa.Select:
        """Who asked to cancel run `:sr_run_key`; nothing when nobody did."""
        c = self.cancels.c
        return sa.select(c.requested_by).where(self._of_table(), c.run_id == _KEY)

    @statement
    def requested_among(self) -> sa.Select:
        """The requests (run key, who asked) of the runs `:sr_keys`: the retries a process executes."""
        c = self.cancels.c
        return sa.select(c.run_id, c.requested_by).where(
            self._of_table(), c.run_id == sa.any_(array_param("sr_keys", sa.Text))
        )

    @statement
    def forget_cancel(self) -> sa.Delete:
        c = self.cancels
        return sa.delete(c).where(self._of_table(), c.c.run_id == _KEY).returning(c.c.requested_by)

    @statement
    def nobody_executes(self) -> sa.Select:
        """True when no live session holds run `:sr_run_key`'s lock (its executing process is gone):
        taken for the transaction only, so it also keeps a process from claiming it meanwhile."""
        return sa.select(sa.func.pg_try_advisory_xact_lock(self.runs_ns, locks.run_key(_KEY)))

    cancel_running = statement(lambda self: self._cancel_from("running"))
    cancel_queued = statement(lambda self: self._cancel_from("queued"))

    def _cancel_from(self, state: str) -> sa.Update:
        """Runs `:sr_ids` still in `state` and not being delivered become `cancelled` with
        `:sr_message`; no budget is spent and no retry scheduled (nothing else of the chain
        changes). A row another process marked for delivery (its lease not yet run out) is left to
        that delivery, even when the caller read it before the mark (SPEC §12); a lease that ran
        out (its process died) ends with the row."""
        t, runs = self.t, self.runs
        not_delivered = sa.or_(t.c.delivering_until.is_(None), t.c.delivering_until <= NOW)
        return (
            self._update()
            .values(
                status=runs.status("cancelled"),
                error_message=runs.error_value(sa.bindparam("sr_message", type_=sa.Text)),
                completed_at=NOW,
                next_retry_at=None,
                delivering_until=None,
                delivering_by=None,
            )
            .where(
                t.c.id == sa.any_(array_param("sr_ids", runs.id_type)), runs.in_state(t.c.status, state), not_delivered
            )
            .returning(t.c.id)
        )

    @statement
    def unsignalled_cancels(self) -> sa.Select:
        """Requests no engine was asked about yet, oldest first, locked (another pass skips them)."""
        c = self.cancels.c
        return (
            sa.select(c.run_id, c.requested_by)
            .where(self._of_table(), c.signalled_at.is_(None))
            .order_by(c.requested_at)
            .limit(sa.bindparam("sr_limit"))
            .with_for_update(skip_locked=True)
        )

    @statement
    def signal_cancels(self) -> sa.Update:
        c = self.cancels
        keys = array_param("sr_keys", sa.Text)
        return sa.update(c).where(self._of_table(), c.c.run_id == sa.any_(keys)).values(signalled_at=NOW)

    @statement
    def drop_cancels(self) -> sa.Delete:
        c = self.cancels
        keys = array_param("sr_keys", sa.Text)
        return sa.delete(c).where(self._of_table(), c.c.run_id == sa.any_(keys))

    @statement
    def claim_overdue(self) -> sa.Update:
        """Claims the requests an engine was asked about at or before `:sr_before` (CANCEL_TIMEOUT
        ago) for the pass that stops them forcefully if they still run: `signalled_at` moves to
        now, so no other pass takes them for CANCEL_TIMEOUT (and, should this pass's process die,
        one takes them then). The pass drops those the engine answered about (`drop_cancels`) and
        gives back the others (`unclaim_cancels`)."""
        c = self.cancels
        before = sa.bindparam("sr_before", type_=sa.DateTime(timezone=True))
        return (
            sa.update(c)
            .where(self._of_table(), c.c.signalled_at <= before)
            .values(signalled_at=NOW)
            .returning(c.c.run_id)
        )

    @statement
    def unclaim_cancels(self) -> sa.Update:
        """Gives requests `:sr_keys` claimed at `:sr_now` back as overdue (`signalled_at` =
        `:sr_before`): the engine did not answer, the next pass asks again."""
        c = self.cancels
        keys = array_param("sr_keys", sa.Text)
        before = sa.bindparam("sr_before", type_=sa.DateTime(timezone=True))
        return (
            sa.update(c)
            .where(self._of_table(), c.c.run_id == sa.any_(keys), c.c.signalled_at == NOW)
            .values(signalled_at=before)
        )

    @statement
    def runs_by_ids(self) -> sa.Select:
        t = self.t
        return sa.select(*self.runs.keyed()).where(t.c.id == sa.any_(array_param("sr_ids", self.runs.id_type)))

    def pending_candidates(
        self,
        *,
        error_like: bool = False,
        columns_like: tuple[str, ...] = (),
        since: bool = False,
        state: str = "pending_retry",
    ) -> sa.Select:
        """A bulk cancel's retries in `state` (pending; or `running` with `--running`), soonest due
        first, up to `:sr_limit`: `:sr_<column>_like` on their inputs; `:sr_error_like` and
        `:sr_since` on the attempt each retries (its error, its end)."""
        t, runs = self.t, self.runs
        where = [runs.in_state(t.c.status, state), t.c.is_retry]
        for column in columns_like:
            where.append(sa.cast(t.c[column], sa.Text).ilike(sa.bindparam(f"sr_{column}_like")))
        if error_like or since:
            before = self.t.alias("before")
            retried = [
                sa.func.coalesce(before.c.original_run_id, before.c.id) == t.c.original_run_id,
                before.c.retry_count == t.c.retry_count - 1,
            ]
            if error_like:
                error = sa.cast(runs.error_text(before.c.error_message), sa.Text)
                retried.append(error.ilike(sa.bindparam("sr_error_like")))
            if since:
                ended = sa.func.coalesce(before.c.completed_at, before.c.started_at)
                retried.append(ended >= sa.bindparam("sr_since", type_=sa.DateTime(timezone=True)))
            where.append(sa.exists().where(*retried))
        return (
            sa.select(*runs.keyed())
            .where(*where)
            .order_by(t.c.next_retry_at.asc().nulls_last(), t.c.started_at)
            .limit(sa.bindparam("sr_limit"))
        )
