"""Learned limits' history (SPEC §14): each kind's runtimes over its completed runs in the
learning window, stored in `stuck_runs_thresholds` so every process, page and command uses the
same numbers, and recomputed at most once an hour by whichever process needs them first.

Stored rows are fresh while younger than an hour and computed with the settings now in force
(window, minimum runs, margin, floor: `learned_with`); otherwise the process that needs them takes
the table's learning lock (transaction-level), looks again — another process may have just
computed them — and computes them only if they are still stale. A process never computes while
another does: it waits for the lock and reads the other's rows.

Runtimes are counted by whole seconds per kind (`stuck_runs_runtimes`), and the counts move on:
each learning adds the runs completed since the last and takes away those that left the window,
two small ranges of the learning index, instead of reading the whole window again (a month of ten
million runs). They are counted from scratch only the first time, or when the window grew. A run
whose completion is written after its `completed_at` passed a learning (a scraper that commits its
outcome long after stamping it) is not counted until the window is counted from scratch.

This module knows the numbers, not the rule that turns a p99 into a limit: the caller gives it
(jobs.limits.learned_limit), so the limit stored is the limit every process uses.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import cached_property
from itertools import accumulate
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection
from sqlalchemy.exc import ProgrammingError

from db.engine import database_errors
from db.errors import NotMigrated
from db.queries.thresholds import ThresholdStatements

if TYPE_CHECKING:
    from jobs.runtime import Runtime

FRESH_FOR = timedelta(hours=1)  # learned limits are computed at most this often
QUANTILES = (0.5, 0.95, 0.99)
FIRST_COUNT_TIMEOUT = timedelta(minutes=5)  # the lock wait and a first count from scratch, at most


@dataclass(frozen=True)
class LearnSettings:
    """What shapes learned limits: the window of completed runs, the fewest runs a kind needs, the
    margin over the p99 runtime and the floor."""

    window: timedelta
    min_runs: int
    margin: float
    floor: timedelta

    @classmethod
    def of(cls, settings: object) -> LearnSettings:
        return cls(settings.learn_window, settings.learn_min_runs, settings.learn_margin, settings.learn_floor)

    @property
    def fingerprint(self) -> str:
        """`window=30d min_runs=30 margin=2 floor=10m`: stored with the rows; other settings, stale rows."""
        return f"window={span(self.window)} min_runs={self.min_runs} margin={self.margin:g} floor={span(self.floor)}"


@dataclass(frozen=True)
class KindHistory:
    """One kind's completed runs in the window (kind None: runs of no kind)."""

    kind: str | None
    runs: int
    p50: timedelta | None = None
    p95: timedelta | None = None
    p99: timedelta | None = None
    longest: timedelta | None = None
    limit: timedelta | None = None  # learned: None when the kind has too few runs, or is no kind


@dataclass(frozen=True)
class Learned:
    """The history of every kind as learned at `computed_at` (None: computed now, not stored)."""

    kinds: tuple[KindHistory, ...]
    computed_at: datetime | None
    window: timedelta
    learned_with: str
    counted: tuple[datetime, datetime] | None = None  # the runs counted: completed in [from, until)
    computed: bool = False  # this call computed them (it held the learning lock)

    def fresh(self, now: datetime, learn: LearnSettings) -> bool:
        return (
            self.computed_at is not None
            and now - self.computed_at < FRESH_FOR
            and self.learned_with == learn.fingerprint
        )

    @cached_property
    def by_kind(self) -> dict[str | None, KindHistory]:
        return {k.kind: k for k in self.kinds}


Rule = Callable[[timedelta], timedelta]  # a p99 runtime -> the limit learned from it


def _seconds(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=float(value))


def learn_limit(kind: KindHistory, learn: LearnSettings, rule: Rule) -> KindHistory:
    """The kind with its learned limit: `rule` of its p99 when it is a kind and has at least
    `learn.min_runs` runs in the window, else none."""
    learned = kind.kind is not None and kind.p99 is not None and kind.runs >= learn.min_runs
    return replace(kind, limit=rule(kind.p99) if learned else None)


def percentiles(counts: Sequence[tuple[int, int]]) -> tuple[int, tuple[float, ...], int | None]:
    """From `(seconds, runs)` pairs sorted by seconds: how many runs, their p50, p95 and p99
    interpolated between the two nearest ranks (as PostgreSQL's percentile_cont), and the longest."""
    cumulative = list(accumulate(runs for _, runs in counts))
    total = cumulative[-1] if cumulative else 0
    if not total:
        return 0, (), None

    def at(rank: int) -> int:  # the runtime of the rank-th run (from 0) in order
        return counts[bisect_right(cumulative, rank)][0]

    values = []
    for fraction in QUANTILES:
        position = (total - 1) * fraction
        low = int(position)
        high = min(low + 1, total - 1)
        values.append(at(low) + (at(high) - at(low)) * (position - low))
    return total, tuple(values), counts[-1][0]


def _kinds(rows: Iterable[tuple[str | None, int, int]], learn: LearnSettings, rule: Rule) -> tuple[KindHistory, ...]:
    """Each kind's history from the counts, with its learned limit; always a row for runs of no kind."""
    by_kind: dict[str | None, list[tuple[int, int]]] = {None: []}
    for kind, seconds, runs in rows:
        by_kind.setdefault(kind, []).append((seconds, runs))
    kinds = []
    for kind, counts in by_kind.items():
        total, (p50, p95, p99), longest = _summary(sorted(counts))
        kinds.append(learn_limit(KindHistory(kind, total, p50, p95, p99, longest), learn, rule))
    return tuple(sorted(kinds, key=lambda k: (k.kind is None, k.kind or "")))


def _summary(counts: list[tuple[int, int]]) -> tuple[int, tuple, timedelta | None]:
    total, values, longest = percentiles(counts)
    shown = tuple(_seconds(v) for v in values) or (None, None, None)
    return total, shown, _seconds(longest)


def counting_plan(found: Learned | None, now: datetime, window: timedelta) -> dict[str, object]:
    """The parameters that move the stored counts on to the window ending `now`: add the runs
    completed since they were counted, take away those that left the window. Counted from scratch
    when there are none, or they cannot be moved on (a longer window, counts older than the window)."""
    since = now - window
    counted = found.counted if found is not None else None
    if counted is not None and counted[0] <= since <= counted[1] <= now:
        return {
            "sr_keep": True,
            "sr_add_from": counted[1],
            "sr_add_until": now,
            "sr_drop_from": counted[0],
            "sr_drop_until": since,
        }
    return {"sr_keep": False, "sr_add_from": since, "sr_add_until": now, "sr_drop_from": now, "sr_drop_until": now}


def compute(
    conn: Connection,
    q: ThresholdStatements,
    now: datetime,
    learn: LearnSettings,
    rule: Rule,
    found: Learned | None = None,
    *,
    write: bool = False,
) -> Learned:
    """Every kind's history in the window ending `now`, from the counts `found` moved on (or counted
    from scratch), with the limits learned by `rule` for kinds with at least `learn.min_runs` runs.
    With `write`, the moved counts replace the stored ones (the caller holds the learning lock)."""
    plan = counting_plan(found, now, learn.window)
    if not plan["sr_keep"] and q.runs.kind is not None and conn.execute(q.all_inside_window(), plan).scalar():
        # Counted pair by pair in the index (first_count), nearly no expression runs per run: a
        # server's JIT would only add its compilation (~0.2 s at ten million runs, BENCHMARKS.md).
        # A hint only: first_count decides again, in its own snapshot, whether to check the window.
        conn.exec_driver_sql("SET LOCAL jit = off")
    # Moved on: the stored counts and two small ranges. From scratch: the whole window, in the
    # order of the index that groups it (revision 0010).
    rows = conn.execute(q.runtimes() if plan["sr_keep"] else q.first_count(), plan).all()
    if write:  # the moved counts in place of the stored ones
        conn.execute(q.forget_counts())
        if rows:
            table = q.runs.canonical_name
            conn.execute(q.store_counts(), [{"runs_table": table, **row._mapping} for row in rows])
    return Learned(_kinds(rows, learn, rule), None, learn.window, learn.fingerprint, (now - learn.window, now))


def stored(conn: Connection, q: ThresholdStatements) -> Learned | None:
    """The stored learned limits of this table, or None when none were computed yet."""
    try:
        rows = conn.execute(q.read()).mappings().all()
    except ProgrammingError as exc:
        if getattr(exc.orig, "pgcode", None) == "42P01":  # undefined_table: revision 0007 is not applied
            raise NotMigrated(f"{q.stored.name} does not exist: run `stuck-runs migrate`") from None
        raise
    if not rows:
        return None
    kinds = tuple(
        sorted(
            (KindHistory(r["kind"], r["runs"], r["p50"], r["p95"], r["p99"], r["longest"], r["limit"]) for r in rows),
            key=lambda k: (k.kind is None, k.kind or ""),
        )
    )
    first = rows[0]
    counted = (first["counted_from"], first["counted_until"])
    return Learned(kinds, first["computed_at"], first["learn_window"], first["learned_with"], counted)


def learned(rt: Runtime, learn: LearnSettings, rule: Rule) -> Learned:
    """The stored learned limits, recomputed first when stale (older than an hour, or learned with
    other settings) by this process, unless another computes them at that moment: then, once it
    has, its rows. Two processes never compute at once."""
    q = ThresholdStatements(rt.runs)
    now = rt.clock.now()
    with database_errors(rt.engine, "reading learned limits"):
        with rt.engine.connect() as conn:
            found = stored(conn, q)
        if found is not None and found.fresh(now, learn):
            return found
        with rt.engine.begin() as conn:
            # The first count of a month of ten million runs takes seconds, once: not cut short by
            # `serve`'s statement timeout for pages, whichever process needs the limits first.
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(FIRST_COUNT_TIMEOUT.total_seconds() * 1000)}")
            conn.execute(q.take_lock())  # released at commit
            found = stored(conn, q)  # read committed: what a process that held the lock just wrote
            if found is not None and found.fresh(now, learn):
                return found
            computed = compute(conn, q, now, learn, rule, found, write=True)
            conn.execute(q.forget())
            since, until = computed.counted
            conn.execute(
                q.store(),
                [
                    {
                        "runs_table": rt.runs.canonical_name,
                        "kind": k.kind,
                        "runs": k.runs,
                        "p50": k.p50,
                        "p95": k.p95,
                        "p99": k.p99,
                        "longest": k.longest,
                        "limit": k.limit,
                        "learn_window": learn.window,
                        "counted_from": since,
                        "counted_until": until,
                        "learned_with": learn.fingerprint,
                        "computed_at": now,
                    }
                    for k in computed.kinds
                ],
            )
    return replace(computed, computed_at=now, computed=True)


def history_read_only(rt: Runtime, learn: LearnSettings, rule: Rule) -> Learned:
    """The history for `learn` without writing anything: the stored rows when fresh and learned
    over the same window (their limits re-derived by `rule`), else the stored counts moved on now."""
    q = ThresholdStatements(rt.runs)
    now = rt.clock.now()
    with database_errors(rt.engine, "reading learned limits"), rt.engine.connect() as conn:
        found = stored(conn, q)
        if found is not None and found.computed_at is not None and now - found.computed_at < FRESH_FOR:
            if found.window == learn.window:
                kinds = tuple(learn_limit(k, learn, rule) for k in found.kinds)
                return Learned(kinds, found.computed_at, learn.window, learn.fingerprint, found.counted)
        return compute(conn, q, now, learn, rule, found)


def span(value: timedelta | None) -> str:
    """A runtime as an operator compares them: `45s`, `12m`, `6h05m`, `8h`, `3d04h`, `30d`; `-` for none."""
    if value is None:
        return "-"
    seconds = int(round(value.total_seconds()))
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    if seconds < 60:
        return f"{sign}{seconds}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{sign}{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{sign}{hours}h{minutes:02d}m" if minutes else f"{sign}{hours}h"
    days, hours = divmod(hours, 24)
    return f"{sign}{days}d{hours:02d}h" if hours else f"{sign}{days}d"
