"""The retries' statements: failing attempts (with their retries and dead letters), scheduling,
claiming due retries, completing and releasing claimed ones, superseding and cancelling, and
the failed chains a retry can be requeued from.

Each state change is an UPDATE conditional on the state it expects; callers read RETURNING to
learn what really changed.
"""

from __future__ import annotations

import sqlalchemy as sa

from db import locks
from db.arrays import array_param
from db.messages import RETRY_SCHEDULED_TAIL
from db.queries.common import NOW, TableStatements, _arrays, statement


class RetryStatements(TableStatements):
    """`fail_running`, `fail_reported`, `schedule`, `claim_due`, `claim_one`, `due_preview`,
    `complete`, `release`, the superseded batch and preview, and `cancel_pending` (superseded or by an
    operator; the candidates of a bulk cancel are db/queries/cancels.py's)."""

    fail_running = statement(lambda self: self._fail("running", reported=False))
    fail_reported = statement(lambda self: self._fail("failed", reported=True))
    superseded_batch = statement(lambda self: self._superseded(lock=True))
    superseded_preview = statement(lambda self: self._superseded(lock=False))
    cancel_pending = statement(lambda self: self._transition("pending_retry", "cancelled"))
    claim_due = statement(lambda self: self._claim(one=False))
    claim_one = statement(lambda self: self._claim(one=True))
    queue_due = statement(lambda self: self._claim(one=False, to_queue=True))
    queue_one = statement(lambda self: self._claim(one=True, to_queue=True))
    due_preview = statement(lambda self: self._due(lock=False).add_columns(self.t.c.next_retry_at))

    @statement
    def complete(self) -> sa.Update:
        t, runs = self.t, self.runs
        return (
            self._update()
            .values(status=runs.status("completed"), completed_at=NOW)
            .where(t.c.id == sa.bindparam("sr_run_id"), runs.in_state(t.c.status, "running"))
            .returning(t.c.id)
        )

    @statement
    def release(self) -> sa.Update:
        t, runs = self.t, self.runs
        return (
            self._update()
            .values(
                status=runs.status("pending_retry"),
                next_retry_at=NOW,
                started_at=runs.fresh_attempt_values(NOW).get("started_at", t.c.started_at),
            )
            .where(t.c.id.in_(sa.bindparam("sr_ids", expanding=True)), runs.in_state(t.c.status, "running"))
            .returning(t.c.id)
        )

    schedule = statement(lambda self: self._schedule())

    @statement
    def unclaim(self) -> sa.Update:
        t, runs = self.t, self.runs
        return (
            self._update()
            .values(
                status=runs.status("pending_retry"),
                next_retry_at=sa.bindparam("sr_due", type_=sa.DateTime(timezone=True)),
                started_at=runs.fresh_attempt_values(NOW).get("started_at", t.c.started_at),
            )
            .where(t.c.id == sa.bindparam("sr_run_id"), runs.in_state(t.c.status, "running"))
            .returning(t.c.id)
        )

    def _fail(self, from_status: str, *, reported: bool) -> sa.Select:
        """Fails the attempts in the arrays and, in the same statement, creates their retries
        and dead letters.

        `running` attempts (stuck, or executed and failed) get `completed_at = now`. With
        `reported`, the attempts are ones the scraper itself already marked `failed`: only those
        without a scheduled retry are touched and their `completed_at` is kept.
        Returns (id, retry_id, dead_letter_run_id) per attempt really failed: the caller knows the
        rest from the decisions it bound.
        """
        t, runs = self.t, self.runs
        v = _arrays(
            id=runs.id_type,
            message=sa.Text(),
            budget=sa.Integer(),
            due=sa.DateTime(timezone=True),
            pattern=sa.Text(),
            detail=sa.Text(),
        )
        where = [t.c.id == v.c.id, runs.in_state(t.c.status, from_status)]
        completed_at: sa.ColumnElement = NOW
        if reported:
            # Not yet continued: a failure another process already continued (it wrote the
            # pattern) is not decided twice.
            where.extend([t.c.next_retry_at.is_(None), t.c.failure_pattern.is_(None)])
            completed_at = sa.func.coalesce(t.c.completed_at, NOW)
        failed = (
            self._update()
            .values(
                status=runs.status("failed"),
                error_message=runs.error_value(v.c.message),
                completed_at=completed_at,
                max_retries=v.c.budget,
                next_retry_at=v.c.due,
                failure_pattern=v.c.pattern,
            )
            .where(*where)
            .returning(*t.c, v.c.detail.label("_sr_detail"))
            .cte("failed")
        )
        retried = self._retry_rows(failed).cte("retried")
        dead = self._dead_letters(failed).cte("dead")
        return (
            sa.select(failed.c.id, retried.c.id.label("retry_id"), dead.c.run_id.label("dead_letter_run_id"))
            .select_from(failed)
            .outerjoin(
                retried,
                sa.and_(
                    retried.c.original_run_id == sa.func.coalesce(failed.c.original_run_id, failed.c.id),
                    retried.c.retry_count == failed.c.retry_count + 1,
                ),
            )
            .outerjoin(dead, dead.c.run_id == failed.c.id)
        )

    def _schedule(self) -> sa.Select:
        """Schedules retries of the failed attempts in `:sr_ids`, each due `:sr_dues` with chain
        budget `:sr_budgets`. Attempts no longer `failed` are left alone; returns one row per
        retry created: (failed_id, retry_id, retry_count)."""
        t, runs = self.t, self.runs
        v = _arrays(id=runs.id_type, due=sa.DateTime(timezone=True), budget=sa.Integer())
        attempt = (
            self._update()
            .values(next_retry_at=v.c.due, max_retries=v.c.budget)
            .where(t.c.id == v.c.id, runs.in_state(t.c.status, "failed"))
            .returning(*t.c)
            .cte("failed")
        )
        retried = self._retry_rows(attempt).cte("retried")
        return sa.select(
            attempt.c.id.label("failed_id"), retried.c.id.label("retry_id"), retried.c.retry_count
        ).join_from(
            attempt,
            retried,
            sa.and_(
                retried.c.original_run_id == sa.func.coalesce(attempt.c.original_run_id, attempt.c.id),
                retried.c.retry_count == attempt.c.retry_count + 1,
            ),
        )

    def _transition(self, from_status: str, to_status: str) -> sa.Update:
        """Moves the runs in `:ids` from one status to another, each with its own message."""
        t, runs = self.t, self.runs
        v = _arrays(id=runs.id_type, message=sa.Text())
        return (
            self._update()
            .values(
                status=runs.status(to_status),
                error_message=runs.error_value(v.c.message),
                completed_at=NOW,
                next_retry_at=None,
            )
            .where(t.c.id == v.c.id, runs.in_state(t.c.status, from_status))
            .returning(t.c.id)
        )

    def _due(self, *, lock: bool) -> sa.Select:
        t = self.t
        query = (
            sa.select(t.c.id, t.c.retry_count, t.c.max_retries, self.runs.what().label("what"))
            .where(
                self.runs.in_state(t.c.status, "pending_retry"),
                t.c.next_retry_at <= NOW,
                # OFFSET 0: a subquery PostgreSQL runs for each candidate (by the primary key and the
                # chain index), never pulled up into an anti-join planned from the table's stats:
                # with stats taken when few runs had completed, that join compared every candidate
                # with every completed run (15-50 ms for a set of 70 marks over 10,000 runs).
                ~self._chain_completed(t).offset(0).exists(),
                self.pauses.not_paused(NOW),
            )
            .order_by(*self._start_order())
            .limit(sa.bindparam("sr_limit"))
        )
        return query.with_for_update(skip_locked=True, of=t) if lock else query

    def _start_order(self) -> list[sa.ColumnElement]:
        """Which due retry starts first when slots are fewer (SPEC §16): the highest `priority`
        (when COLUMN_MAP maps one; none last), then the longest overdue. NaN and ±Infinity (a
        numeric or double precision column holds them) are none, as jobs.rules.known_priority
        says: `p - p = 0` holds for finite numbers only (PostgreSQL sorts NaN above them all)."""
        t, priority = self.t, self.runs.priority
        if not priority:
            return [t.c.next_retry_at]
        column = t.c[priority]
        finite = sa.case((column - column == 0, column), else_=sa.null())
        return [finite.desc().nulls_last(), t.c.next_retry_at]

    def _claim(
        self, *, one: bool, to_queue: bool = False, deliver: bool = False, limit: sa.ColumnElement | None = None
    ) -> sa.Update:
        """Claims up to `:sr_limit` (or `limit`) due retries (with `one`: pending retry `:sr_run_id`, due or
        not) for execution, and takes their run locks.

        The run lock (session-level, in the claiming connection) tells the stuck checker the
        run is being executed by a live process; it goes away with that process.
        With `to_queue` the retries are handed to the fleet's workers instead (SPEC §12): they
        take the scraper's `queued` value, `handed_off` says so, `started_at` is when (the sweep
        fails one nobody starts), and no run lock is taken: no process here executes them.
        With `deliver` they are marked as being delivered to the fleet (SPEC §12's hand-over):
        `handed_off` `:sr_mode`, `delivering_by` `:sr_by`, its lease until `:sr_lease_until`; no
        run lock either (the mark keeps the stuck checker off, and no session is held).
        """
        t, runs = self.t, self.runs
        values: dict[str, object] = {
            "status": runs.status("queued" if to_queue else "running"),
            "started_at": NOW,
            "completed_at": None,
            "error_message": sa.null(),  # SQL NULL: None would be JSON null in a json error column
            # next_retry_at is when a failed attempt's retry is due; a running attempt has none.
            "next_retry_at": None,
            "failure_pattern": None,
            "handed_off": "queue" if to_queue else None,
        }
        if runs.heartbeat:
            values[runs.heartbeat] = NOW
        if deliver:
            values.update(self._delivery_mark())
        if one:
            chosen = sa.select(t.c.id, t.c.next_retry_at).where(
                t.c.id == sa.bindparam("sr_run_id"),
                runs.in_state(t.c.status, "pending_retry"),
                self.pauses.not_paused(NOW),
            )
            due = chosen.with_for_update(skip_locked=True).cte("due")
        else:
            # MATERIALIZED: the LIMIT ... SKIP LOCKED must run once. As an IN (subquery)
            # PostgreSQL may rescan it per outer row and claim more rows than the limit.
            due = self._due(lock=True).with_only_columns(t.c.id, t.c.next_retry_at)
            if limit is not None:
                due = due.limit(limit)
            due = due.cte("due").prefix_with("MATERIALIZED")
        locked = (
            sa.false() if to_queue or deliver else sa.func.pg_try_advisory_lock(self.runs_ns, locks.run_key(t.c.id))
        )
        return (
            self._update()
            .values(**values)
            .where(t.c.id == due.c.id, runs.in_state(t.c.status, "pending_retry"))
            # When it was due: a claim whose scraper cannot start puts it back as it was (`unclaim`).
            .returning(*runs.keyed(), locked.label("_sr_locked"), due.c.next_retry_at.label("_sr_was_due"))
        )

    def _delivery_mark(self) -> dict[str, object]:
        return {
            "handed_off": sa.bindparam("sr_mode", type_=sa.Text),
            "delivering_by": sa.bindparam("sr_by", type_=sa.Text),
            "delivering_until": sa.bindparam("sr_lease_until", type_=sa.DateTime(timezone=True)),
        }

    def _superseded(self, *, lock: bool) -> sa.Select:
        """Pending retries whose chain already has a completed run, with that run's id."""
        t = self.t
        completed = self._chain_completed(t)
        query = sa.select(
            t.c.id,
            t.c.original_run_id,
            t.c.retry_count,
            t.c.max_retries,
            self.runs.what().label("what"),
            completed.limit(1).scalar_subquery().label("completed_id"),
        ).where(self.runs.in_state(t.c.status, "pending_retry"), completed.exists())
        return query.with_for_update(skip_locked=True, of=t) if lock else query

    def clear_completed_due(self) -> sa.Update:
        """Clears `next_retry_at` on the completed runs of the chains in `:sr_chains`.

        A run failed as stuck and completed late by the scraper keeps the retry due its failure
        set; once that retry is superseded the chain has none due. Its error column loses the
        message stuck-runs wrote (`Run stuck for 1.5h - retry 1/4 scheduled`): a completed run has
        no error to show. A message the scraper wrote since stays. Only `completed` rows change.
        """
        t, runs = self.t, self.runs
        chains = array_param("sr_chains", self.runs.id_type)
        ours = sa.cast(runs.error_text(t.c.error_message), sa.Text).regexp_match(RETRY_SCHEDULED_TAIL)
        return (
            self._update()
            .values(
                next_retry_at=None,
                error_message=sa.case((ours, sa.cast(sa.null(), t.c.error_message.type)), else_=t.c.error_message),
            )
            .where(
                self.runs.in_state(t.c.status, "completed"),
                t.c.next_retry_at.is_not(None),
                sa.or_(t.c.id == sa.any_(chains), sa.and_(t.c.is_retry, t.c.original_run_id == sa.any_(chains))),
            )
            .returning(t.c.id)
        )

    def make_due_now(self) -> sa.Update:
        """Pending retry `:sr_run_id` due now, if it was due later (an operator's `retry --now`).

        Returns its new `next_retry_at`; nothing when it is not pending, or already due.
        """
        t, runs = self.t, self.runs
        return (
            self._update()
            .values(next_retry_at=NOW)
            .where(
                t.c.id == sa.bindparam("sr_run_id"),
                runs.in_state(t.c.status, "pending_retry"),
                sa.or_(t.c.next_retry_at.is_(None), t.c.next_retry_at > NOW),
            )
            .returning(t.c.id, t.c.next_retry_at)
        )

    def retry_candidates(
        self,
        *,
        error_like: bool = False,
        columns_like: tuple[str, ...] = (),
        since: bool = False,
        kind: str = "failed",
        cancelled: bool = False,
        root: bool = False,
    ) -> sa.Select:
        """The latest attempts of chains that ended failed (none completed, no retry pending),
        newest first, up to `:sr_limit`, filtered by the given parameters:
        `:sr_error_like` and `:sr_<column>_like` for each of `columns_like` (ILIKE patterns),
        `:sr_since` (ended at or after). `kind`: every failed chain, `permanent` (dead-lettered,
        not requeued) or `scraper` (failed by the scraper itself, never handled by stuck-runs).
        With `cancelled`, instead the failed attempts whose retry was cancelled and is the chain's
        last row: chains the filters match that a bulk retry must skip (and say so). With `root`,
        only the chain rooted at `:sr_root`: what a manual retry of one run retries, by the same rule.
        """
        t, runs, dead = self.t, self.runs, self.dead_letters
        chain = sa.func.coalesce(t.c.original_run_id, t.c.id)
        later = self.t.alias("later")
        done = self.t.alias("done")
        ended = sa.func.coalesce(t.c.completed_at, t.c.started_at)
        where = [
            runs.in_state(t.c.status, "failed"),
            ~sa.exists().where(
                later.c.is_retry,
                later.c.original_run_id == chain,
                later.c.retry_count > t.c.retry_count + (1 if cancelled else 0),
            ),
            ~sa.exists().where(
                runs.in_state(done.c.status, "completed"),
                sa.or_(done.c.id == chain, sa.and_(done.c.is_retry, done.c.original_run_id == chain)),
            ),
        ]
        if error_like:
            where.append(sa.cast(runs.error_text(t.c.error_message), sa.Text).ilike(sa.bindparam("sr_error_like")))
        for column in columns_like:
            where.append(sa.cast(t.c[column], sa.Text).ilike(sa.bindparam(f"sr_{column}_like")))
        if since:
            where.append(ended >= sa.bindparam("sr_since", type_=sa.DateTime(timezone=True)))
        if cancelled:
            next_one = self.t.alias("next_one")
            where.append(
                sa.exists().where(
                    next_one.c.is_retry,
                    next_one.c.original_run_id == chain,
                    next_one.c.retry_count == t.c.retry_count + 1,
                    runs.in_state(next_one.c.status, "cancelled"),
                )
            )
        if root:  # by the id and the chain index, as `chain` reads it
            of_root = sa.bindparam("sr_root")
            where.append(sa.or_(t.c.id == of_root, sa.and_(t.c.is_retry, t.c.original_run_id == of_root)))
        if kind == "permanent":
            where.append(sa.exists().where(dead.c.run_id == t.c.id, dead.c.requeued_at.is_(None)))
        elif kind == "scraper":
            where.append(t.c.failure_pattern.is_(None))
        return (
            sa.select(*runs.keyed()).where(*where).order_by(ended.desc().nulls_last()).limit(sa.bindparam("sr_limit"))
        )


def matching_count(candidates: sa.Select) -> sa.Select:
    """How many rows `candidates` would find without its limit: what a bulk action says it matched
    (one set-based count, however many match)."""
    return sa.select(sa.func.count()).select_from(candidates.limit(None).order_by(None).subquery("matching"))
