"""Statements on `scrape_run_dead_letters`: one row per chain that ended permanently failed."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert

from db.arrays import array_param
from db.reflect import DEAD_LETTERS_TABLE


def dead_letters_table(
    schema: str | None, name: str = DEAD_LETTERS_TABLE, id_type: sa.types.TypeEngine | None = None
) -> sa.Table:
    """The dead letters of a runs table whose ids are `id_type` (UUID by default)."""
    id_type = id_type if id_type is not None else sa.Uuid()
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("run_id", id_type, nullable=False, unique=True),
        sa.Column("chain_id", id_type, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("budget", sa.Integer, nullable=False),
        sa.Column("pattern", sa.Text, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("detail", sa.Text),
        sa.Column("inputs", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requeued_at", sa.DateTime(timezone=True)),
        sa.Column("requeued_run_id", id_type),
        schema=schema,
    )


def insert_from_failed(
    dead: sa.Table, failed: sa.CTE, inputs: sa.ColumnElement, error: sa.ColumnElement, now: sa.ColumnElement
) -> sa.Insert:
    """Dead-letters every row of `failed` that ends its chain (no retry due).

    `attempts` counts every attempt of the chain, the original included.
    """
    rows = sa.select(
        failed.c.id,
        sa.func.coalesce(failed.c.original_run_id, failed.c.id),
        failed.c.retry_count + 1,
        failed.c.max_retries,
        failed.c.failure_pattern,
        error,
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
    """Marks the dead letters of the runs in `:sr_failed_ids` requeued by `:sr_retry_ids`."""
    id_type = dead.c.run_id.type
    pairs = (
        sa.func.unnest(array_param("sr_failed_ids", id_type), array_param("sr_retry_ids", id_type))
        .table_valued(sa.column("failed_id", id_type), sa.column("retry_id", id_type))
        .render_derived(name="v")
    )
    return (
        sa.update(dead)
        .values(requeued_at=sa.bindparam("sr_now"), requeued_run_id=pairs.c.retry_id)
        .where(dead.c.run_id == pairs.c.failed_id, dead.c.requeued_at.is_(None))
        .returning(dead.c.id)
    )


def listing(dead: sa.Table, *, include_requeued: bool, pattern: bool, since: bool) -> sa.Select:
    """Dead letters newest first, up to `:sr_limit`; optionally by `:sr_pattern`, `:sr_since`."""
    where = []
    if not include_requeued:
        where.append(dead.c.requeued_at.is_(None))
    if pattern:
        where.append(dead.c.pattern == sa.bindparam("sr_pattern"))
    if since:
        where.append(dead.c.created_at >= sa.bindparam("sr_since", type_=sa.DateTime(timezone=True)))
    return (
        sa.select(dead)
        .where(*where)
        .order_by(dead.c.created_at.desc(), dead.c.id.desc())
        .limit(sa.bindparam("sr_limit"))
    )


def one(dead: sa.Table) -> sa.Select:
    """The dead letter with id `:sr_letter_id`, or of run `:sr_run_id`."""
    return sa.select(dead).where(
        sa.or_(dead.c.id == sa.bindparam("sr_letter_id"), dead.c.run_id == sa.bindparam("sr_run_id"))
    )


def purge(dead: sa.Table) -> sa.Delete:
    """Removes dead letters created before `:sr_before`."""
    return sa.delete(dead).where(dead.c.created_at < sa.bindparam("sr_before")).returning(dead.c.id)
