"""Retry columns, status values, sweep indexes, dead letters and the daemons' records.

Every statement is idempotent, so the revision applies cleanly whether the table has none, some
or all of the columns (some teams added them by hand first); a column that exists is left as
it is. Indexes are built CONCURRENTLY outside the transaction so a live table is not locked.

Revision ID: 0001
Revises:
"""

from sqlalchemy.engine import Dialect

from db.migration_plan import Step, TablePlan, index_names, quote_table
from db.shape import ADDED_ROLES

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def retry_columns(plan: TablePlan) -> tuple[tuple[str, str], ...]:
    return (
        ("retry_count", "INTEGER NOT NULL DEFAULT 0"),
        ("max_retries", "INTEGER NOT NULL DEFAULT 4"),
        ("next_retry_at", "TIMESTAMPTZ NULL"),
        ("original_run_id", f"{plan.id_type} NULL"),  # the id's own type: UUID, bigint, text...
        ("is_retry", "BOOLEAN NOT NULL DEFAULT false"),
    )


def steps(plan: TablePlan, dialect: Dialect) -> list[Step]:
    qualified = plan.qualified
    table = quote_table(dialect, qualified)
    quote = dialect.identifier_preparer.quote
    schema = qualified.rpartition(".")[0]
    names = index_names(qualified)
    prefix = f"{quote(schema)}." if schema else ""
    dead_letters = f"{prefix}{quote(plan.dead_letters)}"
    dead_index = f"ix_{plan.dead_letters}_created_at"[:63]
    literal = table.replace("'", "''")
    status = plan.layout.column("status").replace("'", "''")
    added = [(plan.layout.column(role), ADDED_ROLES[role]) for role in plan.missing_roles]
    enum_values = "".join(
        f"\n        EXECUTE 'ALTER TYPE ' || status_type || ' ADD VALUE IF NOT EXISTS {_in_execute(value)}';"
        for value in plan.enum_values
    )
    return [
        *(
            Step(f"column {name}", f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {quote(name)} {definition}")
            for name, definition in (*added, *retry_columns(plan))
        ),
        Step(
            f"table {plan.dead_letters}",
            f"""CREATE TABLE IF NOT EXISTS {dead_letters} (
    id BIGSERIAL PRIMARY KEY,
    run_id {plan.id_type} NOT NULL UNIQUE,
    chain_id {plan.id_type} NOT NULL,
    attempts INTEGER NOT NULL,
    budget INTEGER NOT NULL,
    pattern TEXT NOT NULL,
    last_error TEXT,
    detail TEXT,
    inputs JSONB NOT NULL DEFAULT '{{}}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    requeued_at TIMESTAMPTZ,
    requeued_run_id {plan.id_type}
)""",
        ),
        Step(
            f"index {dead_index}",
            f"CREATE INDEX IF NOT EXISTS {quote(dead_index)} ON {dead_letters} (created_at)",
        ),
        # What the daemons did and do, readable from any host (`stuck-runs status`).
        Step(
            "table stuck_runs_daemons",
            f"""CREATE TABLE IF NOT EXISTS {prefix}stuck_runs_daemons (
    id BIGSERIAL PRIMARY KEY,
    runs_table TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    stopped_at TIMESTAMPTZ,
    jobs JSONB NOT NULL DEFAULT '{{}}'
)""",
        ),
        Step(
            "table stuck_runs_job_runs",
            f"""CREATE TABLE IF NOT EXISTS {prefix}stuck_runs_job_runs (
    id BIGSERIAL PRIMARY KEY,
    daemon_id BIGINT,
    runs_table TEXT NOT NULL,
    job_id TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    outcome TEXT NOT NULL,
    counts JSONB NOT NULL DEFAULT '{{}}',
    error TEXT,
    next_run_time TIMESTAMPTZ
)""",
        ),
        Step(
            "index ix_stuck_runs_job_runs_job",
            f"CREATE INDEX IF NOT EXISTS ix_stuck_runs_job_runs_job ON {prefix}stuck_runs_job_runs"
            " (runs_table, job_id, started_at DESC)",
        ),
        # A status enum needs the values stuck-runs writes; committed before any index
        # predicate names them.
        Step(
            plan.enum_step,
            f"""DO $$
DECLARE status_type regtype;
BEGIN
    SELECT a.atttypid::regtype INTO status_type FROM pg_attribute a
    WHERE a.attrelid = '{literal}'::regclass AND a.attname = '{status}';
    IF (SELECT typtype FROM pg_type WHERE oid = status_type) = 'e' THEN{enum_values}
    END IF;
END $$""",
            concurrent=True,
        ),
        Step(
            f"index {names['running']}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {names['running']} ON {table} ({plan.column('started_at')})"
            f" WHERE {plan.in_state('running')}",
            concurrent=True,
        ),
        Step(
            f"index {names['pending']}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {names['pending']} ON {table} (next_retry_at)"
            f" WHERE {plan.in_state('pending_retry')}",
            concurrent=True,
        ),
        Step(
            f"index {names['chain']}",
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {names['chain']} ON {table} (original_run_id)"
            " WHERE original_run_id IS NOT NULL",
            concurrent=True,
        ),
        Step(
            f"index {names['unique_retry']}",
            f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {names['unique_retry']}"
            f" ON {table} (original_run_id, retry_count) WHERE is_retry",
            concurrent=True,
        ),
    ]


def _in_execute(value: str) -> str:
    """A status value as a literal inside the quoted EXECUTE text of the DO block."""
    return "''" + value.replace("'", "''''") + "''"
