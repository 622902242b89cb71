"""Learned limits (SPEC §14): `stuck_runs_thresholds`, each kind's runtimes over its completed runs
in the learning window and the limit learned from them, computed at most hourly by whichever
process needs them first; and, where COLUMN_MAP maps `kind`, the index that computation reads.

The index: `(kind, completed_at) INCLUDE (started_at)` over completed runs only, so learning from
ten million runs is one index-only scan of the window, never a read of the table's rows (bench:
`python -m bench.learning`). Without a `kind` role there is nothing to learn, and no index.

Revision ID: 0007
Revises: 0005
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, quote_table
from db.reflect import split_name

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def learning_index(qualified: str) -> str:
    """The learning index's name: lower case, needing no quotes (`ScrapingJob`)."""
    return f"ix_{split_name(qualified)[1].lower()}_completed_by_kind"[:63]


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    table = quote_table(dialect, plan.qualified)
    schema = plan.qualified.rpartition(".")[0]
    prefix = f"{dialect.identifier_preparer.quote(schema)}." if schema else ""
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
    learned_with TEXT NOT NULL,
    computed_at TIMESTAMPTZ NOT NULL,
    UNIQUE (runs_table, kind)
)""",
        ),
    ]
    if "kind" in plan.layout.columns:
        name = learning_index(plan.qualified)
        steps.append(
            Step(
                f"index {name}",
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table}"
                f" ({plan.column('kind')}, {plan.column('completed_at')}) INCLUDE ({plan.column('started_at')})"
                f" WHERE {plan.in_state('completed')}",
                concurrent=True,
            )
        )
    return steps
