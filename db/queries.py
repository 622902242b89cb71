"""Every statement stuck-runs runs on `scrape_runs`, in one place.

Built once per reflected table (`RunQueries(runs)`), reused for every batch. Each state change is
an UPDATE conditional on the state it expects; callers read RETURNING to learn what really
changed. Per-row values computed by the rules travel as arrays through `unnest`, so a batch is
a constant number of statements whatever its size.
"""

from __future__ import annotations

import string

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, insert

from db import locks
from db.arrays import array_param
from db.dead_letters import dead_letters_table, insert_from_failed
from db.table import RunsTable
from jobs.rules import (
    BUDGET_SPENT,
    MAX_DOUBLINGS,
    RETRY_SCHEDULED,
    STUCK_ERROR,
    STUCK_PATTERN,
    FailureOutcome,
    RetryPolicy,
)

NOW = sa.bindparam("sr_now", type_=sa.DateTime(timezone=True))


def _arrays(**columns: sa.types.TypeEngine) -> sa.TableValuedAlias:
    """`unnest(:sr_ids, :sr_messages, ...) AS v(id, message, ...)`: one row per element, in order.

    Each column `x` is bound from the array parameter `sr_xs`. Every parameter name starts with
    `sr_`: SQLAlchemy takes a parameter named like a column for a SET value, and the scraper's
    table has columns we do not know.
    """
    arrays = [array_param(f"sr_{name}s", kind) for name, kind in columns.items()]
    return (
        sa.func.unnest(*arrays)
        .table_valued(*(sa.column(name, kind) for name, kind in columns.items()))
        .render_derived(name="v")
    )


def fail_params(items: list[tuple[object, FailureOutcome, str | None]]) -> dict[str, list]:
    """Bind values for `fail_running` / `fail_reported`: (run id, outcome, detail) per attempt."""
    return {
        "sr_ids": [run_id for run_id, _, _ in items],
        "sr_messages": [outcome.message for _, outcome, _ in items],
        "sr_budgets": [outcome.budget for _, outcome, _ in items],
        "sr_dues": [outcome.retry_due for _, outcome, _ in items],
        "sr_patterns": [outcome.pattern for _, outcome, _ in items],
        "sr_details": [detail for _, _, detail in items],
    }


def sweep_params(policy: RetryPolicy) -> dict[str, object]:
    """The policy as the sweep statement's parameters (`sr_now` and `sr_cutoff` come with them)."""
    return {
        "sr_policy_max": policy.max_retries,
        "sr_delay_s": policy.retry_delay.total_seconds(),
        "sr_cap_s": policy.max_delay.total_seconds(),
        "sr_jitter": policy.jitter,
        "sr_exponential": policy.backoff == "exponential",
    }


def render(template: str, **parts: sa.ColumnElement) -> sa.ColumnElement:
    """A message template of jobs.rules as SQL: its literal text around the given expressions."""
    pieces: list[sa.ColumnElement] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            pieces.append(sa.literal(literal, sa.Text))
        if field is not None:
            pieces.append(sa.cast(parts[field], sa.Text))
    return sa.func.concat(*pieces)


class RunQueries:
    """The statements for one table. Parameters are bound by name, all prefixed `sr_`: `sr_now`, `sr_run_id`..."""

    def __init__(self, runs: RunsTable) -> None:
        self.runs = runs
        self.t = t = runs.table
        self.dead_letters = dead_letters_table(t.schema)
        self.runs_ns = locks.namespace(runs.qualified_name, locks.RUNS)

        self.stuck_batch = self._stuck_batch(lock=True)
        self.sweep_batch = self._sweep_batch()
        self.stuck_preview = self._stuck_preview()
        preview = self.stuck_preview.subquery("preview")
        self.stuck_preview_counts = sa.select(
            sa.func.count().label("stuck"), sa.func.count().filter(preview.c.retried).label("retried")
        )
        self.fail_running = self._fail("running", reported=False)
        self.fail_reported = self._fail("failed", reported=True)
        self.superseded_batch = self._superseded(lock=True)
        self.superseded_preview = self._superseded(lock=False)
        self.cancel_superseded = self._transition("pending_retry", "cancelled")
        self.claim_due = self._claim(one=False)
        self.claim_one = self._claim(one=True)
        self.due_preview = self._due(lock=False).add_columns(t.c.next_retry_at)
        self.complete = (
            sa.update(t)
            .values(status=runs.status("completed"), completed_at=NOW)
            .where(t.c.id == sa.bindparam("sr_run_id"), t.c.status == runs.status("running"))
            .returning(t.c.id)
        )
        self.release = (
            sa.update(t)
            .values(
                status=runs.status("pending_retry"),
                next_retry_at=NOW,
                started_at=runs.fresh_attempt_values(NOW).get("started_at", t.c.started_at),
            )
            .where(t.c.id.in_(sa.bindparam("sr_ids", expanding=True)), t.c.status == runs.status("running"))
            .returning(t.c.id)
        )
        self.schedule = self._schedule()
        self.get = sa.select(t).where(t.c.id == sa.bindparam("sr_run_id"))

    # -- reading ----------------------------------------------------------------------------

    def chain(self) -> sa.Select:
        """Every attempt of the chain rooted at `:sr_root`, oldest first."""
        t = self.t
        return (
            sa.select(t)
            .where(
                sa.or_(
                    t.c.id == sa.bindparam("sr_root"),
                    sa.and_(t.c.is_retry, t.c.original_run_id == sa.bindparam("sr_root")),
                )
            )
            .order_by(t.c.retry_count, t.c.started_at.asc().nulls_last())
        )

    def untimed(self) -> sa.ColumnElement:
        """Running runs with nothing to time them by (no started_at, no heartbeat): never stuck."""
        return sa.and_(self.t.c.status == self.runs.status("running"), self.runs.progress().is_(None))

    def _count(self, *where: sa.ColumnElement) -> sa.ScalarSelect:
        return sa.select(sa.func.count()).select_from(self.t).where(*where).scalar_subquery()

    def counts(self) -> sa.Select:
        """How many runs are running, stuck (progress before `:sr_cutoff`), untimed, pending a
        retry, and the retries running; each an index probe, never a table scan. (How many chains
        ended permanently failed: `permanently_failed`.)"""
        t, runs = self.t, self.runs
        running = t.c.status == runs.status("running")
        pending = t.c.status == runs.status("pending_retry")
        count = self._count
        return sa.select(
            count(running).label("running"),
            count(running, runs.progress() < sa.bindparam("sr_cutoff")).label("stuck"),
            count(self.untimed()).label("untimed"),
            count(pending).label("pending_retry"),
            count(running, t.c.is_retry).label("running_retries"),
            sa.select(sa.func.min(t.c.next_retry_at)).where(pending).scalar_subquery().label("next_due"),
        )

    def _executing(self) -> sa.ColumnElement:
        """True for runs a live stuck-runs process is executing (it holds the run's lock)."""
        key = locks.as_oid(locks.run_key(self.t.c.id))
        return key.in_(locks.held_keys(self.runs_ns))

    def _stuck_batch(self, *, lock: bool, resume: bool = False) -> sa.Select:
        """Stuck runs, oldest progress first, up to `:sr_limit`; with `resume`, from `:sr_from` on
        (where the sweep's previous batch ended), so a batch does not walk again over the index
        entries of the runs earlier batches failed (dead until vacuum: walked again, a sweep of
        K runs in batches of B costs K²/B)."""
        t, runs = self.t, self.runs
        progress = runs.progress()
        query = (
            sa.select(
                t.c.id,
                progress.label("since"),
                t.c.retry_count,
                t.c.max_retries,
                t.c.is_retry,
                t.c.original_run_id,
                t.c.search_query,
                t.c.location_query,
            )
            .where(t.c.status == runs.status("running"), progress < sa.bindparam("sr_cutoff"), ~self._executing())
            .order_by(progress)
            .limit(sa.bindparam("sr_limit"))
        )
        if resume:
            query = query.where(progress >= sa.bindparam("sr_from", type_=sa.DateTime(timezone=True)))
        return query.with_for_update(skip_locked=True, of=t) if lock else query

    def _chain_completed(self, pending: sa.FromClause) -> sa.Select:
        """The completed runs of `pending`'s chain, earliest completion first."""
        done = self.t.alias("done")
        return (
            sa.select(done.c.id)
            .where(
                done.c.status == self.runs.status("completed"),
                sa.or_(
                    done.c.id == pending.c.original_run_id,
                    sa.and_(done.c.is_retry, done.c.original_run_id == pending.c.original_run_id),
                ),
            )
            .order_by(done.c.completed_at)
        )

    def _superseded(self, *, lock: bool) -> sa.Select:
        """Pending retries whose chain already has a completed run, with that run's id."""
        t = self.t
        completed = self._chain_completed(t)
        query = sa.select(
            t.c.id,
            t.c.original_run_id,
            t.c.retry_count,
            t.c.max_retries,
            t.c.search_query,
            t.c.location_query,
            completed.limit(1).scalar_subquery().label("completed_id"),
        ).where(t.c.status == self.runs.status("pending_retry"), completed.exists())
        return query.with_for_update(skip_locked=True, of=t) if lock else query

    def clear_completed_due(self) -> sa.Update:
        """Clears `next_retry_at` on the completed runs of the chains in `:sr_chains`.

        A run failed as stuck and completed late by the scraper keeps the retry due its failure
        set; once that retry is superseded the chain has none due. Only `completed` rows change.
        """
        t = self.t
        chains = array_param("sr_chains", sa.Uuid())
        return (
            sa.update(t)
            .values(next_retry_at=None)
            .where(
                t.c.status == self.runs.status("completed"),
                t.c.next_retry_at.is_not(None),
                sa.or_(t.c.id == sa.any_(chains), sa.and_(t.c.is_retry, t.c.original_run_id == sa.any_(chains))),
            )
            .returning(t.c.id)
        )

    def _due(self, *, lock: bool) -> sa.Select:
        t = self.t
        query = (
            sa.select(t.c.id, t.c.retry_count, t.c.max_retries, t.c.search_query, t.c.location_query)
            .where(
                t.c.status == self.runs.status("pending_retry"),
                t.c.next_retry_at <= NOW,
                ~self._chain_completed(t).exists(),
            )
            .order_by(t.c.next_retry_at)
            .limit(sa.bindparam("sr_limit"))
        )
        return query.with_for_update(skip_locked=True, of=t) if lock else query

    # -- writing ----------------------------------------------------------------------------

    def _stuck_decision(self) -> tuple[sa.ColumnElement, sa.ColumnElement, sa.ColumnElement]:
        """`decide_stuck` of jobs.rules, per row, in SQL: (budget, message, due).

        The same templates and the same arithmetic; tests/integration/test_stuck_rules_sql.py
        holds the two to the same answers.
        """
        t = self.t
        hours_seconds = sa.cast(sa.extract("epoch", NOW - self.runs.progress()), sa.Numeric)
        hours = sa.func.to_char(sa.func.round(hours_seconds / 3600, 1), "FM999999990.0").concat("h")
        error = render(STUCK_ERROR, hours=hours)
        budget = sa.case((t.c.is_retry, t.c.max_retries), else_=sa.bindparam("sr_policy_max", type_=sa.Integer))
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

    def _stuck_preview(self) -> sa.Select:
        """What the sweep would do, changing nothing: the stuck runs (up to `:sr_limit`) with the
        very decision expressions the sweep writes, in the sweep's names (`retry_id` NULL,
        `retried` when a retry would be scheduled)."""
        t = self.t
        budget, message, due = self._stuck_decision()
        stuck = self._stuck_batch(lock=False).subquery("stuck")
        return (
            sa.select(
                sa.cast(t.c.id, sa.Text).label("run_id"),
                sa.cast(sa.func.coalesce(t.c.original_run_id, t.c.id), sa.Text).label("chain_id"),
                t.c.search_query,
                t.c.location_query,
                t.c.retry_count,
                budget.label("budget"),
                message.label("message"),
                due.label("next_retry_at"),
                sa.cast(sa.null(), sa.Text).label("retry_id"),
                due.is_not(None).label("retried"),
                sa.false().label("dead_lettered"),
            )
            .join(stuck, stuck.c.id == t.c.id)
            .order_by(stuck.c.since)
        )

    def _sweep_batch(self) -> sa.Select:
        """One batch of the stuck sweep in one statement: lock up to `:sr_limit` stuck runs
        (SKIP LOCKED), fail them with the rules' decision, create their retries and dead letters.

        Returns, for the first `:sr_keep` failed runs (at least one), by name, ids as text: run_id,
        chain_id, search_query, location_query, retry_count, budget, message, next_retry_at,
        retry_id (NULL when no retry was created: budget spent, or one already existed), retried,
        dead_lettered; and on each row the whole batch's batch_failed, batch_retried,
        batch_dead_lettered and batch_until (the latest progress it took: the next batch's `:sr_from`).
        """
        t, runs = self.t, self.runs
        stuck_runs = self._stuck_batch(lock=True, resume=True)
        stuck = (
            stuck_runs.with_only_columns(
                sa.literal_column("ctid").label("scrape_runs_ctid"), stuck_runs.selected_columns.since
            )
            .cte("stuck")
            .prefix_with("MATERIALIZED")
        )
        budget, message, due = self._stuck_decision()
        failed = (
            sa.update(t)
            .values(
                status=runs.status("failed"),
                error_message=message,
                completed_at=NOW,
                max_retries=budget,
                next_retry_at=due,
                failure_pattern=STUCK_PATTERN,
            )
            # The locked rows by their physical address (stable: the same statement holds their
            # locks). Joined to the CTE instead, the planner rescanned every running row per batch.
            .where(
                sa.literal_column("ctid")
                == sa.any_(sa.func.array(sa.select(stuck.c.scrape_runs_ctid).scalar_subquery()))
            )
            .where(t.c.status == runs.status("running"))
            # Each retry's id is drawn here, so no join is needed to report it: a join of the
            # two CTEs turned into a nested loop (a million comparisons a batch) on a big table.
            .returning(
                *t.c, sa.cast(sa.null(), sa.Text).label("_sr_detail"), sa.func.gen_random_uuid().label("_sr_retry_id")
            )
            .cte("failed")
        )
        retried = self._retry_rows(failed, failed.c._sr_retry_id).cte("retried")
        dead = insert_from_failed(self.dead_letters, failed, self._inputs_json(failed), NOW).cte("dead")
        created = failed.c._sr_retry_id.in_(sa.select(retried.c.id))
        per_run = sa.select(
            sa.cast(failed.c.id, sa.Text).label("run_id"),
            sa.cast(sa.func.coalesce(failed.c.original_run_id, failed.c.id), sa.Text).label("chain_id"),
            failed.c.search_query,
            failed.c.location_query,
            failed.c.retry_count,
            failed.c.max_retries.label("budget"),
            failed.c.error_message.label("message"),
            failed.c.next_retry_at,
            sa.case((created, sa.cast(failed.c._sr_retry_id, sa.Text)), else_=sa.null()).label("retry_id"),
            created.label("retried"),
            failed.c.id.in_(sa.select(dead.c.run_id)).label("dead_lettered"),
        ).subquery("per_run")
        # The batch's counts ride on every row, and only the first `:sr_keep` rows (at least one,
        # to carry the counts) leave the server: a mass event does not ship 100,000 rows to Python.
        counted = sa.select(
            *per_run.c,
            sa.func.count().over().label("batch_failed"),
            sa.func.count().filter(per_run.c.retried).over().label("batch_retried"),
            sa.func.count().filter(per_run.c.dead_lettered).over().label("batch_dead_lettered"),
            sa.select(sa.func.max(stuck.c.since)).scalar_subquery().label("batch_until"),
            sa.func.row_number().over().label("_sr_n"),
        ).subquery("counted")
        keep = sa.func.greatest(sa.bindparam("sr_keep", type_=sa.Integer), 1)
        return sa.select(*(c for c in counted.c if c.name != "_sr_n")).where(counted.c._sr_n <= keep)

    def _retry_rows(self, failed: sa.CTE, retry_id: sa.ColumnElement | None = None) -> sa.Insert:
        """One pending retry for every row of `failed` that has a retry due, copying its inputs.

        The unique index on (original_run_id, retry_count) WHERE is_retry makes a second
        retry of the same attempt impossible; ON CONFLICT turns it into nothing.
        """
        t, runs = self.t, self.runs
        values: dict[str, sa.ColumnElement] = {name: failed.c[name] for name in runs.input_columns}
        values.update(
            status=runs.status("pending_retry"),
            retry_count=failed.c.retry_count + 1,
            max_retries=failed.c.max_retries,
            next_retry_at=failed.c.next_retry_at,
            original_run_id=sa.func.coalesce(failed.c.original_run_id, failed.c.id),
            is_retry=sa.true(),
        )
        values.update(runs.fresh_attempt_values(NOW))
        if retry_id is not None:
            values["id"] = retry_id
        rows = sa.select(*(value.label(name) for name, value in values.items())).where(
            failed.c.next_retry_at.is_not(None)
        )
        return (
            insert(t)
            .from_select(list(values), rows)
            .on_conflict_do_nothing()
            .returning(t.c.id, t.c.original_run_id, t.c.retry_count)
        )

    def _inputs_json(self, failed: sa.CTE) -> sa.ColumnElement:
        lifecycle = [name for name in failed.c.keys() if name not in self.runs.input_columns]
        return sa.func.to_jsonb(failed.table_valued()).op("-")(
            sa.cast(sa.literal(lifecycle, ARRAY(sa.Text)), ARRAY(sa.Text))
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
            id=sa.Uuid(),
            message=sa.Text(),
            budget=sa.Integer(),
            due=sa.DateTime(timezone=True),
            pattern=sa.Text(),
            detail=sa.Text(),
        )
        where = [t.c.id == v.c.id, t.c.status == runs.status(from_status)]
        completed_at: sa.ColumnElement = NOW
        if reported:
            where.append(t.c.next_retry_at.is_(None))
            completed_at = sa.func.coalesce(t.c.completed_at, NOW)
        failed = (
            sa.update(t)
            .values(
                status=runs.status("failed"),
                error_message=v.c.message,
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
        dead = insert_from_failed(self.dead_letters, failed, self._inputs_json(failed), NOW).cte("dead")
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

    def _transition(self, from_status: str, to_status: str) -> sa.Update:
        """Moves the runs in `:ids` from one status to another, each with its own message."""
        t, runs = self.t, self.runs
        v = _arrays(id=sa.Uuid(), message=sa.Text())
        return (
            sa.update(t)
            .values(status=runs.status(to_status), error_message=v.c.message, completed_at=NOW, next_retry_at=None)
            .where(t.c.id == v.c.id, t.c.status == runs.status(from_status))
            .returning(t.c.id)
        )

    def _claim(self, *, one: bool) -> sa.Update:
        """Claims up to `:sr_limit` due retries (with `one`: pending retry `:sr_run_id`, due or
        not) for execution, and takes their run locks.

        The run lock (session-level, in the claiming connection) tells the stuck checker the
        run is being executed by a live process; it goes away with that process.
        """
        t, runs = self.t, self.runs
        values: dict[str, object] = {
            "status": runs.status("running"),
            "started_at": NOW,
            "completed_at": None,
            "error_message": None,
            # next_retry_at is when a failed attempt's retry is due; a running attempt has none.
            "next_retry_at": None,
            "failure_pattern": None,
        }
        if runs.heartbeat:
            values[runs.heartbeat] = NOW
        if one:
            chosen = sa.select(t.c.id).where(
                t.c.id == sa.bindparam("sr_run_id"), t.c.status == runs.status("pending_retry")
            )
            due = chosen.with_for_update(skip_locked=True).cte("due")
        else:
            # MATERIALIZED: the LIMIT ... SKIP LOCKED must run once. As an IN (subquery)
            # PostgreSQL may rescan it per outer row and claim more rows than the limit.
            due = self._due(lock=True).with_only_columns(t.c.id).cte("due").prefix_with("MATERIALIZED")
        return (
            sa.update(t)
            .values(**values)
            .where(t.c.id == due.c.id, t.c.status == runs.status("pending_retry"))
            .returning(*t.c, sa.func.pg_try_advisory_lock(self.runs_ns, locks.run_key(t.c.id)).label("_sr_locked"))
        )

    def _schedule(self) -> sa.Select:
        """Schedules retries of the failed attempts in `:sr_ids`, each due `:sr_dues` with chain
        budget `:sr_budgets`. Attempts no longer `failed` are left alone; returns one row per
        retry created: (failed_id, retry_id, retry_count)."""
        t, runs = self.t, self.runs
        v = _arrays(id=sa.Uuid(), due=sa.DateTime(timezone=True), budget=sa.Integer())
        attempt = (
            sa.update(t)
            .values(next_retry_at=v.c.due, max_retries=v.c.budget)
            .where(t.c.id == v.c.id, t.c.status == runs.status("failed"))
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

    def retry_candidates(
        self,
        *,
        error_like: bool = False,
        search_query: bool = False,
        location_query: bool = False,
        since: bool = False,
        kind: str = "failed",
    ) -> sa.Select:
        """The latest attempts of chains that ended failed (none completed, no retry pending),
        newest first, up to `:sr_limit`, filtered by the given parameters:
        `:sr_error_like`, `:sr_search_query`, `:sr_location_query` (ILIKE patterns),
        `:sr_since` (ended at or after). `kind`: every failed chain, `permanent` (dead-lettered,
        not requeued) or `scraper` (failed by the scraper itself, never handled by stuck-runs).
        """
        t, runs, dead = self.t, self.runs, self.dead_letters
        chain = sa.func.coalesce(t.c.original_run_id, t.c.id)
        later = self.t.alias("later")
        done = self.t.alias("done")
        ended = sa.func.coalesce(t.c.completed_at, t.c.started_at)
        where = [
            t.c.status == runs.status("failed"),
            ~sa.exists().where(
                later.c.is_retry, later.c.original_run_id == chain, later.c.retry_count > t.c.retry_count
            ),
            ~sa.exists().where(
                done.c.status == runs.status("completed"),
                sa.or_(done.c.id == chain, sa.and_(done.c.is_retry, done.c.original_run_id == chain)),
            ),
        ]
        if error_like:
            where.append(t.c.error_message.ilike(sa.bindparam("sr_error_like")))
        if search_query:
            where.append(sa.cast(t.c.search_query, sa.Text).ilike(sa.bindparam("sr_search_query")))
        if location_query:
            where.append(sa.cast(t.c.location_query, sa.Text).ilike(sa.bindparam("sr_location_query")))
        if since:
            where.append(ended >= sa.bindparam("sr_since", type_=sa.DateTime(timezone=True)))
        if kind == "permanent":
            where.append(sa.exists().where(dead.c.run_id == t.c.id, dead.c.requeued_at.is_(None)))
        elif kind == "scraper":
            where.append(t.c.failure_pattern.is_(None))
        return sa.select(t).where(*where).order_by(ended.desc().nulls_last()).limit(sa.bindparam("sr_limit"))

    # -- statistics (attempts that ended since `:sr_since`; the ended-attempts index) --------
    #
    # One population for every retry number `stats` prints: retries that ended (completed or
    # failed) in the window. Retries pending or running now, and retries cancelled before they
    # ran, are counted beside it, never in it.

    def _ended(self) -> sa.Subquery:
        t = self.t
        return (
            sa.select(t.c.id, t.c.original_run_id, t.c.is_retry, t.c.retry_count, t.c.status, t.c.failure_pattern)
            .where(sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None)), t.c.completed_at >= sa.bindparam("sr_since"))
            .subquery("ended")
        )

    def _retry_ended(self, e: sa.Subquery) -> sa.ColumnElement:
        """A retry that ran and ended: completed or failed (a cancelled one never ran)."""
        ended = sa.or_(e.c.status == self.runs.status("completed"), e.c.status == self.runs.status("failed"))
        return sa.and_(e.c.is_retry, ended)

    def stats_summary(self) -> sa.Select:
        """Retries ended in the window (succeeded, chains), retries cancelled in it, retries
        pending and running now, and stuck detections in the window."""
        e, t, runs = self._ended(), self.t, self.runs
        ended = self._retry_ended(e)
        return sa.select(
            sa.func.count().filter(ended).label("retries"),
            sa.func.count().filter(ended, e.c.status == runs.status("completed")).label("succeeded"),
            sa.func.count(sa.distinct(e.c.original_run_id)).filter(ended).label("chains"),
            sa.func.count().filter(e.c.is_retry, e.c.status == runs.status("cancelled")).label("cancelled"),
            sa.func.count().filter(e.c.failure_pattern == STUCK_PATTERN).label("stuck_detections"),
            self._count(t.c.status == runs.status("pending_retry")).label("pending"),
            self._count(t.c.status == runs.status("running"), t.c.is_retry).label("running"),
        ).select_from(e)

    def stats_by_attempt(self) -> sa.Select:
        """The retries ended in the window by retry number; they add up to `stats_summary`'s."""
        e, runs = self._ended(), self.runs
        return (
            sa.select(
                e.c.retry_count.label("attempt"),
                sa.func.count().label("retries"),
                sa.func.count().filter(e.c.status == runs.status("completed")).label("succeeded"),
            )
            .where(self._retry_ended(e))
            .group_by(e.c.retry_count)
            .order_by(e.c.retry_count)
        )

    def stats_by_pattern(self) -> sa.Select:
        """Per failure pattern: the attempts that failed with it in the window, and the retries
        ended in the window that retried such an attempt, with how many succeeded. A retry counts
        under the pattern of the attempt it retried (NULL: one the scraper failed itself), so the
        retries add up to `stats_summary`'s."""
        e, t, runs = self._ended(), self.t, self.runs
        retried = t.alias("retried_attempt")
        failures = sa.select(
            e.c.failure_pattern.label("pattern"), sa.false().label("is_retry"), sa.false().label("succeeded")
        ).where(e.c.failure_pattern.is_not(None))
        retries = (
            sa.select(retried.c.failure_pattern, sa.true(), e.c.status == runs.status("completed"))
            .select_from(e)
            .outerjoin(
                retried,
                sa.and_(
                    retried.c.retry_count == e.c.retry_count - 1,
                    sa.or_(
                        retried.c.id == e.c.original_run_id,
                        sa.and_(retried.c.is_retry, retried.c.original_run_id == e.c.original_run_id),
                    ),
                ),
            )
            .where(self._retry_ended(e))
        )
        counted = sa.union_all(failures, retries).subquery("counted")
        failed = sa.func.count().filter(~counted.c.is_retry)
        retried_count = sa.func.count().filter(counted.c.is_retry)
        return (
            sa.select(
                counted.c.pattern,
                failed.label("failures"),
                retried_count.label("retries"),
                sa.func.count().filter(counted.c.is_retry, counted.c.succeeded).label("retries_succeeded"),
            )
            .group_by(counted.c.pattern)
            .order_by(failed.desc(), retried_count.desc(), counted.c.pattern.nulls_last())
        )

    def permanently_failed(self, *, since: bool = False) -> sa.Select:
        """How many chains ended permanently failed: their latest attempt failed, no retry follows
        it and none of their runs completed (`retry_candidates`' failed chains), among the chains
        stuck-runs handled (the ended-attempts index; a run the scraper failed itself and nobody
        retried is not counted). With `since`, those whose last attempt ended since `:sr_since`.
        `status` and `stats` both count with this one statement."""
        t = self.t
        where = [self.retry_candidates().whereclause, sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None))]
        if since:
            where.append(t.c.completed_at >= sa.bindparam("sr_since"))
        return sa.select(self._count(*where).label("permanently_failed"))
