"""The failure pattern of each failed attempt, and an index for the retry statistics.

Revision ID: 0002
Revises: 0001
"""

from alembic import context, op

from db.migrate import index_names, quote_table

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    qualified = context.config.attributes["table"]
    table = quote_table(op.get_context().dialect, qualified)
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS failure_pattern TEXT NULL")
    with op.get_context().autocommit_block():
        # `stuck-runs stats` reads the attempts stuck-runs touched, by when they ended.
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {index_names(qualified)['stats']} ON {table} (completed_at)"
            " WHERE is_retry OR failure_pattern IS NOT NULL"
        )


def downgrade() -> None:
    raise NotImplementedError("0002 is not reversible: drop failure_pattern and its index by hand if you must")
