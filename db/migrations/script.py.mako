"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, quote_table

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    """This revision's idempotent statements for the planned table (db.migrate applies and prints them)."""
    table = quote_table(dialect, plan.qualified)
    return []
