"""Cancel requests of running retries (SPEC §16): stuck-runs' own table `stuck_runs_cancels`, one
row per runs table and run whose cancel an operator asked for and that is not yet carried out. The
process executing the retry (on any host) reads it within DISPATCH_POLL; an engine's run is
cancelled by whichever dispatcher pass claims the row (`signalled_at`), and forcefully once
CANCEL_TIMEOUT has passed since. The run's id is kept as text: it fits every adopted id type.

Revision ID: 0009
Revises: 0008
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, own_table_prefix

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    prefix = own_table_prefix(dialect, plan.qualified)
    return [
        Step(
            "table stuck_runs_cancels",
            f"""CREATE TABLE IF NOT EXISTS {prefix}stuck_runs_cancels (
    runs_table TEXT NOT NULL,
    run_id TEXT NOT NULL,
    requested_at TIMESTAMPTZ NOT NULL,
    requested_by TEXT NOT NULL,
    signalled_at TIMESTAMPTZ,
    PRIMARY KEY (runs_table, run_id)
)""",
        ),
    ]
