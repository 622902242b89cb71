"""The failure pattern of each failed attempt, and an index for the retry statistics.

Revision ID: 0002
Revises: 0001
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, index_names, quote_table

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    table = quote_table(dialect, plan.qualified)
    stats = index_names(plan.qualified)["stats"]
    return [
        Step("column failure_pattern", f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS failure_pattern TEXT NULL"),
        # `stuck-runs stats` reads the attempts stuck-runs touched, by when they ended.
        Step(
            f"index {stats}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {stats} ON {table} ({plan.column('completed_at')})"
            " WHERE is_retry OR failure_pattern IS NOT NULL",
            concurrent=True,
        ),
    ]
