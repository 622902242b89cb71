"""The notifications' own table (SPEC §15): per runs table and event kind, when its last message
went out and what waits for the next, so replicas send one message, not one each.

Revision ID: 0008
Revises: 0007
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, own_table_prefix

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    prefix = own_table_prefix(dialect, plan.qualified)
    return [
        Step(
            "table stuck_runs_alerts",
            f"""CREATE TABLE IF NOT EXISTS {prefix}stuck_runs_alerts (
    runs_table TEXT NOT NULL,
    kind TEXT NOT NULL,
    last_sent_at TIMESTAMPTZ,
    pending JSONB,
    pending_since TIMESTAMPTZ,
    PRIMARY KEY (runs_table, kind)
)""",
        ),
    ]
