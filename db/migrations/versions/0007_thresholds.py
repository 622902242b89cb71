"""Learned limits (SPEC §14): `stuck_runs_thresholds`, each kind's runtimes over its completed runs
in the learning window and the limit learned from them, computed at most hourly by whichever
process needs them first; `stuck_runs_runtimes`, the counts they are computed from (how many runs
of a kind ran each whole number of seconds); and, where COLUMN_MAP maps `kind`, the index the
counting reads.

The index: `(completed_at) INCLUDE (kind, started_at)` over completed runs only. Each hour the
counts move on by the runs completed since and the runs that left the window, two small ranges
of it, read from the index alone (bench: `python -m bench.learning`); the first count of a window
is one index-only scan of it. Without a `kind` role there is nothing to learn, and no index.

Revision ID: 0007
Revises: 0006
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, own_table_prefix, quote_table
from db.reflect import split_name

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def learning_index(qualified: str) -> str:
    """The learning index's name: lower case, needing no quotes (`ScrapingJob`)."""
    return f"ix_{split_name(qualified)[1].lower()}_completed_by_kind"[:63]


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    table = quote_table(dialect, plan.qualified)
    prefix = own_table_prefix(dialect, plan.qualified)
    steps = [
        # One row per (runs table, kind) and one for runs of no kind (kind NULL), replaced together
        # by each computation; `learned_with` is the settings that shaped them (window, margin...).
        Step(
            "table stuck_runs_thresholds",
            f"""CREATE TABLE IF NOT EXISTS {prefix}stuck_runs_thresholds (
    id BIGSERIAL PRIMARY KEY,
    runs_table TEXT NOT NULL,
    kind TEXT,
    runs INTEGER NOT NULL,
    p50 INTERVAL,
    p95 INTERVAL,
    p99 INTERVAL,
    longest INTERVAL,
    "limit" INTERVAL,
    learn_window INTERVAL NOT NULL,
    counted_from TIMESTAMPTZ NOT NULL,
    counted_until TIMESTAMPTZ NOT NULL,
    learned_with TEXT NOT NULL,
    computed_at TIMESTAMPTZ NOT NULL,
    UNIQUE (runs_table, kind)
)""",
        ),
        Step(
            "table stuck_runs_runtimes",
            f"""CREATE TABLE IF NOT EXISTS {prefix}stuck_runs_runtimes (
    runs_table TEXT NOT NULL,
    kind TEXT,
    seconds INTEGER NOT NULL,
    runs BIGINT NOT NULL
)""",
        ),
        Step(
            "index ix_stuck_runs_runtimes_table",
            f"CREATE INDEX IF NOT EXISTS ix_stuck_runs_runtimes_table ON {prefix}stuck_runs_runtimes (runs_table)",
        ),
    ]
    if "kind" in plan.layout.columns:
        name = learning_index(plan.qualified)
        steps.append(
            Step(
                f"index {name}",
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table}"
                f" ({plan.column('completed_at')}) INCLUDE ({plan.column('kind')}, {plan.column('started_at')})"
                f" WHERE {plan.in_state('completed')}",
                concurrent=True,
            )
        )
    return steps
