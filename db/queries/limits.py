"""SPEC §14's judgement of a running run in SQL: the limit that applies to it, whether it is
stuck (past that limit; with a heartbeat, stale or past a cap) or stalled (its `progress`
counter stood still), and the progress records the stall is judged from.

The order of precedence is decided once, in jobs.limits; what reaches SQL are its results as
bind parameters (never SQL built from values): the default, and for each kind with a limit of
its own (configured, else learned: `limit_for`'s answer) its seconds, source, reason text and
learned-from count, as parallel arrays. SQL applies the one step left, per row: the run's own
`max_runtime`, else its kind's entry, else the default. The sweep, its dry run, the counts of
`status` and the pages, and the runs listing all read these expressions; the parameters are
named `sr_lim_*` (jobs.limits.judging_params binds them).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import Grouping

from db.arrays import array_param
from db.queries.common import NOW, TableStatements, duration_text, render, statement

PROGRESS_TABLE = "stuck_runs_progress"

SECOND = sa.literal_column("interval '1 second'", sa.Interval)


def _param(name: str, kind: sa.types.TypeEngine) -> sa.BindParameter:
    return sa.bindparam(name, type_=kind)


def ago(seconds: sa.ColumnElement) -> sa.ColumnElement:
    """The moment `seconds` before `:sr_now`."""
    return NOW - seconds * SECOND


class LimitStatements(TableStatements):
    """The per-run limit, stuck and stalled predicates over the runs table (or a CTE of its rows)."""

    @statement
    def progress_table(self) -> sa.Table:
        return sa.Table(
            PROGRESS_TABLE,
            sa.MetaData(),
            sa.Column("runs_table", sa.Text, primary_key=True),
            sa.Column("run_id", sa.Text, primary_key=True),
            sa.Column("progress", sa.Text),
            sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
            schema=self.t.schema,
        )

    progress_upkeep = statement(lambda self: self._progress_upkeep())

    @statement
    def progress_now(self) -> sa.Select | None:
        """A retry executing here: its progress counter now (None without the role)."""
        t, counter = self.t, self.runs.progress_counter
        if not counter:
            return None
        return sa.select(t.c[counter]).where(t.c.id == sa.bindparam("sr_run_id", type_=t.c.id.type))

    # -- the limit that applies ---------------------------------------------------------------
    # Each takes the run's kind's place in the kinds' arrays as `position` when the statement has
    # it already (the sweep's locked rows carry it: one `array_position` per run, not one per use);
    # without it, it is looked up where it is used.

    def kind_position(self, source: sa.FromClause | None = None) -> sa.ColumnElement:
        """The run's kind's place in `:sr_lim_kinds` (NULL: no limit of its kind; the default)."""
        kind = self.runs.kind_text(source if source is not None else self.t)
        if kind is None:
            return sa.cast(sa.null(), sa.Integer)
        return sa.func.array_position(array_param("sr_lim_kinds", sa.Text), kind)

    def _own_seconds(self, source: sa.FromClause) -> sa.ColumnElement:
        """The run's own `max_runtime` in seconds; NULL without one, or in a flat call (`:sr_lim_own` false)."""
        own = self.runs.max_runtime_seconds(source)
        if own is None:
            return sa.cast(sa.null(), sa.Float)
        return sa.case((_param("sr_lim_own", sa.Boolean), own), else_=sa.null())

    def _kind_entry(
        self, source: sa.FromClause, name: str, kind: sa.types.TypeEngine, position: sa.ColumnElement | None
    ) -> sa.ColumnElement:
        if self.runs.kind is None:
            return sa.cast(sa.null(), kind)
        # Parenthesised: PostgreSQL subscripts `(CAST(... AS float[]))[i]`, not `CAST(...)[i]`.
        array = sa.type_coerce(Grouping(array_param(f"sr_lim_kind_{name}", kind)), ARRAY(kind))
        return array[position if position is not None else self.kind_position(source)]

    def limit_seconds(
        self, source: sa.FromClause | None = None, position: sa.ColumnElement | None = None
    ) -> sa.ColumnElement:
        """The limit that applies, in seconds: own, else the kind's, else the default."""
        source = source if source is not None else self.t
        default = _param("sr_lim_default_s", sa.Float)
        kinds = self._kind_entry(source, "s", sa.Float, position)
        return sa.func.coalesce(self._own_seconds(source), kinds, default)

    def cap_seconds(self, position: sa.ColumnElement | None = None) -> sa.ColumnElement:
        """Beside a heartbeat, the cap on the run's whole runtime: its own or its kind's (NULL: none;
        `STUCK_AFTER` is not a cap)."""
        return sa.func.coalesce(self._own_seconds(self.t), self._kind_entry(self.t, "s", sa.Float, position))

    def limit_source(
        self, source: sa.FromClause | None = None, position: sa.ColumnElement | None = None
    ) -> sa.ColumnElement:
        """`run`, `configured`, `learned` or `default` (jobs.limits.SOURCES)."""
        source = source if source is not None else self.t
        kinds = self._kind_entry(source, "source", sa.Text, position)  # NULL exactly where the kind has no limit
        return sa.case((self._own_seconds(source).is_not(None), "run"), else_=sa.func.coalesce(kinds, "default"))

    def limit_reason(
        self, source: sa.FromClause | None = None, position: sa.ColumnElement | None = None
    ) -> sa.ColumnElement:
        """`limit 0.3h, learned for spider=jobs_de from 412 runs`: each kind's text and the default's
        come written by jobs.limits; a run's own is its duration before `:sr_lim_run_reason`."""
        source = source if source is not None else self.t
        own = self._own_seconds(source)
        own_text = sa.func.concat(
            "limit ", duration_text(sa.cast(own, sa.Numeric)), _param("sr_lim_run_reason", sa.Text)
        )
        kinds = self._kind_entry(source, "reason", sa.Text, position)  # NULL exactly where the kind has no limit
        return sa.case(
            (own.is_not(None), own_text), else_=sa.func.coalesce(kinds, _param("sr_lim_default_reason", sa.Text))
        )

    # -- stuck and stalled ----------------------------------------------------------------------

    def capped(self, position: sa.ColumnElement | None = None) -> sa.ColumnElement:
        """Beside a heartbeat: running longer than a cap (counted from `started_at`)."""
        if self.runs.kind is None and self.runs.max_runtime is None:
            return sa.false()  # no cap but STUCK_AFTER's staleness
        return self.t.c.started_at < ago(self.cap_seconds(position))

    def stuck(self, position: sa.ColumnElement | None = None) -> sa.ColumnElement:
        """Running strictly longer than its limit; with a heartbeat, stale beyond the default or
        past a cap. A sargable prefilter first: `started_at` before the smallest limit in force
        (`:sr_lim_min_s`), unless the run has a limit of its own, keeps the idle sweep on the
        running runs' index."""
        t, runs = self.t, self.runs
        if runs.heartbeat:
            stale = runs.last_sign_of_life() < ago(_param("sr_lim_default_s", sa.Float))
            return sa.or_(stale, self.capped(position))
        exact = t.c.started_at < ago(self.limit_seconds(position=position))
        prefilter = t.c.started_at < ago(_param("sr_lim_min_s", sa.Float))
        own = self._own_seconds(t)
        if runs.max_runtime is not None:
            prefilter = sa.or_(prefilter, own.is_not(None))
        return sa.and_(prefilter, exact)

    def stalled_since(self) -> sa.ColumnElement:
        """Since when the run's `progress` stood at its value now, as the sweep recorded it (NULL:
        no record of this value, or no progress: a NULL progress never stalls)."""
        p, t = self.progress_table, self.t
        return (
            sa.select(p.c.changed_at)
            .where(
                p.c.runs_table == _param("sr_lim_table", sa.Text),
                p.c.run_id == sa.cast(t.c.id, sa.Text),
                p.c.progress == sa.cast(t.c[self.runs.progress_counter], sa.Text),
            )
            .scalar_subquery()
        )

    def stalled(self) -> sa.ColumnElement:
        """Progress stood still for `:sr_lim_stall_s` (NULL: the run's own limit); never without the
        `progress` role or when `:sr_lim_stall` is off (a flat call)."""
        if self.runs.progress_counter is None:
            return sa.false()
        stall = sa.func.coalesce(_param("sr_lim_stall_s", sa.Float), self.limit_seconds())
        return sa.and_(_param("sr_lim_stall", sa.Boolean), self.stalled_since() < ago(stall))

    def judged(self) -> sa.ColumnElement:
        """What the sweep fails among running runs: stuck or stalled."""
        return sa.or_(self.stuck(), self.stalled())

    def fired_error(self, template: str, stalled_template: str, position: sa.ColumnElement | None = None):
        """The stuck message with its hours by the clock that fired: `started_at` for a limit or a
        cap, the heartbeat for staleness, the progress record for a stall (`stalled_template`: a
        run both stuck and stalled is said stuck). Each condition is judged once per run, each
        branch says its own hours."""
        t, runs = self.t, self.runs

        def said(text: str, since: sa.ColumnElement) -> sa.ColumnElement:
            return render(text, hours=duration_text(sa.cast(sa.extract("epoch", NOW - since), sa.Numeric)))

        error = said(template, t.c.started_at)
        if runs.heartbeat:
            error = sa.case((self.capped(position), error), else_=said(template, runs.last_sign_of_life()))
        if runs.progress_counter is not None:
            error = sa.case((self.stuck(position), error), else_=said(stalled_template, self.stalled_since()))
        return error

    def stall_reason(self, position: sa.ColumnElement | None = None) -> sa.ColumnElement:
        """Why a stalled run was judged: `STALL_AFTER`'s text, else its own limit's reason."""
        return sa.func.coalesce(_param("sr_lim_stall_reason", sa.Text), self.limit_reason(position=position))

    def judged_reason(self, position: sa.ColumnElement | None = None) -> sa.ColumnElement:
        if self.runs.progress_counter is None:
            return self.limit_reason(position=position)
        reason = self.limit_reason(position=position)
        return sa.case((self.stuck(position), reason), else_=self.stall_reason(position))

    # -- the progress records -------------------------------------------------------------------

    def _progress_upkeep(self) -> sa.Insert | None:
        """One statement each sweep: every running run's progress recorded (`changed_at` moves only
        when the value changed), and the records of runs no longer running removed.

        The running runs (ids and counters as text, as the records keep them) and the table's
        records are joined once, in full: a running run with no record or a moved counter is
        upserted, a record with no running run deleted; a run whose counter stood still is not
        written, and not locked either (offering every running run to ON CONFLICT locked each
        unchanged record: 100,000 in a mass event). Joined twice instead (once to find the
        records to delete, once those to write), the upkeep read and hashed both sides twice: half
        its time in a mass event (bench.limits)."""
        runs, t, p = self.runs, self.t, self.progress_table
        if runs.progress_counter is None:
            return None
        table = _param("sr_lim_table", sa.Text)
        running = (
            sa.select(
                sa.cast(t.c.id, sa.Text).label("run_id"),
                sa.cast(t.c[runs.progress_counter], sa.Text).label("progress"),
            )
            .where(runs.in_state(t.c.status, "running"))
            .subquery("running")
        )
        recorded = sa.select(p.c.run_id, p.c.progress).where(p.c.runs_table == table).subquery("recorded")
        changes = (
            sa.select(
                running.c.run_id.label("running_id"),
                running.c.progress,
                recorded.c.run_id.label("recorded_id"),
            )
            .select_from(running.join(recorded, recorded.c.run_id == running.c.run_id, full=True))
            .where(
                sa.or_(
                    running.c.run_id.is_(None),
                    recorded.c.run_id.is_(None),
                    recorded.c.progress.is_distinct_from(running.c.progress),
                )
            )
            .cte("changes")
            .prefix_with("MATERIALIZED")
        )
        gone = (
            sa.delete(p)
            .where(p.c.runs_table == table, p.c.run_id == changes.c.recorded_id, changes.c.running_id.is_(None))
            .cte("gone")
        )
        rows = sa.select(table, changes.c.running_id, changes.c.progress, NOW).where(changes.c.running_id.is_not(None))
        upsert = postgresql.insert(p).from_select(["runs_table", "run_id", "progress", "changed_at"], rows)
        moved = p.c.progress.is_distinct_from(upsert.excluded.progress)  # a counter moved since it was read
        upsert = upsert.on_conflict_do_update(
            index_elements=[p.c.runs_table, p.c.run_id],
            set_={"progress": upsert.excluded.progress, "changed_at": upsert.excluded.changed_at},
            where=moved,
        )
        return upsert.add_cte(changes).add_cte(gone)
