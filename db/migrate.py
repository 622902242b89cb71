"""`stuck-runs migrate`: Alembic, with checks first so an impossible table gets a clear message.

The revisions live in `db/migrations/versions`; they are idempotent SQL, so `--sql` prints the
same statements a DBA can review and run by hand.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import OperationalError

from db.engine import database_errors
from db.table import REQUIRED_COLUMNS, STATUSES, reflect_table, split_name
from jobs.errors import DatabaseUnavailable, SchemaError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


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
    config = Config(output_buffer=attributes.pop("output_buffer", None))
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


def migration_sql(qualified: str) -> str:
    """The DDL `migrate` would run, for a DBA; connects to nothing."""
    buffer = io.StringIO()
    command.upgrade(_config(qualified, output_buffer=buffer), "head", sql=True)
    return buffer.getvalue()


def migrate(engine: Engine, qualified: str) -> MigrateResult:
    """Brings `qualified` up to the newest revision; a second call changes nothing."""
    with database_errors(engine, f"migrating {qualified}"), engine.connect() as conn:
        check_migratable(conn, qualified)
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


def check_migratable(conn: Connection, qualified: str) -> None:
    """Raises `SchemaError` naming what makes the migration impossible, before any change."""
    table = reflect_table(conn, qualified)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.c]
    if missing:
        raise SchemaError(
            f"{qualified} lacks column(s) {', '.join(missing)} that stuck-runs needs: "
            "point SCRAPE_RUNS_TABLE at the scraper's runs table, or add them"
        )
    relation = quote_table(conn.dialect, qualified)
    for name, definition in conn.execute(
        sa.text(
            "SELECT c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) "
            "WHERE c.conrelid = CAST(:rel AS regclass) AND c.contype = 'c' AND a.attname = 'status'"
        ),
        {"rel": relation},
    ):
        if "'pending_retry'" not in definition or "'cancelled'" not in definition:
            raise SchemaError(
                f"{qualified} has CHECK constraint {name} on status ({definition}) that forbids "
                "'pending_retry' and 'cancelled': drop it or add those values, then run `stuck-runs migrate` again"
            )
    enum_name = table.info["enum_names"].get("status")
    if enum_name:
        labels = set(
            conn.execute(
                sa.text(
                    "SELECT e.enumlabel FROM pg_enum e JOIN pg_attribute a ON a.atttypid = e.enumtypid "
                    "WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = 'status'"
                ),
                {"rel": relation},
            ).scalars()
        )
        lacking = [s for s in STATUSES[:3] if s not in labels]
        if lacking:
            raise SchemaError(
                f"the status enum {enum_name} of {qualified} lacks {', '.join(lacking)}: "
                "stuck-runs needs running, completed and failed"
            )
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


def _drop_invalid_indexes(engine: Engine, conn: Connection, qualified: str) -> None:
    """A CONCURRENTLY build that failed leaves an invalid index IF NOT EXISTS would keep."""
    schema, _ = split_name(qualified)
    invalid = (
        conn.execute(
            sa.text(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE NOT i.indisvalid AND c.relname = ANY (:names) AND n.nspname = coalesce(:schema, current_schema())"
            ),
            {"names": list(index_names(qualified).values()), "schema": schema},
        )
        .scalars()
        .all()
    )
    conn.commit()
    if invalid:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as autocommit:
            for name in invalid:
                autocommit.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
