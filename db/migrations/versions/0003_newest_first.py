"""An index for the runs page of `stuck-runs serve`: every run, newest first, a page at a time.

Revision ID: 0003
Revises: 0002
"""

from alembic import context, op
from sqlalchemy.engine import Dialect

from db.migrate import Step, TablePlan, apply_steps, index_names, quote_table

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    table = quote_table(dialect, plan.qualified)
    newest = index_names(plan.qualified)["newest"]
    started, run_id = plan.column("started_at"), plan.column("id")
    return [
        # Keyset pages (started_at, id) of ten million runs read a page's rows, never sort the table.
        Step(
            f"index {newest}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {newest} ON {table} ({started} DESC NULLS FIRST, {run_id} DESC)",
            concurrent=True,
        ),
    ]


def upgrade() -> None:
    attributes = context.config.attributes
    apply_steps(op, steps(attributes["plan"], op.get_context().dialect), attributes.get("stop"))


def downgrade() -> None:
    raise NotImplementedError("0003 is not reversible: drop its index by hand if you must")
