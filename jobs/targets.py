"""Where retries go, by target (SPEC §15): `stats --by target|kind|COLUMN`, `GET /api/stats?by=`,
the stats page's worst targets, and the retry-failure alert's target — all from `stats_by`.

A target is what a run scrapes: `TARGET` names a text column (`site`) or the host of a URL column
(`host(start_url)`). Groups are listed worst first: most chains permanently failed, then most
retries failed, then most stuck detections, then most runs (db/queries/groups.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from db.engine import database_errors
from db.errors import UsageError
from db.queries.groups import KIND, column_key, kind_key, stats_by_group, target_key
from jobs.runtime import Runtime
from jobs.stats import RetryOutcomes

TARGET = "target"
WORST_FIRST = "most permanently failed, then most retries failed, then most stuck, then most runs"


@dataclass(frozen=True)
class GroupStats(RetryOutcomes):
    group: str | None  # the target, kind or column value; None: rows without one
    runs: int  # runs started in the window (first attempts and retries)
    stuck: int  # stuck detections in the window
    retries: int  # retries that ended (completed or failed) in the window
    succeeded: int
    permanently_failed: int  # chains whose last attempt ended failed in the window, no retry coming
    top_pattern: str | None  # the commonest failure pattern of the window's failed attempts
    top_pattern_failures: int


@dataclass(frozen=True)
class GroupedStats:
    since: datetime
    by: str  # target, kind or a column's name, as asked
    key: str  # what the groups are: the column, host(column), or the kind's column
    order: str  # how "worst first" is ordered, in words
    groups: tuple[GroupStats, ...]


def grouping(rt: Runtime, by: str) -> tuple[sa.ColumnElement, str]:
    """The SQL value each row is grouped by, and what it is in words; refused (exit 2) when the
    table cannot answer: `target` without `TARGET`, `kind` without a kind column, no such column."""
    by = by.strip()
    runs = rt.runs
    if by == TARGET:
        target = rt.settings.target
        if not target:
            raise UsageError(
                "--by target needs TARGET: set TARGET=COLUMN or TARGET=host(URL_COLUMN), or use --by COLUMN"
            )
        return target_key(runs, target), target
    if by == KIND:
        return kind_key(runs), runs.name_of(runs.kind) if runs.kind else KIND
    if not by:
        raise UsageError("--by is empty: use --by target, --by kind or --by COLUMN")
    return column_key(runs, by), by


def stats_by(rt: Runtime, by: str, since: timedelta = timedelta(days=7), limit: int = 20) -> GroupedStats:
    """The window's numbers per group, worst first, the `limit` worst."""
    key, what = grouping(rt, by)
    start = rt.clock.now() - since
    statement = stats_by_group(rt.queries, key)
    with database_errors(rt.engine, "computing statistics by group"), rt.engine.connect() as conn:
        rows = conn.execute(statement, {"sr_since": start, "sr_limit": limit}).mappings().all()
    return GroupedStats(start, by, what, WORST_FIRST, tuple(GroupStats(**row) for row in rows))


def worst_retry_target(
    rt: Runtime,
    since: timedelta = timedelta(hours=1),
    min_retries: int = 10,
    failure_rate: float = 0.5,
    now: datetime | None = None,
) -> GroupStats | None:
    """The target whose retries fail most: at least `min_retries` retries ended in the window and
    more than `failure_rate` of them failed, the most failed retries first. None when `TARGET`
    is unset or no target is that bad. (The `retry_failure_rate` notification names it.)"""
    if not rt.settings.target:
        return None
    key = target_key(rt.runs, rt.settings.target)
    statement = stats_by_group(rt.queries, key, failing=True)
    params = {
        "sr_since": (now or rt.clock.now()) - since,
        "sr_limit": 1,
        "sr_min_retries": min_retries,
        "sr_rate": failure_rate,
    }
    with database_errors(rt.engine, "finding the target whose retries fail"), rt.engine.connect() as conn:
        row = conn.execute(statement, params).mappings().first()
    return GroupStats(**row) if row else None
