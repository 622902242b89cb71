"""An index for the runs page of `stuck-runs serve` (every run, newest first, a page at a time),
and the table that holds a pause of retries (`stuck-runs pause`).

Revision ID: 0003
Revises: 0002
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, index_names, own_table_prefix, quote_table

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    table = quote_table(dialect, plan.qualified)
    newest = index_names(plan.qualified)["newest"]
    prefix = own_table_prefix(dialect, plan.qualified)
    started, run_id = plan.column("started_at"), plan.column("id")
    return [
        # Keyset pages (started_at, id) of ten million runs read a page's rows, never sort the table.
        Step(
            f"index {newest}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {newest} ON {table} ({started} DESC NULLS FIRST, {run_id} DESC)",
            concurrent=True,
        ),
        Step(
            "table stuck_runs_pauses",
            f"""CREATE TABLE IF NOT EXISTS {prefix}stuck_runs_pauses (
    runs_table TEXT PRIMARY KEY,
    paused_at TIMESTAMPTZ NOT NULL,
    until TIMESTAMPTZ,
    paused_by TEXT NOT NULL
)""",
        ),
    ]
