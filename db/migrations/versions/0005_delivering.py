"""The hand-over of SPEC §12 (amended): a retry being delivered to the fleet is committed
`running` first, marked with who delivers it (`delivering_by`) and until when that delivery may
last (`delivering_until`, its lease); and the number of times the fleet could not take a retry
(`postponements`), which its backoff doubles on.

Revision ID: 0005
Revises: 0004
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, quote_table

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    table = quote_table(dialect, plan.qualified)
    return [
        Step(
            "column delivering_until",
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS delivering_until TIMESTAMPTZ NULL",
        ),
        Step("column delivering_by", f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS delivering_by TEXT NULL"),
        # A constant default: PostgreSQL 11+ adds it without rewriting the table.
        Step(
            "column postponements",
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS postponements INTEGER NOT NULL DEFAULT 0",
        ),
    ]
