"""Statements on `scrape_run_dead_letters`: one row per chain that ended permanently failed."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert

from db.table import DEAD_LETTERS_TABLE


def dead_letters_table(schema: str | None) -> sa.Table:
    return sa.Table(
        DEAD_LETTERS_TABLE,
        sa.MetaData(),
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("run_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("chain_id", sa.Uuid, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("budget", sa.Integer, nullable=False),
        sa.Column("pattern", sa.Text, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("detail", sa.Text),
        sa.Column("inputs", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requeued_at", sa.DateTime(timezone=True)),
        sa.Column("requeued_run_id", sa.Uuid),
        schema=schema,
    )


def insert_from_failed(dead: sa.Table, failed: sa.CTE, inputs: sa.ColumnElement, now: sa.ColumnElement) -> sa.Insert:
    """Dead-letters every row of `failed` that ends its chain (no retry due).

    `attempts` counts every attempt of the chain, the original included.
    """
    rows = sa.select(
        failed.c.id,
        sa.func.coalesce(failed.c.original_run_id, failed.c.id),
        failed.c.retry_count + 1,
        failed.c.max_retries,
        failed.c._sr_pattern,
        failed.c.error_message,
        failed.c._sr_detail,
        inputs,
        now,
    ).where(failed.c.next_retry_at.is_(None))
    columns = ["run_id", "chain_id", "attempts", "budget", "pattern", "last_error", "detail", "inputs", "created_at"]
    return (
        insert(dead)
        .from_select(columns, rows)
        .on_conflict_do_nothing(index_elements=["run_id"])
        .returning(dead.c.run_id)
    )


def mark_requeued(dead: sa.Table) -> sa.Update:
    """Marks the dead letter of `:sr_failed_run_id` requeued by retry `:sr_retry_id` (if there is one)."""
    return (
        sa.update(dead)
        .values(requeued_at=sa.bindparam("sr_now"), requeued_run_id=sa.bindparam("sr_retry_id"))
        .where(dead.c.run_id == sa.bindparam("sr_failed_run_id"), dead.c.requeued_at.is_(None))
    )
