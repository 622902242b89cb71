"""The scraper's table as stuck-runs sees it: reflected, checked, its columns sorted by role.

The table belongs to the scraper application and carries columns we do not know; reflection
finds them so retries copy them. Checks here turn a table stuck-runs cannot work with into a
message that says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.types import UserDefinedType

from jobs.errors import NotMigrated, SchemaError

REQUIRED_COLUMNS = ("id", "search_query", "location_query", "status", "error_message", "started_at", "completed_at")
RETRY_COLUMNS = ("retry_count", "max_retries", "next_retry_at", "original_run_id", "is_retry", "failure_pattern")
# Lifecycle columns describe one attempt, not the work: a retry starts them afresh.
LIFECYCLE_COLUMNS = frozenset(
    {"id", "status", "error_message", "started_at", "completed_at", "created_at", "updated_at", *RETRY_COLUMNS}
)
STATUSES = ("running", "completed", "failed", "pending_retry", "cancelled")
DEAD_LETTERS_TABLE = "scrape_run_dead_letters"
JOB_RUNS_TABLE = "stuck_runs_job_runs"


class _NamedType(UserDefinedType):
    """A type known only by its SQL name (the scraper's status enum), for CASTs."""

    cache_ok = True

    def __init__(self, sql_name: str) -> None:
        self.sql_name = sql_name

    def get_col_spec(self, **_: Any) -> str:
        return self.sql_name


def split_name(qualified: str) -> tuple[str | None, str]:
    schema, _, name = qualified.rpartition(".")
    return (schema or None), name


@dataclass(frozen=True)
class RunsTable:
    """The reflected `scrape_runs` with what the statements need to know about it."""

    table: sa.Table
    heartbeat: str | None
    input_columns: tuple[str, ...]
    status_type: sa.types.TypeEngine  # the enum for CASTs, or the column's own text type
    status_is_enum: bool

    @property
    def c(self) -> sa.sql.base.ReadOnlyColumnCollection:
        return self.table.c

    @property
    def qualified_name(self) -> str:
        return f"{self.table.schema}.{self.table.name}" if self.table.schema else self.table.name

    def status(self, value: str) -> sa.ColumnElement:
        """A status literal that PostgreSQL accepts whether the column is an enum or text."""
        return sa.cast(sa.literal(value, sa.Text), self.status_type) if self.status_is_enum else sa.literal(value)

    def progress(self) -> sa.ColumnElement:
        """When the run last showed progress: the heartbeat when set, else `started_at`."""
        if self.heartbeat:
            return sa.func.coalesce(self.c[self.heartbeat], self.c.started_at)
        return self.c.started_at

    def fresh_attempt_values(self, now: sa.ColumnElement) -> dict[str, sa.ColumnElement]:
        """Values for the lifecycle columns of a new attempt, where the INSERT must spell them out.

        `error_message`, `started_at` and `completed_at` start NULL (or their default when NOT
        NULL); other lifecycle columns (`created_at`...) take their default, else `now`.
        Generated columns and those with defaults are left to the database.
        """
        values: dict[str, sa.ColumnElement] = {}
        for column in self.table.columns:
            name = column.name
            if name in self.input_columns or name in RETRY_COLUMNS or name == "status" or _is_generated(column):
                continue
            has_default = column.server_default is not None
            if name == "id":
                if not has_default:
                    values[name] = sa.func.gen_random_uuid()
            elif name in _CLEARED and column.nullable:
                values[name] = sa.cast(sa.null(), column.type)
            elif not has_default:
                is_time = isinstance(column.type, (sa.DateTime, sa.Date))
                values[name] = (
                    now if is_time else sa.cast(sa.null() if column.nullable else sa.literal(""), column.type)
                )
        return values


# Per-attempt columns that start empty even when the scraper gave them a default.
_CLEARED = frozenset({"error_message", "started_at", "completed_at"})


def _is_generated(column: sa.Column) -> bool:
    default = column.server_default
    serial = default is not None and "nextval(" in str(getattr(default, "arg", ""))
    return bool(column.computed is not None or column.identity is not None or serial)


def reflect_table(conn: Connection, qualified: str) -> sa.Table:
    schema, name = split_name(qualified)
    if not sa.inspect(conn).has_table(name, schema=schema):
        raise SchemaError(
            f"table {qualified} does not exist in this database: check DATABASE_URL and SCRAPE_RUNS_TABLE"
        )
    enum_names: dict[str, str] = {}

    def keep_enum_name(_inspector: Any, _table: Any, info: dict[str, Any]) -> None:
        # A reflected Enum rejects values it did not know when reflected ('pending_retry' before
        # the migration); read status as text and cast to the enum by name when writing.
        if isinstance(info["type"], postgresql.ENUM):
            enum_names[info["name"]] = info["type"].name
            info["type"] = sa.Text()

    table = sa.Table(
        name, sa.MetaData(), schema=schema, autoload_with=conn, listeners=[("column_reflect", keep_enum_name)]
    )
    table.info["enum_names"] = enum_names
    return table


def load_runs_table(conn: Connection, qualified: str, heartbeat: str | None = None) -> RunsTable:
    """Reflects and checks the table; raises `SchemaError` or `NotMigrated` with the fix."""
    table = reflect_table(conn, qualified)
    names = set(table.c.keys())
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise SchemaError(
            f"table {qualified} lacks column(s) {', '.join(missing)} that stuck-runs needs; "
            "is SCRAPE_RUNS_TABLE the scraper's runs table?"
        )
    if not isinstance(table.c.id.type, sa.Uuid):
        raise SchemaError(f"{qualified}.id is {table.c.id.type}: stuck-runs needs a UUID id (SPEC §2)")
    unmigrated = [c for c in RETRY_COLUMNS if c not in names]
    if unmigrated or not sa.inspect(conn).has_table(DEAD_LETTERS_TABLE, schema=table.schema):
        what = ", ".join(unmigrated) or DEAD_LETTERS_TABLE
        raise NotMigrated(f"table {qualified} is not migrated (missing {what}): run `stuck-runs migrate`")
    if heartbeat and heartbeat not in names:
        raise SchemaError(
            f"HEARTBEAT_COLUMN={heartbeat!r} is not a column of {qualified}: "
            f"use one of {', '.join(c for c in sorted(names) if 'at' in c)} or unset it"
        )
    skipped = LIFECYCLE_COLUMNS | ({heartbeat} if heartbeat else set())
    inputs = tuple(c.name for c in table.columns if c.name not in skipped and not _is_generated(c))
    enum_name = table.info["enum_names"].get("status")
    status_type: sa.types.TypeEngine = (
        _NamedType(_quoted_type(conn, table, enum_name)) if enum_name else table.c.status.type
    )
    return RunsTable(table, heartbeat, inputs, status_type, enum_name is not None)


def _quoted_type(conn: Connection, table: sa.Table, _enum_name: str) -> str:
    """The status column's type as SQL can name it (schema-qualified, quoted when needed)."""
    return conn.exec_driver_sql(
        "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a "
        "WHERE a.attrelid = %(rel)s::regclass AND a.attname = 'status'",
        {"rel": f'"{table.schema}"."{table.name}"' if table.schema else f'"{table.name}"'},
    ).scalar_one()
