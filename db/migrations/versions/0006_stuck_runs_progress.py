"""Stalled progress (SPEC §14): each sweep keeps every running run's `progress` counter and
when it last changed, in a table of stuck-runs' own, so a run whose counter stood still for
`STALL_AFTER` is failed like a stuck run. One row per running run of a runs table; the sweep
removes the rows of runs that ended.

`run_id` and `progress` are text: every id type and every number the counter may be keep their
exact value, and a change is a change of text.

Revision ID: 0006
Revises: 0005
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, own_table_prefix

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PROGRESS_TABLE = "stuck_runs_progress"


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    prefix = own_table_prefix(dialect, plan.qualified)
    return [
        Step(
            f"table {PROGRESS_TABLE}",
            f"""CREATE TABLE IF NOT EXISTS {prefix}{PROGRESS_TABLE} (
    runs_table TEXT NOT NULL,
    run_id TEXT NOT NULL,
    progress TEXT,
    changed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (runs_table, run_id)
)""",
        ),
    ]
