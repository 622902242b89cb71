"""The stuck sweep's statements: the stuck batch, the one-statement sweep batch, its dry-run
preview and counts, and the stuck decision of jobs.rules rendered in SQL.

The sweep fails a batch, creates its retries and dead letters in one statement; the preview
reads the very same decision expressions and writes nothing.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.expression import ColumnClause

from db import locks
from db.messages import (
    BUDGET_SPENT,
    MAX_DOUBLINGS,
    NOT_STARTED_ERROR,
    RETRY_SCHEDULED,
    STALLED_ERROR,
    STUCK_ERROR,
    STUCK_PATTERN,
)
from db.prepared import Prepare, placeholder
from db.queries.common import NOW, duration_text, render, statement
from db.queries.limits import LimitStatements

# The session's name of each prepared sweep batch (db.prepared), by the state it sweeps.
PREPARED_NAMES = {"running": "sr_sweep_batch", "queued": "sr_not_started_batch"}

# A sweep's batch commits without waiting for its WAL to reach the disk (jobs.stuck says why that
# loses nothing); the sweep then makes every one of them durable at once with FLUSH_COMMITS.
ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"
# A transaction that commits under the session's own synchronous_commit and writes a WAL record
# (a transactional logical-decoding message, with an xid): its commit waits for the WAL up to its
# commit record, which covers every commit record before it. A transaction that only takes an xid
# (`pg_current_xact_id()`) would not do: having written no WAL before its commit record,
# PostgreSQL commits it asynchronously whatever the setting (xact.c, RecordTransactionCommit).
# Logical decoding's output plugins pass such a message on only when asked for messages.
FLUSH_COMMITS = sa.text("SELECT pg_logical_emit_message(true, 'stuck-runs', 'sweep committed')")

# What the sweep says of a run it fails, by the state it found the run in.
_ERRORS = {"running": STUCK_ERROR, "queued": NOT_STARTED_ERROR}


class SweepStatements(LimitStatements):
    """`stuck_batch`, `sweep_batch`, `stuck_preview` and `stuck_preview_counts` for one table, and
    the same for retries handed to the fleet's queue that nobody started (`not_started_*`)."""

    stuck_batch = statement(lambda self: self._stuck_batch(lock=True))
    sweep_batch = statement(lambda self: self._sweep_batch())
    sweep_batch_prepared = statement(lambda self: self._prepared_batch("running"))
    stuck_preview = statement(lambda self: self._stuck_preview())
    stuck_preview_counts = statement(lambda self: self._preview_counts(self.stuck_preview))
    not_started_batch = statement(lambda self: self._sweep_batch(state="queued"))
    not_started_batch_prepared = statement(lambda self: self._prepared_batch("queued"))
    not_started_preview = statement(lambda self: self._stuck_preview(state="queued"))
    not_started_preview_counts = statement(lambda self: self._preview_counts(self.not_started_preview))

    @staticmethod
    def _preview_counts(preview_query: sa.Select) -> sa.Select:
        preview = preview_query.subquery("preview")
        return sa.select(sa.func.count().label("stuck"), sa.func.count().filter(preview.c.retried).label("retried"))

    def listing_sql(self, now: datetime) -> str:
        """The SQL that lists every run one sweep failed (they share its `completed_at`), in the table's names."""
        t, runs = self.t, self.runs
        query = sa.select(t.c.id, runs.what().label("run"), runs.error_text(t.c.error_message).label("error")).where(
            t.c.failure_pattern == STUCK_PATTERN, t.c.completed_at == sa.literal(now.isoformat(), sa.Text)
        )
        sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        return sql.replace("\n", " ")  # one line: it is printed in a log line and a summary

    def _executing(self) -> sa.ColumnElement:
        """True for runs a live stuck-runs process is executing (it holds the run's lock)."""
        key = locks.as_oid(locks.run_key(self.t.c.id))
        return key.in_(locks.held_keys(self.runs_ns))

    def _not_being_delivered(self) -> sa.ColumnElement:
        """False for a retry being delivered to the fleet (SPEC §12's mark): its lease stands, or
        ran out so recently that a live process is to deliver it again. One whose lease ran out
        `STUCK_AFTER` ago (no process delivers any more) is stuck like any run."""
        until = self.t.c.delivering_until
        return sa.or_(until.is_(None), until < sa.bindparam("sr_cutoff"))

    def _stuck_batch(self, *, lock: bool, resume: sa.ColumnElement | None = None, state: str = "running") -> sa.Select:
        """Stuck runs, oldest progress first, up to `:sr_limit`; with `resume` (`:sr_from`), from there on
        (where the sweep's previous batch ended), so a batch does not walk again over the index
        entries of the runs earlier batches failed (dead until vacuum: walked again, a sweep of
        K runs in batches of B costs K²/B). With `state` queued: retries handed to the fleet's
        queue (`started_at` is when) that no worker started."""
        t, runs = self.t, self.runs
        progress = runs.last_sign_of_life()
        watched = [runs.in_state(t.c.status, state)]
        if state == "queued":
            # Handed off either way: a webhook's receiver may queue it in the same value.
            watched += [t.c.handed_off.is_not(None), progress < sa.bindparam("sr_cutoff")]
        else:
            watched.append(self.judged())  # SPEC §14: each run by its own limit, or stalled
        query = (
            sa.select(
                t.c.id,
                progress.label("since"),
                t.c.retry_count,
                t.c.max_retries,
                t.c.is_retry,
                t.c.original_run_id,
            )
            .where(*watched, ~self._executing(), self._not_being_delivered())
            .order_by(progress)
            .limit(sa.bindparam("sr_limit"))
        )
        if resume is not None:
            query = query.where(progress >= resume)
        return query.with_for_update(skip_locked=True, of=t) if lock else query

    def _stuck_decision(
        self, template: str = STUCK_ERROR, position: sa.ColumnElement | None = None
    ) -> tuple[sa.ColumnElement, sa.ColumnElement, sa.ColumnElement]:
        """What jobs.rules decides for a failed attempt, per stuck row, in SQL: (budget, message, due).

        `chain_budget` for the budget, `stuck_error` for the message's duration and `decide_failure`
        (with `retry_delay`) for the retry or the spent budget: the same templates and the same
        arithmetic; tests/integration/test_stuck_rules_sql.py holds the two to the same answers.
        """
        t = self.t
        if template == STUCK_ERROR:
            # SPEC §14: hours by the clock that fired; a stalled run says so in its own words.
            error = self.fired_error(template, STALLED_ERROR, position)
        else:
            seconds = sa.cast(sa.extract("epoch", NOW - self.runs.last_sign_of_life()), sa.Numeric)
            error = render(template, hours=duration_text(seconds))
        # chain_budget: a retry's, or a root's stuck-runs already handled (it wrote the pattern), is kept.
        handled = sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None))
        budget = sa.case((handled, t.c.max_retries), else_=sa.bindparam("sr_policy_max", type_=sa.Integer))
        retried = t.c.retry_count < budget
        delay = sa.bindparam("sr_delay_s", type_=sa.Float)
        cap = sa.func.greatest(sa.bindparam("sr_cap_s", type_=sa.Float), delay)
        exponential = sa.bindparam("sr_exponential", type_=sa.Boolean)
        doubled = sa.func.least(delay * sa.func.power(2, sa.func.least(t.c.retry_count, MAX_DOUBLINGS)), cap)
        base = sa.case((exponential, doubled), else_=delay)
        jittered = base * (1 + sa.bindparam("sr_jitter", type_=sa.Float) * sa.func.random())
        seconds = sa.case((exponential, sa.func.least(jittered, sa.func.greatest(cap, base))), else_=jittered)
        due = sa.case((retried, NOW + sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)), else_=sa.null())
        message = sa.case(
            (retried, render(RETRY_SCHEDULED, error=error, number=t.c.retry_count + 1, budget=budget)),
            else_=render(BUDGET_SPENT, error=error, attempts=t.c.retry_count),
        )
        return budget, message, due

    def _limit_columns(
        self, state: str, prefix: str = "", position: sa.ColumnElement | None = None
    ) -> list[sa.ColumnElement]:
        """The limit that judged a running run (seconds, source) and why (the dead letter's detail,
        the log line's reason); NULL for a retry nobody started (§12's `STUCK_AFTER`)."""
        if state != "running":
            values = [sa.cast(sa.null(), sa.Float), sa.cast(sa.null(), sa.Text), sa.cast(sa.null(), sa.Text)]
        else:
            values = [
                self.limit_seconds(position=position),
                self.limit_source(position=position),
                self.judged_reason(position),
            ]
        names = [f"{prefix}limit_s", f"{prefix}limit_source", "_sr_detail" if prefix else "limit_reason"]
        return [value.label(name) for value, name in zip(values, names, strict=True)]

    def _stuck_preview(self, state: str = "running") -> sa.Select:
        """What the sweep would do, changing nothing: the stuck runs (up to `:sr_limit`) with the
        very decision expressions the sweep writes, in the sweep's names (`retry_id` NULL,
        `retried` when a retry would be scheduled)."""
        t = self.t
        budget, message, due = self._stuck_decision(_ERRORS[state])
        stuck = self._stuck_batch(lock=False, state=state).subquery("stuck")
        return (
            sa.select(
                sa.cast(t.c.id, sa.Text).label("run_id"),
                sa.cast(sa.func.coalesce(t.c.original_run_id, t.c.id), sa.Text).label("chain_id"),
                self.runs.what().label("what"),
                t.c.retry_count,
                budget.label("budget"),
                message.label("message"),
                due.label("next_retry_at"),
                sa.cast(sa.null(), sa.Text).label("retry_id"),
                due.is_not(None).label("retried"),
                sa.false().label("dead_lettered"),
                *self._limit_columns(state),
            )
            .join(stuck, stuck.c.id == t.c.id)
            .order_by(stuck.c.since)
        )

    def _prepared_batch(self, state: str) -> Prepare:
        """`_sweep_batch` prepared, and executed for a sweep's first batch (db.prepared): `$1` is
        `:sr_from`, `$2` `:sr_keep` (`p1`, `p2` of each EXECUTE); every other parameter is bound
        at PREPARE (the sweep's, the same for all its batches)."""
        since = self.runs.last_sign_of_life().type  # the table's own: naive or not, as `:sr_from` was
        resume_from = placeholder(1, since)
        batch = self._sweep_batch(state, resume_from=resume_from, keep=placeholder(2, sa.Integer))
        types = [since.compile(postgresql.dialect()), "integer"]
        return Prepare(PREPARED_NAMES[state], types, batch, before=ASYNC_COMMIT)

    def _sweep_batch(
        self,
        state: str = "running",
        *,
        resume_from: sa.ColumnElement | None = None,
        keep: sa.ColumnElement | None = None,
    ) -> sa.Select:
        """One batch of the stuck sweep in one statement: lock up to `:sr_limit` stuck runs
        (SKIP LOCKED), fail them with the rules' decision, create their retries and dead letters.

        Returns, for the first `:sr_keep` failed runs (at least one), by name, ids as text: run_id,
        chain_id, what (the run's label), retry_count, budget, message, next_retry_at,
        retry_id (NULL when no retry was created: budget spent, or one already existed), retried,
        dead_lettered; and on each row the whole batch's batch_failed, batch_retried,
        batch_dead_lettered and batch_until (the latest progress it took: the next batch's `:sr_from`).
        """
        t, runs = self.t, self.runs
        if resume_from is None:
            resume_from = sa.bindparam("sr_from", type_=sa.DateTime(timezone=True))
        stuck_runs = self._stuck_batch(lock=True, resume=resume_from, state=state)
        # Each locked run's kind's place in the limits' arrays, looked up once here: the message,
        # the limit, its source and reason below index the arrays by it (looked up at each use,
        # it was about ten `array_position` calls per failed run).
        stuck = (
            stuck_runs.with_only_columns(
                sa.literal_column("ctid").label("scrape_runs_ctid"),
                stuck_runs.selected_columns.since,
                self.kind_position().label("kind_position"),
            )
            .cte("stuck")
            .prefix_with("MATERIALIZED")
        )
        position = stuck.c.kind_position if state == "running" and runs.kind is not None else None
        ctid = ColumnClause("ctid", _selectable=t)
        budget, message, due = self._stuck_decision(_ERRORS[state], position)
        failed = (
            self._update()
            .values(
                status=runs.status("failed"),
                error_message=runs.error_value(message),
                completed_at=NOW,
                max_retries=budget,
                next_retry_at=due,
                failure_pattern=STUCK_PATTERN,
            )
            # The locked rows by their physical address (stable: the same statement holds their
            # locks): a TID scan of the batch's runs. Joined to the CTE by it alone (for the kind's
            # position), the planner hashed every running run per batch instead on a mass event's
            # table; with both, it reads the batch's runs by TID and then joins them
            # (tests/integration/test_mass_event_plans.py holds the plan).
            .where(ctid == sa.any_(sa.func.array(sa.select(stuck.c.scrape_runs_ctid).scalar_subquery())))
            .where(ctid == stuck.c.scrape_runs_ctid)
            .where(runs.in_state(t.c.status, state))
            # Each retry's id is drawn here, so no join is needed to report it: a join of the
            # two CTEs turned into a nested loop (a million comparisons a batch) on a big table.
            .returning(
                *t.c,
                *self._limit_columns(state, "_sr_", position),
                runs.new_id().label("_sr_retry_id"),
                stuck.c.since.label("_sr_since"),
                stuck.c.scrape_runs_ctid.label("_sr_ctid"),
            )
            .cte("failed")
        )
        retried = self._retry_rows(failed, failed.c._sr_retry_id).cte("retried")
        dead = self._dead_letters(failed).cte("dead")
        # The batch's counts ride on every row, and only the first `:sr_keep` rows (at least one,
        # to carry the counts) leave the server: a mass event does not ship 100,000 rows to Python.
        # What a kept row says (ids as text, its label, its message) is computed for those rows
        # only, after the counts: for the whole batch it was work done a thousand times to keep 20.
        # Each count is its own CTE's rows: a retry or a dead letter is returned only when it was
        # inserted (ON CONFLICT DO NOTHING returns none), at most one of each per failed run.
        counts = sa.select(
            sa.select(sa.func.count()).select_from(failed).scalar_subquery().label("batch_failed"),
            sa.select(sa.func.count()).select_from(retried).scalar_subquery().label("batch_retried"),
            sa.select(sa.func.count()).select_from(dead).scalar_subquery().label("batch_dead_lettered"),
            sa.select(sa.func.max(stuck.c.since)).scalar_subquery().label("batch_until"),
        ).subquery("counts")
        # The kept rows are the batch's oldest by sign of life, ties in the table's own order,
        # in that order: the log's first lines and the alerts' lists show them so. Picked by a
        # sort that keeps only them (window functions over the batch sorted and stored all its
        # rows, wide ones, to keep one after the first batches); whether each got its retry or
        # its dead letter is looked up for them alone (for every run of the batch, it was two
        # hashed lookups a row before the sort, to keep none once a sweep kept its rows).
        order = (failed.c._sr_since, failed.c._sr_ctid)
        keep = sa.func.greatest(keep if keep is not None else sa.bindparam("sr_keep", type_=sa.Integer), 1)
        first = sa.select(*failed.c).order_by(*order).limit(keep).subquery("kept")
        kept = first.c
        created = kept._sr_retry_id.in_(sa.select(retried.c.id))
        dead_lettered = kept.id.in_(sa.select(dead.c.run_id))
        return (
            sa.select(
                sa.cast(kept.id, sa.Text).label("run_id"),
                sa.cast(sa.func.coalesce(kept.original_run_id, kept.id), sa.Text).label("chain_id"),
                runs.what(first).label("what"),
                kept.retry_count,
                kept.max_retries.label("budget"),
                runs.error_text(kept.error_message).label("message"),
                kept.next_retry_at,
                sa.case((created, sa.cast(kept._sr_retry_id, sa.Text)), else_=sa.null()).label("retry_id"),
                created.label("retried"),
                dead_lettered.label("dead_lettered"),
                kept._sr_limit_s.label("limit_s"),
                kept._sr_limit_source.label("limit_source"),
                kept._sr_detail.label("limit_reason"),
                counts.c.batch_failed,
                counts.c.batch_retried,
                counts.c.batch_dead_lettered,
                counts.c.batch_until,
            )
            .select_from(first.join(counts, sa.true()))
            .order_by(kept._sr_since, kept._sr_ctid)
        )
