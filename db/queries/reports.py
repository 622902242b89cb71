"""The reading statements behind `status`, `stats` and the chain views: one run, a chain, the counts,
the retry statistics of a window, and the chains that ended permanently failed.

Counts are index probes, never table scans.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from db.messages import STUCK_PATTERN
from db.queries.common import NOW, statement
from db.queries.limits import LimitStatements

# What `stats` reads of each attempt that ended in its window.
ENDED_COLUMNS = ("id", "original_run_id", "is_retry", "retry_count", "status", "failure_pattern", "handed_off")


class ReportStatements(LimitStatements):
    """`get`, `chain`, `counts`, `untimed`, `stats_*` and `permanently_failed` for one table."""

    # From RetryStatements, which RunQueries composes with this: the failed chains counted.
    retry_candidates: Callable[..., sa.Select]

    @statement
    def get(self) -> sa.Select:
        return sa.select(*self.runs.keyed()).where(self.t.c.id == sa.bindparam("sr_run_id"))

    def chain(self) -> sa.Select:
        """Every attempt of the chain rooted at `:sr_root`, oldest first."""
        t = self.t
        return (
            sa.select(*self.runs.keyed())
            .where(
                sa.or_(
                    t.c.id == sa.bindparam("sr_root"),
                    sa.and_(t.c.is_retry, t.c.original_run_id == sa.bindparam("sr_root")),
                )
            )
            .order_by(t.c.retry_count, t.c.started_at.asc().nulls_last())
        )

    def runs_page(
        self,
        *,
        state: str | None,
        search: bool,
        since: str | None,
        after: str | None,
        stuck: bool = False,
        order: str = "newest",
        backwards: bool = False,
        target: sa.ColumnElement | None = None,
    ) -> sa.Select:
        """One page of runs, newest first by (started_at, id), runs not started (pending retries)
        first: `:sr_limit` rows after the cursor. `after` is None (the first page), `started` (the
        cursor's run has `:sr_after_at`) or `unstarted`; `:sr_after_id` is the cursor run's id.

        `search` matches `:sr_search` (an ILIKE pattern) in the label's columns and the error. `since`
        is the time a window counts: `started` or `queued` (started_at >= `:sr_since`), `ended` (completed_at >=
        `:sr_since`) or `due` (next_retry_at before `:sr_due_before`, overdue ones too). `stuck` keeps the
        runs `stuck_now`. `order` `started` (newest started, started runs only) and `due` (pending
        retries, soonest due first), and `backwards` (the page before the cursor, in reverse order: the
        caller turns it round), are `_other_order`'s. `target` (TARGET's value of a row, from
        db/queries/groups.py) keeps the runs whose target is `:sr_target`: a worst target's runs."""
        t, runs = self.t, self.runs
        query = sa.select(*runs.keyed())
        if target is not None:
            query = query.where(target == sa.bindparam("sr_target", type_=sa.Text))
        if stuck:
            query = query.where(self.stuck_now())
        if state is not None:
            query = query.where(runs.in_state(t.c.status, state))
        if search:
            pattern = sa.bindparam("sr_search")
            # The error as text: `#>>` on a json column is typed as the column, which bound the pattern as
            # JSONB (`text ~~* jsonb` does not exist).
            error = sa.cast(runs.error_text(t.c.error_message), sa.Text)
            searched = [sa.cast(t.c[key], sa.Text) for key in runs.label_keys()] + [error]
            query = query.where(sa.or_(*(column.ilike(pattern) for column in searched)))
        if since in ("started", "queued"):  # a hand-off's queued retry: started_at is when it was queued
            query = query.where(t.c.started_at >= sa.bindparam("sr_since"))
        elif since == "ended":
            query = query.where(t.c.completed_at >= sa.bindparam("sr_since"))
        elif since == "due":
            query = query.where(t.c.next_retry_at < sa.bindparam("sr_due_before", type_=t.c.next_retry_at.type))
        if order != "newest" or backwards:
            return self._other_order(query, order, after, backwards)
        after_id = sa.bindparam("sr_after_id", type_=t.c.id.type)
        if after == "started":
            at = sa.bindparam("sr_after_at", type_=t.c.started_at.type)
            # A row comparison is the index's own condition: the page starts where the cursor is.
            # (`started_at < x OR (started_at = x AND id < y)` made PostgreSQL walk the index from the
            # top, filtering: page 100,000 of ten million rows took a second.)
            query = query.where(sa.tuple_(t.c.started_at, t.c.id) < sa.tuple_(at, after_id))
        elif after == "unstarted":
            query = query.where(
                sa.or_(t.c.started_at.is_not(None), sa.and_(t.c.started_at.is_(None), t.c.id < after_id))
            )
        return query.order_by(t.c.started_at.desc().nulls_first(), t.c.id.desc()).limit(sa.bindparam("sr_limit"))

    def _other_order(self, query: sa.Select, order: str, after: str | None, backwards: bool) -> sa.Select:
        """Keyset pages that an index serves both ways: the newest-first index for `newest` and
        `started`, the pending retries' index for `due`. Backwards, `after` is the cursor of the
        page's first run, the comparison and the order reversed; `newest` backwards reads the
        started runs (`after` = started) or the runs not started (`unstarted`: those after the
        cursor's id; `unstarted_all`: from the last), which `list_runs` joins."""
        t, runs = self.t, self.runs
        after_id = sa.bindparam("sr_after_id", type_=t.c.id.type)
        limit = sa.bindparam("sr_limit")
        if order == "due":
            key = t.c.next_retry_at
            query = query.where(runs.in_state(t.c.status, "pending_retry"), key.is_not(None))
        else:
            key = t.c.started_at
        at = sa.bindparam("sr_after_at", type_=key.type)
        if after == "unstarted" or after == "unstarted_all":  # backwards through the runs not started
            query = query.where(t.c.started_at.is_(None))
            if after == "unstarted":
                query = query.where(t.c.id > after_id)
            return query.order_by(t.c.id.asc()).limit(limit)
        if order != "due":
            query = query.where(key.is_not(None))
        later_first = (order != "due") != backwards  # newest and started: descending; due: ascending
        if after is not None:
            cursor = sa.tuple_(key, t.c.id), sa.tuple_(at, after_id)
            query = query.where(cursor[0] < cursor[1] if later_first else cursor[0] > cursor[1])
        if later_first:
            return query.order_by(key.desc().nulls_first(), t.c.id.desc()).limit(limit)
        return query.order_by(key.asc().nulls_last(), t.c.id.asc()).limit(limit)

    def stuck_now(self) -> sa.ColumnElement:
        """Running and past its limit, or stalled (SPEC §14, the sweep's own predicate, bound by
        jobs.limits.judging_params): what `check` would fail now, what the overview's "Stuck now"
        counts and the runs page's `stuck` filter shows."""
        return sa.and_(self.runs.in_state(self.t.c.status, "running"), self.judged())

    def untimed(self) -> sa.ColumnElement:
        """Running runs with nothing to time them by (no started_at, no heartbeat): never stuck."""
        return sa.and_(self.runs.in_state(self.t.c.status, "running"), self.runs.last_sign_of_life().is_(None))

    def monitoring_sql(self, kind: str, run_id: object = None) -> str:
        """SPEC §9's monitoring queries in the table's names: `pending`, or the `history` of `run_id`.

        The run is named by its label's columns (RUN_LABEL's, or search_query and location_query)."""
        t, runs = self.t, self.runs
        label = [t.c[key] for key in runs.label_keys()] or [t.c.id]
        if kind == "pending":
            query = (
                sa.select(*label, t.c.retry_count, t.c.max_retries, t.c.next_retry_at, t.c.status)
                .where(runs.in_state(t.c.status, "pending_retry"))
                .order_by(t.c.next_retry_at)
            )
        else:
            run = sa.literal(run_id, t.c.id.type)
            query = (
                sa.select(*label, t.c.retry_count, t.c.status, t.c.error_message, t.c.started_at, t.c.completed_at)
                .where(sa.or_(t.c.original_run_id == run, t.c.id == run))
                .order_by(t.c.retry_count)
            )
        return str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})) + ";"

    def status_sample(self) -> sa.Select:
        """The status values of up to `:sr_limit` rows (the newest first where ids are numbers), with
        how many rows hold each: what the scraper writes, to hold STATUS_MAP against."""
        t = self.t
        rows = sa.select(sa.cast(t.c.status, sa.Text).label("value"))
        if self.runs.id_kind == "integer":
            rows = rows.order_by(t.c.id.desc())
        sample = rows.limit(sa.bindparam("sr_limit")).subquery("sample")
        return (
            sa.select(sample.c.value, sa.func.count().label("rows"))
            .group_by(sample.c.value)
            .order_by(sa.func.count().desc())
        )

    def untimed_fix_sql(self) -> str:
        """The UPDATE an operator can run to give the untimed runs a start, in the table's names."""
        t = self.t
        fix = sa.update(t).values(started_at=sa.func.now()).where(self.untimed())
        return str(fix.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})).replace("\n", " ")

    def _count(self, *where: sa.ColumnElement) -> sa.ScalarSelect:
        return sa.select(sa.func.count()).select_from(self.t).where(*where).scalar_subquery()

    def _handed_off_now(self) -> list[sa.ColumnElement]:
        """The retries handed to the fleet (SPEC §12) and not yet ended, labelled
        `handed_off_queued` (0 where STATUS_MAP maps no `queued`: an enum may lack the word) and
        `handed_off_running`; the hand-offs' index answers both."""
        t, runs = self.t, self.runs
        handed = t.c.handed_off.is_not(None)
        queued = (
            self._count(handed, runs.in_state(t.c.status, "queued"))
            if "queued" in runs.layout.statuses
            else sa.literal(0, sa.Integer)
        )
        running = self._count(handed, runs.in_state(t.c.status, "running"))
        return [queued.label("handed_off_queued"), running.label("handed_off_running")]

    def _executing_here(self) -> sa.ColumnElement:
        """Retries running that stuck-runs executes itself: not handed to the fleet."""
        t = self.t
        return sa.and_(self.runs.in_state(t.c.status, "running"), t.c.is_retry, t.c.handed_off.is_(None))

    def counts(self) -> sa.Select:
        """How many runs are running, stuck (`stuck_now`), untimed, pending a
        retry, the retries executing here (`running_retries`) and those handed to the fleet and
        not yet ended; each an index probe, never a table scan. (How many chains ended
        permanently failed: `permanently_failed`.)"""
        t, runs = self.t, self.runs
        running = runs.in_state(t.c.status, "running")
        pending = runs.in_state(t.c.status, "pending_retry")
        count = self._count
        return sa.select(
            count(running).label("running"),
            count(self.stuck_now()).label("stuck"),
            count(self.untimed()).label("untimed"),
            count(pending).label("pending_retry"),
            count(self._executing_here()).label("running_retries"),
            *self._handed_off_now(),
            sa.select(sa.func.min(t.c.next_retry_at)).where(pending).scalar_subquery().label("next_due"),
        )

    def due_now(self) -> sa.Select:
        """How many pending retries are due at `:sr_now` (the pending index): those a pass would
        start, were it not paused and a slot free."""
        t = self.t
        due = [self.runs.in_state(t.c.status, "pending_retry"), t.c.next_retry_at <= NOW]
        return sa.select(self._count(*due).label("due"))

    # -- statistics (attempts that ended since `:sr_since`; the ended-attempts index) --------
    #
    # One population for every retry number `stats` prints: retries that ended (completed or
    # failed) in the window. Retries pending or running now, and retries cancelled before they
    # ran, are counted beside it, never in it.

    def _ended(self) -> sa.Subquery:
        t = self.t
        return (
            sa.select(*(t.c[key] for key in ENDED_COLUMNS))
            .where(sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None)), t.c.completed_at >= sa.bindparam("sr_since"))
            .subquery("ended")
        )

    def stats_summary(self) -> sa.Select:
        """Retries ended in the window (succeeded, chains), retries cancelled in it, retries
        pending, executing here and handed to the fleet (queued, running) now, and stuck
        detections in the window."""
        e, t, runs = self._ended(), self.t, self.runs
        ended = self.retry_ended(e)
        return sa.select(
            sa.func.count().filter(ended).label("retries"),
            sa.func.count().filter(ended, runs.in_state(e.c.status, "completed")).label("succeeded"),
            sa.func.count(sa.distinct(e.c.original_run_id)).filter(ended).label("chains"),
            sa.func.count().filter(e.c.is_retry, runs.in_state(e.c.status, "cancelled")).label("cancelled"),
            sa.func.count().filter(e.c.failure_pattern == STUCK_PATTERN).label("stuck_detections"),
            self._count(runs.in_state(t.c.status, "pending_retry")).label("pending"),
            self._count(self._executing_here()).label("running"),
            *self._handed_off_now(),
        ).select_from(e)

    def _retries_ended_by(self, key: str, label: str) -> sa.Select:
        """The retries ended in the window, with how many succeeded, grouped by column `key`
        (NULL first), named `label`; they add up to `stats_summary`'s."""
        e, runs = self._ended(), self.runs
        return (
            sa.select(
                e.c[key].label(label),
                sa.func.count().label("retries"),
                sa.func.count().filter(runs.in_state(e.c.status, "completed")).label("succeeded"),
            )
            .where(self.retry_ended(e))
            .group_by(e.c[key])
            .order_by(e.c[key].nulls_first())
        )

    def stats_by_how(self) -> sa.Select:
        """The retries ended in the window by how they ran: `handed_off` (`webhook`, `queue`), NULL
        for those stuck-runs executed itself. A handed-off retry's outcome is what the scraper
        wrote (or the checker, when nobody started it)."""
        return self._retries_ended_by("handed_off", "how")

    def stats_by_attempt(self) -> sa.Select:
        """The retries ended in the window by retry number."""
        return self._retries_ended_by("retry_count", "attempt")

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
            sa.select(retried.c.failure_pattern, sa.true(), runs.in_state(e.c.status, "completed"))
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
            .where(self.retry_ended(e))
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
        where = self.permanently_failed_where()
        if since:
            where.append(self.t.c.completed_at >= sa.bindparam("sr_since"))
        return sa.select(self._count(*where).label("permanently_failed"))

    def permanently_failed_where(self) -> list[sa.ColumnElement]:
        """What makes a row the end of a chain that ended permanently failed (`permanently_failed`;
        `stats --by` counts it per group)."""
        t = self.t
        return [
            self.retry_candidates().whereclause,
            sa.or_(t.c.is_retry, t.c.failure_pattern.is_not(None)),
            # A failure the fleet wrote on a retry it was handed is not an end until its chain is
            # continued (within a poll): it may well be retried.
            sa.or_(t.c.handed_off.is_(None), t.c.failure_pattern.is_not(None)),
        ]
