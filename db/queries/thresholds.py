"""The statements behind learned limits and their evidence (SPEC §14): each kind's runtimes over
its completed runs in a window, counted by whole seconds (`stuck_runs_runtimes`) and moved on
hourly by two small ranges of runs; the stored learned limits (`stuck_runs_thresholds`); how many
completed runs ran past a limit, the runs failed as stuck and how long past their limit they ran,
and the runs running now.

A runtime is `completed_at - started_at`, in seconds. A run's limit in the evidence is its own
`max_runtime` when it has one, else its kind's (given per kind as arrays, decided in Python by
jobs.limits.limit_for), else the default: the precedence of §14, never decided here.
"""

from __future__ import annotations

import sqlalchemy as sa

from db import locks
from db.arrays import array_param
from db.messages import STUCK_PATTERN
from db.table import RunsTable

THRESHOLDS = "stuck_runs_thresholds"
RUNTIMES = "stuck_runs_runtimes"
LEARNING = "learning"  # the lock namespace's purpose: one computation of learned limits at a time
# The most (kind, whole seconds) pairs a first count walks (~5 us each) before it counts run by run
# instead (~40 ns a run): 20,000 pairs are ~0.1 s, won back by 2.5M runs; ten million runs of twenty
# spiders in bench.learning make 1,923.
PAIRS_WALKED_AT_MOST = 20_000


def thresholds_table(schema: str | None) -> sa.Table:
    return sa.Table(
        THRESHOLDS,
        sa.MetaData(),
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("runs_table", sa.Text, nullable=False),
        sa.Column("kind", sa.Text),  # NULL: runs of no kind (or a table without a `kind` role)
        sa.Column("runs", sa.Integer, nullable=False),
        sa.Column("p50", sa.Interval),
        sa.Column("p95", sa.Interval),
        sa.Column("p99", sa.Interval),
        sa.Column("longest", sa.Interval),
        sa.Column("limit", sa.Interval),  # NULL: not learned (too few runs, or no kind)
        sa.Column("learn_window", sa.Interval, nullable=False),
        sa.Column("counted_from", sa.DateTime(timezone=True), nullable=False),  # the runtimes counted: runs
        sa.Column("counted_until", sa.DateTime(timezone=True), nullable=False),  # completed in [from, until)
        sa.Column("learned_with", sa.Text, nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        schema=schema,
    )


def runtimes_table(schema: str | None) -> sa.Table:
    """How many completed runs of each kind ran each whole number of seconds, over the window the
    thresholds rows say (`counted_from`, `counted_until`): moved on hourly by two small ranges of
    runs, never counted again from the whole window unless the window changed."""
    return sa.Table(
        RUNTIMES,
        sa.MetaData(),
        sa.Column("runs_table", sa.Text, nullable=False),
        sa.Column("kind", sa.Text),
        sa.Column("seconds", sa.Integer, nullable=False),
        sa.Column("runs", sa.BigInteger, nullable=False),
        schema=schema,
    )


class ThresholdStatements:
    """The statements for one runs table. Parameters by name, prefixed `sr_`."""

    def __init__(self, runs: RunsTable) -> None:
        self.runs = runs
        self.t = runs.table
        self.stored = thresholds_table(self.t.schema)
        self.histogram = runtimes_table(self.t.schema)
        self.lock_ns = locks.namespace(runs.canonical_name, LEARNING)

    def _kind(self) -> sa.ColumnElement:
        kind = self.runs.kind_text()
        return (kind if kind is not None else sa.cast(sa.null(), sa.Text)).label("kind")

    def _runtime(self) -> sa.ColumnElement:
        t = self.t
        return sa.extract("epoch", t.c.completed_at - t.c.started_at)

    def _completed_in_window(self) -> list[sa.ColumnElement]:
        t = self.t
        return [
            self.runs.in_state(t.c.status, "completed"),
            t.c.completed_at >= sa.bindparam("sr_since", type_=sa.DateTime(timezone=True)),
            t.c.started_at.is_not(None),
        ]

    def whole_seconds(self) -> sa.ColumnElement:
        """How many whole seconds a run ran: the expression revision 0010's index holds, written
        alike (the planner reads it from the index only for the very same expression). date_part,
        not extract: extract's epoch is numeric (PostgreSQL 14+), whose arithmetic over the ten
        million runs of a first count cost more than reading them (bench.learning --profile)."""
        t = self.t
        elapsed = sa.func.date_part("epoch", t.c.completed_at - t.c.started_at, type_=sa.Float)
        return sa.cast(sa.func.floor(elapsed), sa.Integer)

    def _completed_between(self, since: str, until: str) -> list[sa.ColumnElement]:
        t = self.t
        return [
            self.runs.in_state(t.c.status, "completed"),
            t.c.completed_at >= sa.bindparam(since, type_=sa.DateTime(timezone=True)),
            t.c.completed_at < sa.bindparam(until, type_=sa.DateTime(timezone=True)),
            t.c.started_at.is_not(None),
        ]

    def _counted(self, since: str, until: str, sign: int) -> sa.Select:
        """Each completed run of `[:since, :until)` by completion time, as (kind, whole seconds it ran, sign)."""
        return sa.select(self._kind(), self.whole_seconds().label("seconds"), sa.literal(sign).label("runs")).where(
            *self._completed_between(since, until)
        )

    def first_count(self) -> sa.CompoundSelect | sa.Select:
        """How many completed runs of each kind ran each whole number of seconds, those completed in
        `[:sr_add_from, :sr_add_until)`: the count of a window from scratch (ten million runs in
        bench.learning). When every completed run of the table is inside the window (two probes of
        0007's index say so, in the same statement, so in the same snapshot), each (kind, whole
        seconds) pair's runs are counted where revision 0010's index holds them, no run checked
        against the window; otherwise each run is (`_first_count_in_window`). Writes nothing."""
        if self.runs.kind is None:
            return self._first_count_in_window()
        by_pair, few = self._first_count_by_pair()
        walk = sa.and_(self.all_inside_window().scalar_subquery(), few)
        return sa.union_all(
            by_pair.where(walk),
            self._first_count_of_no_kind().where(walk),
            self._first_count_in_window().where(~walk),
        )

    def all_inside_window(self) -> sa.Select:
        """Whether every completed run's `completed_at` is in `[:sr_add_from, :sr_add_until)`: min and
        max, two probes of 0007's index (false when none has one; those runs are no runtime)."""
        t = self.t
        bounds = sa.and_(
            sa.func.min(t.c.completed_at) >= sa.bindparam("sr_add_from", type_=sa.DateTime(timezone=True)),
            sa.func.max(t.c.completed_at) < sa.bindparam("sr_add_until", type_=sa.DateTime(timezone=True)),
        )
        found = sa.select(sa.func.coalesce(bounds, sa.false())).where(self.runs.in_state(t.c.status, "completed"))
        return found.correlate(None)

    def _first_count_in_window(self) -> sa.Select:
        """The first count checking each run's completion against the window, grouped as revision
        0010's index orders the runs (or hashed over 0007's range of the window, as the planner sees fit)."""
        kind, seconds = self._kind(), self.whole_seconds()
        return (
            sa.select(kind, seconds.label("seconds"), sa.cast(sa.func.count(), sa.BigInteger).label("runs"))
            .where(*self._completed_between("sr_add_from", "sr_add_until"))
            .group_by(kind.element, seconds)
        )

    def _first_count_by_pair(self) -> tuple[sa.Select, sa.ColumnElement]:
        """Each (kind, whole seconds) pair of completed runs, found by skipping from one to the next
        in revision 0010's index (a recursive walk), and its runs counted in the index by an equality
        on both: no run's completion checked, no per-run comparison of group keys, as a bare count
        of the index's entries costs. And whether the pairs are few enough to walk (at most
        `:sr_pairs_at_most`): each costs a few microseconds, where the runs of a pair, checked and
        grouped, cost some 30-50 ns each (bench.learning), so a fleet whose runs spread over many
        pairs is counted run by run instead; the walk stops one pair past the bound."""
        t, completed = self.t, self.runs.in_state(self.t.c.status, "completed")
        kind, seconds = t.c[self.runs.kind], self.whole_seconds()
        known = (completed, kind.is_not(None), seconds.is_not(None))
        at_most = sa.bindparam("sr_pairs_at_most", PAIRS_WALKED_AT_MOST, type_=sa.Integer)
        first = sa.select(kind.label("kind"), seconds.label("seconds")).where(*known).order_by(kind, seconds).limit(1)
        pairs = first.add_columns(sa.literal(1, sa.Integer).label("walked")).cte("pairs", recursive=True)
        after = (
            sa.select(kind.label("kind"), seconds.label("seconds"))
            .where(*known, sa.tuple_(kind, seconds) > sa.tuple_(pairs.c.kind, pairs.c.seconds))
            .order_by(kind, seconds)
            .limit(1)
            .lateral("next_pair")
        )
        step = sa.select(after.c.kind, after.c.seconds, pairs.c.walked + 1).select_from(pairs.join(after, sa.true()))
        pairs = pairs.union_all(step.where(pairs.c.walked <= at_most))
        runs = (
            sa.select(sa.cast(sa.func.count(), sa.BigInteger).label("runs"))
            .where(completed, kind == pairs.c.kind, seconds == pairs.c.seconds)
            .lateral("pair_runs")
        )
        counted = sa.select(sa.cast(pairs.c.kind, sa.Text).label("kind"), pairs.c.seconds, runs.c.runs).select_from(
            pairs.join(runs, sa.true())
        )
        few = sa.select(sa.func.count() <= at_most).select_from(pairs).scalar_subquery()
        return counted, few

    def _first_count_of_no_kind(self) -> sa.Select:
        """The runs of no kind by whole seconds, read in the order of revision 0010's index (where
        NULLs sort last)."""
        t = self.t
        kind, seconds = t.c[self.runs.kind], self.whole_seconds()
        return (
            sa.select(sa.cast(kind, sa.Text).label("kind"), seconds.label("seconds"))
            .add_columns(sa.cast(sa.func.count(), sa.BigInteger).label("runs"))
            .where(self.runs.in_state(t.c.status, "completed"), kind.is_(None), seconds.is_not(None))
            .group_by(kind, seconds)  # as the index orders them: no sort
        )

    def _folded(self, counted: sa.FromClause) -> sa.Select:
        """`counted` (kind, seconds, runs) with the runs completed in `[:sr_add_from, :sr_add_until)`
        added and those of `[:sr_drop_from, :sr_drop_until)` taken away: the runtimes of a window
        moved on, from the counts of the window before and two ranges of the learning index."""
        parts = sa.union_all(
            sa.select(counted.c.kind, counted.c.seconds, counted.c.runs),
            self._counted("sr_add_from", "sr_add_until", 1),
            self._counted("sr_drop_from", "sr_drop_until", -1),
        ).subquery("parts")
        total = sa.func.sum(parts.c.runs)
        return (
            sa.select(parts.c.kind, parts.c.seconds, sa.cast(total, sa.BigInteger).label("runs"))
            .group_by(parts.c.kind, parts.c.seconds)
            .having(total != 0)
        )

    def runtimes(self) -> sa.Select:
        """How many completed runs of each kind ran each whole number of seconds, in the window
        moved on (`_folded`) from the stored counts (with `:sr_keep`) or from none. Writes nothing."""
        h = self.histogram
        stored = sa.select(h.c.kind, h.c.seconds, h.c.runs).where(
            h.c.runs_table == self.runs.canonical_name, sa.bindparam("sr_keep", type_=sa.Boolean)
        )
        return self._folded(stored.subquery("stored"))

    def forget_counts(self) -> sa.Delete:
        h = self.histogram
        return sa.delete(h).where(h.c.runs_table == self.runs.canonical_name)

    def store_counts(self) -> sa.Insert:
        """Inserts counts given as a list of dicts (kind, seconds, runs, runs_table). The counts are
        read by `runtimes`, a plain SELECT, and stored apart: a statement that writes never runs in
        parallel, and the first count of a window needs the workers."""
        return sa.insert(self.histogram)

    def _limit(self, limits: sa.FromClause) -> sa.ColumnElement:
        """Each run's limit in seconds: its own, else its kind's (`limits`), else `:sr_default`."""
        own = self.runs.max_runtime_seconds()
        default = sa.bindparam("sr_default", type_=sa.Float)
        return sa.func.coalesce(*([own] if own is not None else []), limits.c.seconds, default)

    def _kind_limits(self) -> sa.TableValuedAlias:
        """`unnest(:sr_kinds, :sr_secondss)`: the limit of each kind that has one of its own."""
        return (
            sa.func.unnest(array_param("sr_kinds", sa.Text), array_param("sr_secondss", sa.Float))
            .table_valued(sa.column("kind", sa.Text), sa.column("seconds", sa.Float))
            .render_derived(name="l")
        )

    def _judged(self, *where: sa.ColumnElement) -> tuple[sa.Select, sa.ColumnElement, sa.ColumnElement]:
        limits = self._kind_limits()
        kind_text = self.runs.kind_text()
        on = (kind_text == limits.c.kind) if kind_text is not None else sa.false()
        kind = self._kind()
        source = sa.select(kind).select_from(self.t.outerjoin(limits, on)).where(*where)
        return source, self._runtime() - self._limit(limits), kind

    def over_limit(self) -> sa.Select:
        """Per kind, the completed runs since `:sr_since` that ran longer than their limit: each
        would have been failed while healthy."""
        source, past, kind = self._judged(*self._completed_in_window())
        return source.add_columns(sa.func.count().filter(past > 0).label("over_limit")).group_by(kind.element)

    def caught(self) -> sa.Select:
        """Per kind, the runs failed as stuck since `:sr_since`, and how long past their limit they
        had run when the checker failed them (seconds: median, most)."""
        t = self.t
        source, past, kind = self._judged(
            t.c.failure_pattern == STUCK_PATTERN,
            self.runs.in_state(t.c.status, "failed"),
            t.c.completed_at >= sa.bindparam("sr_since", type_=sa.DateTime(timezone=True)),
            t.c.started_at.is_not(None),
        )
        median = sa.func.percentile_cont(0.5).within_group(past)
        return source.add_columns(
            sa.func.count().label("caught"), median.label("past_median"), sa.func.max(past).label("past_most")
        ).group_by(kind.element)

    def running(self) -> sa.Select:
        """Per kind, the runs running now and when the oldest of them started."""
        t = self.t
        kind = self._kind()
        return (
            sa.select(kind, sa.func.count().label("running"), sa.func.min(t.c.started_at).label("oldest"))
            .where(self.runs.in_state(t.c.status, "running"))
            .group_by(kind.element)
        )

    # -- the stored learned limits ------------------------------------------------------------

    def read(self) -> sa.Select:
        s = self.stored
        return sa.select(*(c for c in s.c if c.key not in ("id", "runs_table"))).where(
            s.c.runs_table == self.runs.canonical_name
        )

    def take_lock(self) -> sa.Select:
        """Waits for the transaction-level lock of this table's learning: one computation at a time."""
        return sa.select(sa.func.pg_advisory_xact_lock(self.lock_ns, 0))

    def forget(self) -> sa.Delete:
        return sa.delete(self.stored).where(self.stored.c.runs_table == self.runs.canonical_name)

    def store(self) -> sa.Insert:
        """Inserts rows given as a list of dicts (the keys of `read`, and `runs_table`)."""
        return sa.insert(self.stored)

    # -- what doctor checks ---------------------------------------------------------------------

    def kinds_absent(self) -> sa.Select:
        """Of `:sr_kinds`, those no run completed since `:sr_since` (the learning window) nor any
        running run has: a kind there is found at its first run; one absent reads the window's range
        of the learning index."""
        t, runs = self.t, self.runs
        wanted = sa.func.unnest(array_param("sr_kinds", sa.Text)).table_valued("kind").render_derived(name="w")
        since = t.c.completed_at >= sa.bindparam("sr_since", type_=sa.DateTime(timezone=True))

        def seen(state: str, *where: sa.ColumnElement) -> sa.Exists:
            return sa.exists().where(runs.kind_text() == wanted.c.kind, runs.in_state(t.c.status, state), *where)

        return sa.select(wanted.c.kind).where(~seen("completed", since), ~seen("running"))

    def max_runtime_outliers(self) -> sa.Select:
        """Of up to `:sr_limit` rows with a `max_runtime`: how many, how many negative, how many
        over `:sr_absurd` seconds."""
        seconds = self.runs.max_runtime_seconds()
        sample = sa.select(seconds.label("seconds")).where(seconds.is_not(None)).limit(sa.bindparam("sr_limit"))
        s = sample.subquery("s")
        return sa.select(
            sa.func.count().label("sampled"),
            sa.func.count().filter(s.c.seconds < 0).label("negative"),
            sa.func.count().filter(s.c.seconds > sa.bindparam("sr_absurd", type_=sa.Float)).label("absurd"),
        )

    def progress_not_numbers(self) -> sa.Select:
        """Of up to `:sr_limit` rows with a `progress`: how many, and how many do not read as a number."""
        column = self.t.c[self.runs.progress_counter]
        text = sa.cast(column, sa.Text)
        sample = sa.select(text.label("value")).where(column.is_not(None)).limit(sa.bindparam("sr_limit"))
        s = sample.subquery("s")
        number = r"^\s*[-+]?[0-9]+(\.[0-9]+)?\s*$"
        return sa.select(
            sa.func.count().label("sampled"),
            sa.func.count().filter(~s.c.value.regexp_match(number)).label("not_numbers"),
        )
