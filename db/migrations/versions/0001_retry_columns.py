"""Retry columns, status values, sweep indexes, dead letters and the daemons' records.

Every statement is idempotent, so the revision applies cleanly whether the table has none, some
or all of the columns (some teams added them by hand first); a column that exists is left as
it is. Indexes are built CONCURRENTLY outside the transaction so a live table is not locked.

Revision ID: 0001
Revises:
"""

from alembic import context, op

from db.migrate import index_names, quote_table

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    qualified = context.config.attributes["table"]
    dialect = op.get_context().dialect
    table = quote_table(dialect, qualified)
    schema = qualified.rpartition(".")[0]
    names = index_names(qualified)
    prefix = f"{dialect.identifier_preparer.quote(schema)}." if schema else ""
    dead_letters = f"{prefix}scrape_run_dead_letters"

    # Fail fast instead of queueing behind a long transaction and blocking the scraper's writes.
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute(
        f"ALTER TABLE {table}"
        " ADD COLUMN IF NOT EXISTS retry_count INTEGER NOT NULL DEFAULT 0,"
        " ADD COLUMN IF NOT EXISTS max_retries INTEGER NOT NULL DEFAULT 4,"
        " ADD COLUMN IF NOT EXISTS next_retry_at TIMESTAMPTZ NULL,"
        " ADD COLUMN IF NOT EXISTS original_run_id UUID NULL,"
        " ADD COLUMN IF NOT EXISTS is_retry BOOLEAN NOT NULL DEFAULT false"
    )
    op.execute(
        f"""CREATE TABLE IF NOT EXISTS {dead_letters} (
            id BIGSERIAL PRIMARY KEY,
            run_id UUID NOT NULL UNIQUE,
            chain_id UUID NOT NULL,
            attempts INTEGER NOT NULL,
            budget INTEGER NOT NULL,
            pattern TEXT NOT NULL,
            last_error TEXT,
            detail TEXT,
            inputs JSONB NOT NULL DEFAULT '{{}}',
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            requeued_at TIMESTAMPTZ,
            requeued_run_id UUID
        )"""
    )
    op.execute(f"CREATE INDEX IF NOT EXISTS ix_scrape_run_dead_letters_created_at ON {dead_letters} (created_at)")
    # What the daemons did and do, readable from any host (`stuck-runs status`).
    op.execute(
        f"""CREATE TABLE IF NOT EXISTS {prefix}stuck_runs_daemons (
            id BIGSERIAL PRIMARY KEY,
            runs_table TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at TIMESTAMPTZ NOT NULL,
            heartbeat_at TIMESTAMPTZ NOT NULL,
            stopped_at TIMESTAMPTZ,
            jobs JSONB NOT NULL DEFAULT '{{}}'
        )"""
    )
    op.execute(
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
        )"""
    )
    op.execute(
        f"CREATE INDEX IF NOT EXISTS ix_stuck_runs_job_runs_job ON {prefix}stuck_runs_job_runs"
        " (runs_table, job_id, started_at DESC)"
    )

    with op.get_context().autocommit_block():
        # A status enum needs the two values stuck-runs writes; committed before any index
        # predicate names them.
        literal = qualified.replace("'", "''")
        op.execute(
            f"""DO $$
            DECLARE status_type regtype;
            BEGIN
                SELECT a.atttypid::regtype INTO status_type FROM pg_attribute a
                WHERE a.attrelid = '{literal}'::regclass AND a.attname = 'status';
                IF (SELECT typtype FROM pg_type WHERE oid = status_type) = 'e' THEN
                    EXECUTE 'ALTER TYPE ' || status_type || ' ADD VALUE IF NOT EXISTS ''pending_retry''';
                    EXECUTE 'ALTER TYPE ' || status_type || ' ADD VALUE IF NOT EXISTS ''cancelled''';
                END IF;
            END $$"""
        )
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {names['running']} ON {table} (started_at)"
            " WHERE status = 'running'"
        )
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {names['pending']} ON {table} (next_retry_at)"
            " WHERE status = 'pending_retry'"
        )
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {names['chain']} ON {table} (original_run_id)"
            " WHERE original_run_id IS NOT NULL"
        )
        op.execute(
            f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {names['unique_retry']}"
            f" ON {table} (original_run_id, retry_count) WHERE is_retry"
        )


def downgrade() -> None:
    # The columns may predate stuck-runs (added by hand) and hold the chains' history: dropping
    # them is a decision for a DBA, not for a migration tool.
    raise NotImplementedError("0001 is not reversible: drop the retry columns and indexes by hand if you must")
