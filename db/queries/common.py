"""What the statement modules share: the clock parameter, the arrays, the table, and the
pieces both the sweep and the retries build on (a retry's row, a dead letter's inputs, a chain's
completed runs).

Parameters are bound by name, all prefixed `sr_`.
"""

from __future__ import annotations

import string
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.ext.compiler import compiles

from db import locks
from db.arrays import array_param
from db.dead_letters import dead_letters_table, insert_from_failed
from db.messages import HOURS_FROM_SECONDS, MINUTES_FROM_SECONDS
from db.pauses import PauseRecords
from db.table import RunsTable

NOW = sa.bindparam("sr_now", type_=sa.DateTime(timezone=True))


def render(template: str, **parts: sa.ColumnElement) -> sa.ColumnElement:
    """A message template of jobs.rules as SQL: its literal text around the given expressions."""
    pieces: list[sa.ColumnElement] = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if literal:
            pieces.append(sa.literal(literal, sa.Text))
        if field is not None:
            pieces.append(sa.cast(parts[field], sa.Text))
    return sa.func.concat(*pieces)


def duration_text(seconds: sa.ColumnElement) -> sa.ColumnElement:
    """`format_duration` of jobs.rules in SQL, for a duration of `seconds` (numeric, not negative):
    `1.2h` from HOURS_FROM_SECONDS on, whole minutes below, whole seconds below a minute."""
    hours = sa.func.to_char(sa.func.round(seconds / 3600, 1), "FM999999990.0").concat("h")
    minutes = sa.cast(sa.func.floor(seconds / 60), sa.Integer).concat("m")
    whole_seconds = sa.cast(sa.func.floor(seconds), sa.Integer).concat("s")
    return sa.case(
        (seconds >= HOURS_FROM_SECONDS, hours), (seconds >= MINUTES_FROM_SECONDS, minutes), else_=whole_seconds
    )


def _arrays(**columns: sa.types.TypeEngine) -> sa.TableValuedAlias:
    """`unnest(:sr_ids, :sr_messages, ...) AS v(id, message, ...)`: one row per element, in order.

    Each column `x` is bound from the array parameter `sr_xs`. Every parameter name starts with
    `sr_`: SQLAlchemy takes a parameter named like a column for a SET value, and the scraper's
    table has columns we do not know.
    """
    arrays = [array_param(f"sr_{name}s", kind) for name, kind in columns.items()]
    return (
        sa.func.unnest(*arrays)
        .table_valued(*(sa.column(name, kind) for name, kind in columns.items()))
        .render_derived(name="v")
    )


# A statement of a concern class, built on first use and kept: a command uses a few of the forty
# (building all of them cost every command, and every test that runs one, ~80 ms).
statement = cached_property


class TableStatements:
    """The table the statements are for, and the pieces several concerns build on.

    The concern classes (`SweepStatements`, `RetryStatements`, `ReportStatements`) extend it
    cooperatively: each statement is a `statement` (built on first use, then kept), so `RunQueries`
    composing them builds each statement once, and only the ones a command uses.
    """

    def __init__(self, runs: RunsTable) -> None:
        self.runs = runs
        self.t = t = runs.table
        self.dead_letters = dead_letters_table(t.schema, runs.dead_letters_name, runs.id_type)
        self.runs_ns = locks.namespace(runs.canonical_name, locks.RUNS)
        self.pauses = PauseRecords(t.schema, runs.canonical_name)

    def retry_ended(self, source: sa.FromClause) -> sa.ColumnElement:
        """A retry that ran and ended: completed or failed (a cancelled one never ran). What `stats`,
        `stats --by` and the retry_failure_rate notification all count as a retry ended."""
        ended = sa.or_(self.runs.in_state(source.c.status, "completed"), self.runs.in_state(source.c.status, "failed"))
        return sa.and_(source.c.is_retry, ended)

    def _update(self) -> sa.Update:
        """`UPDATE` of the runs table, as every statement that changes a run starts: the row's
        bookkeeping time (the `updated_at` role, when the table has one) is set to now, so ETL that
        syncs by it sees every change stuck-runs makes. The caller's `.values(...)` add to it."""
        return sa.update(self.t).values(**self.runs.touched(NOW))

    def _chain_completed(self, pending: sa.FromClause) -> sa.Select:
        """The completed runs of `pending`'s chain, earliest completion first."""
        done = self.t.alias("done")
        return (
            sa.select(done.c.id)
            .where(
                self.runs.in_state(done.c.status, "completed"),
                sa.or_(
                    done.c.id == pending.c.original_run_id,
                    sa.and_(done.c.is_retry, done.c.original_run_id == pending.c.original_run_id),
                ),
            )
            .order_by(done.c.completed_at)
        )

    def _retry_rows(self, failed: sa.CTE, retry_id: sa.ColumnElement | None = None) -> sa.Insert:
        """One pending retry for every row of `failed` that has a retry due, copying its inputs.

        The unique index on (original_run_id, retry_count) WHERE is_retry makes a second
        retry of the same attempt impossible; ON CONFLICT turns it into nothing.
        """
        t, runs = self.t, self.runs
        values: dict[str, sa.ColumnElement] = {name: failed.c[name] for name in runs.input_columns}
        values.update(
            status=runs.status("pending_retry"),
            retry_count=failed.c.retry_count + 1,
            max_retries=failed.c.max_retries,
            next_retry_at=failed.c.next_retry_at,
            original_run_id=sa.func.coalesce(failed.c.original_run_id, failed.c.id),
            is_retry=sa.true(),
        )
        values.update(runs.fresh_attempt_values(NOW))
        values.update(runs.touched(NOW))  # a new row: its own bookkeeping time, now (as every write)
        if retry_id is not None:
            values["id"] = retry_id
        rows = sa.select(*(value.label(name) for name, value in values.items())).where(
            failed.c.next_retry_at.is_not(None)
        )
        overriding = "id" in values and t.c.id.identity is not None and t.c.id.identity.always
        return (
            (_OverridingInsert(t) if overriding else insert(t))
            .from_select(list(values), rows)
            .on_conflict_do_nothing()
            .returning(t.c.id, t.c.original_run_id, t.c.retry_count)
        )

    def _dead_letters(self, failed: sa.CTE) -> sa.Insert:
        runs = self.runs
        return insert_from_failed(
            self.dead_letters, failed, runs.inputs_json(failed), runs.error_text(failed.c.error_message), NOW
        )


class _OverridingInsert(Insert):
    """`INSERT ... OVERRIDING SYSTEM VALUE SELECT ...`: a retry's id drawn from the sequence of a
    GENERATED ALWAYS identity, which PostgreSQL accepts only so."""

    inherit_cache = True


@compiles(_OverridingInsert, "postgresql")
def _overriding(insert_: _OverridingInsert, compiler: Any, **kw: Any) -> str:
    sql = compiler.visit_insert(insert_, **kw)
    start = sql.index("INSERT INTO")
    at = sql.index(") SELECT ", start) + 1
    return f"{sql[:at]} OVERRIDING SYSTEM VALUE{sql[at:]}"
