"""Learned limits' first count (SPEC §14: ten million runs of history, all inside the window, under
a second): where COLUMN_MAP maps `kind`, an index of completed runs in the order the count groups
them, by kind and whole seconds run, with `completed_at` and `started_at` beside them.

The first count of a window (once per table, and when `LEARN_WINDOW` grows) counts every completed
run in it by kind and whole second. Over 0007's index, ordered by `completed_at`, PostgreSQL must
compute each run's seconds from its two timestamps and hash ten million (kind, seconds) pairs; over
this one it reads each run's seconds from the index, already grouped, and counts them as they come
(a GroupAggregate over an index-only scan: no hashing, no sort; and when every completed run is
inside the window, it skips from one (kind, seconds) pair to the next and counts each pair's runs by
an index condition, db/queries/thresholds.py). `completed_at` and `started_at`
are included so the window's bounds are checked from the index alone (PostgreSQL allows an
index-only scan of an expression index only when the expression's columns are in it). The hourly
counts still move on by two ranges of 0007's index; when a window holds a small part of a long
history, the planner reads that range there instead (bench/learning.py measures both).

The expression is db.queries.thresholds' `whole_seconds`, written here as SQL: the planner uses
the index only for the very same expression.

Revision ID: 0010
Revises: 0009
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, quote_table
from db.reflect import split_name

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def runtime_index(qualified: str) -> str:
    """The index's name: lower case, needing no quotes (`ScrapingJob`)."""
    return f"ix_{split_name(qualified)[1].lower()}_runtime_by_kind"[:63]


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    if "kind" not in plan.layout.columns:
        return []  # nothing to learn, and no index
    table = quote_table(dialect, plan.qualified)
    completed, started = plan.column("completed_at"), plan.column("started_at")
    seconds = f"(floor(date_part('epoch', {completed} - {started}))::integer)"
    name = runtime_index(plan.qualified)
    return [
        Step(
            f"index {name}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table}"
            f" ({plan.column('kind')}, {seconds}) INCLUDE ({completed}, {started})"
            f" WHERE {plan.in_state('completed')}",
            concurrent=True,
        )
    ]
