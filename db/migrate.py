"""`stuck-runs migrate`: Alembic, with checks first so an impossible table gets a clear message.

The revisions live in `db/migrations/versions`, each a list of idempotent, named `Step`s; `--sql`
prints the same steps (those a database lacks, when it can be asked) for a DBA to run by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import OperationalError

from db.engine import database_errors, make_engine, redacted
from db.errors import DatabaseUnavailable, SchemaError
from db.table import check_heartbeat, check_shape, reflect_table, split_name, status_labels

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Fail fast instead of queueing behind a long transaction and blocking the scraper's writes.
LOCK_TIMEOUT = "SET LOCAL lock_timeout = '10s'"
ENUM_VALUES = "status enum values pending_retry, cancelled"  # what 0001's step for an enum status creates


def version_table_for(qualified: str) -> tuple[str, str | None]:
    """stuck-runs' own Alembic version table, next to the table it migrates."""
    schema, name = split_name(qualified)
    return f"stuck_runs_alembic_{name}"[:63], schema


def index_names(qualified: str) -> dict[str, str]:
    _, name = split_name(qualified)
    return {
        "running": f"ix_{name}_running_started_at"[:63],
        "pending": f"ix_{name}_pending_next_retry_at"[:63],
        "chain": f"ix_{name}_original_run_id"[:63],
        "unique_retry": f"ux_{name}_chain_retry"[:63],
        "stats": f"ix_{name}_ended_attempts"[:63],
    }


def quote_table(dialect: Dialect, qualified: str) -> str:
    schema, name = split_name(qualified)
    quote = dialect.identifier_preparer.quote
    return f"{quote(schema)}.{quote(name)}" if schema else quote(name)


@dataclass(frozen=True)
class MigrateResult:
    table: str
    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _config(qualified: str, **attributes: object) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["table"] = qualified
    config.attributes.update(attributes)
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config("scrape_runs")).get_current_head()


def current_revision(conn: Connection, qualified: str) -> str | None:
    version_table, schema = version_table_for(qualified)
    context = MigrationContext.configure(conn, opts={"version_table": version_table, "version_table_schema": schema})
    return context.get_current_revision()


@dataclass(frozen=True)
class Step:
    """One idempotent statement of a revision, named by what it creates ("column retry_count",
    "index ix_..."), so `migrate --sql` can leave out what a database already has."""

    creates: str
    sql: str
    concurrent: bool = False  # must run outside a transaction (CONCURRENTLY, ALTER TYPE ... ADD VALUE)


def apply_steps(op: Any, steps: list[Step]) -> None:
    """Runs a revision's steps: the transactional ones first, then the concurrent ones."""
    transactional = [s for s in steps if not s.concurrent]
    if transactional:
        op.execute(LOCK_TIMEOUT)
        for step in transactional:
            op.execute(step.sql)
    concurrent = [s for s in steps if s.concurrent]
    if concurrent:
        with op.get_context().autocommit_block():
            for step in concurrent:
                op.execute(step.sql)


def revision_steps(qualified: str) -> list[tuple[str, list[Step]]]:
    """Each revision, oldest first, with its steps for `qualified`."""
    scripts = reversed(list(ScriptDirectory.from_config(_config(qualified)).walk_revisions()))
    dialect = postgresql.dialect()
    return [(script.revision, script.module.steps(qualified, dialect)) for script in scripts]


def migration_sql(qualified: str, present: frozenset[str] = frozenset(), invalid: tuple[str, ...] = ()) -> str:
    """The DDL `migrate` would run, as a script a DBA can review and run with psql.

    Every statement is idempotent, the revision record included. Steps whose `creates` is in
    `present` are left out; `invalid` indexes (a failed CONCURRENTLY build) are dropped first
    so they are built again. Connects to nothing.
    """
    revisions = revision_steps(qualified)
    steps = [step for _, revision in revisions for step in revision if step.creates not in present]
    head = revisions[-1][0]
    lines: list[str] = []
    transactional = [s.sql for s in steps if not s.concurrent]
    if transactional:
        lines += ["BEGIN;", f"{LOCK_TIMEOUT};", *(f"{sql};" for sql in transactional), "COMMIT;"]
    lines += [f"DROP INDEX CONCURRENTLY IF EXISTS {name};" for name in invalid]
    lines += [f"{s.sql};" for s in steps if s.concurrent]
    if f"revision {head}" not in present:
        lines += _record_revision(qualified, head, [rev for rev, _ in revisions[:-1]])
    return "\n\n".join(lines) + "\n" if lines else ""


def _record_revision(qualified: str, head: str, older: list[str]) -> list[str]:
    """What `migrate` records after the steps, written so that running it again changes nothing."""
    name, schema = version_table_for(qualified)
    table = quote_table(postgresql.dialect(), f"{schema}.{name}" if schema else name)
    earlier = ", ".join(f"'{rev}'" for rev in older) or "NULL"
    return [
        "BEGIN;",
        f"CREATE TABLE IF NOT EXISTS {table} (\n    version_num VARCHAR(32) NOT NULL,\n"
        f"    CONSTRAINT {f'{name}_pkc'[:63]} PRIMARY KEY (version_num)\n);",
        f"UPDATE {table} SET version_num = '{head}' WHERE version_num IN ({earlier});",
        f"INSERT INTO {table} (version_num) SELECT '{head}' WHERE NOT EXISTS (SELECT 1 FROM {table});",
        "COMMIT;",
    ]


def script_for_dba(url: str | None, qualified: str, heartbeat: str | None = None) -> str:
    """`migrate --sql`: what the database lacks, after the checks `migrate` makes, when it can be
    asked; else (no URL, or unreachable) the full idempotent script, saying why at the top."""
    if not url:
        return _full_script(qualified, "DATABASE_URL is not set")
    engine = make_engine(url, role="migrate", pool_size=1)
    try:
        with database_errors(engine, "reading what is already migrated"), engine.connect() as conn:
            table = check_migratable(conn, qualified, heartbeat)
            present = present_objects(conn, table, qualified)
            invalid = tuple(_invalid_indexes(conn, qualified))
    except DatabaseUnavailable as exc:
        return _full_script(qualified, str(exc))
    finally:
        engine.dispose()
    where, head = f"{qualified} at {redacted(engine.url)}", head_revision()
    # A text status has no enum to extend: that step is not needed, nor is it there.
    needless = frozenset() if table.info["enum_names"].get("status") else frozenset({ENUM_VALUES})
    sql = migration_sql(qualified, present | needless, invalid)
    if not sql:
        return f"-- {where} has everything up to revision {head}: nothing to run.\n"
    made = [step.creates for _, steps in revision_steps(qualified) for step in steps]
    there = [name for name in made if name in present]
    already = f"-- Already there: {', '.join(there)}.\n" if there else ""
    return f"-- What {where} lacks to reach revision {head}.\n{already}\n{sql}"


def _full_script(qualified: str, reason: str) -> str:
    return (
        f"-- {reason}.\n-- So this is the full script for {qualified} up to revision {head_revision()}: every\n"
        "-- statement is idempotent, safe to run on a database that has some or all of it.\n\n"
        + migration_sql(qualified)
    )


def present_objects(conn: Connection, table: sa.Table, qualified: str) -> frozenset[str]:
    """What of the migration the database already has, named as `Step.creates` names it."""
    found = {f"column {name}" for name in table.c.keys()}
    found |= {
        f"{kind} {name}"
        for kind, name in conn.execute(
            sa.text(
                "SELECT CASE WHEN c.relkind IN ('i', 'I') THEN 'index' ELSE 'table' END, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_index i ON i.indexrelid = c.oid "
                "WHERE n.nspname = coalesce(:schema, current_schema()) AND c.relkind IN ('r', 'p', 'i', 'I') "
                "AND coalesce(i.indisvalid, true)"
            ),
            {"schema": table.schema},
        )
    }
    if not {"pending_retry", "cancelled"} - status_labels(conn, table):
        found.add(ENUM_VALUES)
    if current_revision(conn, qualified) == head_revision():
        found.add(f"revision {head_revision()}")
    return frozenset(found)


def migrate(engine: Engine, qualified: str, heartbeat: str | None = None) -> MigrateResult:
    """Brings `qualified` up to the newest revision; a second call changes nothing.

    A table that `load_runs_table` would refuse is refused before the first statement.
    """
    with database_errors(engine, f"migrating {qualified}"), engine.connect() as conn:
        check_migratable(conn, qualified, heartbeat)
        _drop_invalid_indexes(engine, conn, qualified)
        before = current_revision(conn, qualified)
        conn.commit()
        try:
            command.upgrade(_config(qualified, connection=conn), "head")
        except OperationalError as exc:
            if "lock timeout" in str(exc):
                raise DatabaseUnavailable(
                    f"{qualified} stayed locked by another transaction for 10s; run `stuck-runs migrate` again "
                    "when the long transaction has finished (see pg_stat_activity)"
                ) from None
            raise
        after = current_revision(conn, qualified)
        conn.commit()
    return MigrateResult(qualified, before, after)


def check_migratable(conn: Connection, qualified: str, heartbeat: str | None = None) -> sa.Table:
    """Raises what makes the migration impossible or useless, before any change: every check
    `load_runs_table` applies to the table and the heartbeat, and duplicate retry rows that the
    unique index would reject. Returns the reflected table."""
    table = reflect_table(conn, qualified)
    check_shape(conn, table, qualified)
    check_heartbeat(table, qualified, heartbeat)
    if {"original_run_id", "retry_count", "is_retry"} <= set(table.c.keys()):
        duplicated = conn.execute(
            sa.select(sa.func.count()).select_from(
                sa.select(table.c.original_run_id)
                .where(table.c.is_retry)
                .group_by(table.c.original_run_id, table.c.retry_count)
                .having(sa.func.count() > 1)
                .subquery()
            )
        ).scalar_one()
        if duplicated:
            raise SchemaError(
                f"{qualified} has {duplicated} (original_run_id, retry_count) pair(s) with more than one retry row; "
                "keep one row of each pair, then run `stuck-runs migrate` again"
            )
    return table


def _invalid_indexes(conn: Connection, qualified: str) -> list[str]:
    """stuck-runs' indexes left invalid by a failed CONCURRENTLY build, schema-qualified."""
    schema, _ = split_name(qualified)
    return list(
        conn.execute(
            sa.text(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE NOT i.indisvalid AND c.relname = ANY (:names) AND n.nspname = coalesce(:schema, current_schema())"
            ),
            {"names": list(index_names(qualified).values()), "schema": schema},
        ).scalars()
    )


def _drop_invalid_indexes(engine: Engine, conn: Connection, qualified: str) -> None:
    """A CONCURRENTLY build that failed leaves an invalid index IF NOT EXISTS would keep."""
    invalid = _invalid_indexes(conn, qualified)
    conn.commit()
    if invalid:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as autocommit:
            for name in invalid:
                autocommit.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
