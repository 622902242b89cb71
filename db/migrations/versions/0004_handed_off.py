"""Retries handed to the fleet (SPEC §12): how each left (`handed_off`: webhook or queue), an
index over them for the concurrency cap and the sweep of hand-offs nobody started, and one over
the failures the fleet wrote that stuck-runs has yet to continue.

Revision ID: 0004
Revises: 0003
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, index_names, quote_table

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    table = quote_table(dialect, plan.qualified)
    handed, fleet_failed = (index_names(plan.qualified)[k] for k in ("handed_off", "fleet_failed"))
    return [
        Step("column handed_off", f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS handed_off TEXT NULL"),
        # The cap counts the handed-off retries still queued or running, and the sweep looks for
        # queued ones nobody started: both read a few rows by (status, started_at), never the table.
        Step(
            f"index {handed}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {handed} ON {table}"
            f" ({plan.column('status')}, {plan.column('started_at')}) WHERE handed_off IS NOT NULL",
            concurrent=True,
        ),
        # The failures the fleet wrote that stuck-runs has yet to continue, read every poll: a
        # handful of rows, whatever the history of handed-off retries (those it continued leave it).
        Step(
            f"index {fleet_failed}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {fleet_failed} ON {table} ({plan.column('started_at')})"
            f" WHERE handed_off IS NOT NULL AND failure_pattern IS NULL AND {plan.in_state('failed')}",
            concurrent=True,
        ),
    ]
