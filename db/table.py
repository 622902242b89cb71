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

from db.errors import ConfigError, NotMigrated, SchemaError

REQUIRED_COLUMNS = ("id", "search_query", "location_query", "status", "error_message", "started_at", "completed_at")
RETRY_COLUMNS = ("retry_count", "max_retries", "next_retry_at", "original_run_id", "is_retry", "failure_pattern")
# Lifecycle columns describe one attempt, not the work: a retry starts them afresh.
LIFECYCLE_COLUMNS = frozenset(
    {"id", "status", "error_message", "started_at", "completed_at", "created_at", "updated_at", *RETRY_COLUMNS}
)
# Columns stuck-runs writes on every transition (besides the retry columns).
WRITTEN_COLUMNS = ("status", "error_message", "started_at", "completed_at")
MANAGED_COLUMNS = frozenset({"id", *WRITTEN_COLUMNS, *RETRY_COLUMNS})
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
    """Reflects and checks the table; raises `SchemaError`, `ConfigError` or `NotMigrated` with the fix."""
    table = reflect_table(conn, qualified)
    check_shape(conn, table, qualified)
    check_heartbeat(table, qualified, heartbeat)
    names = set(table.c.keys())
    unmigrated = [c for c in RETRY_COLUMNS if c not in names]
    if unmigrated or not sa.inspect(conn).has_table(DEAD_LETTERS_TABLE, schema=table.schema):
        what = ", ".join(unmigrated) or DEAD_LETTERS_TABLE
        raise NotMigrated(f"table {qualified} is not migrated (missing {what}): run `stuck-runs migrate`")
    skipped = LIFECYCLE_COLUMNS | ({heartbeat} if heartbeat else set())
    inputs = tuple(c.name for c in table.columns if c.name not in skipped and not _is_generated(c))
    enum_name = table.info["enum_names"].get("status")
    status_type: sa.types.TypeEngine = (
        _NamedType(_quoted_type(conn, table, enum_name)) if enum_name else table.c.status.type
    )
    return RunsTable(table, heartbeat, inputs, status_type, enum_name is not None)


def check_shape(conn: Connection, table: sa.Table, qualified: str) -> None:
    """Raises `SchemaError` for a table stuck-runs cannot work with, migrated or not.

    `load_runs_table` and `migrate` both apply it, so a table every command would refuse is
    refused before `migrate` changes anything.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.c]
    if missing:
        raise SchemaError(
            f"table {qualified} lacks column(s) {', '.join(missing)} that stuck-runs needs: "
            "point SCRAPE_RUNS_TABLE at the scraper's runs table, or add them"
        )
    key = [c.name for c in table.primary_key.columns]
    if key != ["id"]:
        has = f"its primary key is ({', '.join(key)})" if key else "it has no primary key"
        raise SchemaError(f"{qualified}.id must be the table's primary key, but {has}: stuck-runs finds runs by id")
    if not isinstance(table.c.id.type, sa.Uuid):
        raise SchemaError(
            f"{qualified}.id is {sql_type(table.c.id)}: this version of stuck-runs needs a UUID id "
            "(integer and text ids are not supported yet)"
        )
    for name in (*WRITTEN_COLUMNS, *RETRY_COLUMNS):
        if name in table.c and table.c[name].computed is not None:
            raise SchemaError(
                f"{qualified}.{name} is a generated column: stuck-runs cannot write it; "
                "make it a plain column or point SCRAPE_RUNS_TABLE at another table"
            )
    for name in ("started_at", "completed_at"):
        if not isinstance(table.c[name].type, sa.DateTime):
            raise SchemaError(
                f"{qualified}.{name} is {sql_type(table.c[name])}: stuck-runs needs a timestamp "
                "(with or without time zone)"
            )
    _check_status(conn, table, qualified)


def _check_status(conn: Connection, table: sa.Table, qualified: str) -> None:
    status = table.c.status
    if not isinstance(status.type, sa.String):
        raise SchemaError(f"{qualified}.status is {sql_type(status)}: stuck-runs needs text, varchar or an enum")
    limit = status.type.length
    too_long = [s for s in STATUSES if limit is not None and len(s) > limit]
    if too_long:
        raise SchemaError(
            f"{qualified}.status is varchar({limit}), too short for {too_long[0]!r}: "
            f"widen it to varchar({max(map(len, STATUSES))}) or more"
        )
    relation = quoted_relation(table)
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
        lacking = [s for s in STATUSES[:3] if s not in status_labels(conn, table)]
        if lacking:
            raise SchemaError(
                f"the status enum {enum_name} of {qualified} lacks {', '.join(lacking)}: "
                "stuck-runs needs running, completed and failed"
            )


def status_labels(conn: Connection, table: sa.Table) -> set[str]:
    """The values of the status enum (empty when status is not an enum)."""
    return set(
        conn.execute(
            sa.text(
                "SELECT e.enumlabel FROM pg_enum e JOIN pg_attribute a ON a.atttypid = e.enumtypid "
                "WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = 'status'"
            ),
            {"rel": quoted_relation(table)},
        ).scalars()
    )


def heartbeat_candidates(table: sa.Table) -> list[str]:
    """The columns HEARTBEAT_COLUMN could name: timestamps that stuck-runs does not manage and can write."""
    return [
        c.name
        for c in table.columns
        if isinstance(c.type, sa.DateTime) and c.name not in MANAGED_COLUMNS and c.computed is None
    ]


def heartbeat_problem(table: sa.Table, qualified: str, heartbeat: str | None) -> str | None:
    """Why `heartbeat` cannot be the heartbeat column, with the columns that would do; None if it can.

    The claim of a retry writes `now` into it and the sweep compares it with `started_at`: a
    text column would receive a timestamp as data, a column stuck-runs manages would be
    overwritten, a generated one cannot be written.
    """
    if not heartbeat:
        return None
    candidates = heartbeat_candidates(table)
    if candidates:
        fix = f"use {candidates[0]}" if len(candidates) == 1 else f"use one of {', '.join(candidates)}"
    else:
        fix = "add a timestamp column the scraper updates as it works"
    setting = f"HEARTBEAT_COLUMN={heartbeat!r}"
    if heartbeat not in table.c:
        return f"{setting} is not a column of {qualified}: {fix}, or unset it"
    column = table.c[heartbeat]
    kind = sql_type(column)
    if heartbeat in MANAGED_COLUMNS:
        why = "a column stuck-runs writes itself"
    elif column.computed is not None:
        why = "a generated column, which cannot be written"
    elif not isinstance(column.type, sa.DateTime):
        why = "not a timestamp"
    else:
        return None
    return f"{setting}: {qualified}.{heartbeat} ({kind}) is {why}: {fix}, or unset it"


def check_heartbeat(table: sa.Table, qualified: str, heartbeat: str | None) -> None:
    problem = heartbeat_problem(table, qualified, heartbeat)
    if problem:
        raise ConfigError(problem)


def sql_type(column: sa.Column) -> str:
    """The column's type as PostgreSQL spells it (`integer`, `timestamp with time zone`...)."""
    return column.type.compile(dialect=postgresql.dialect()).lower()


def quoted_relation(table: sa.Table) -> str:
    return f'"{table.schema}"."{table.name}"' if table.schema else f'"{table.name}"'


def _quoted_type(conn: Connection, table: sa.Table, _enum_name: str) -> str:
    """The status column's type as SQL can name it (schema-qualified, quoted when needed)."""
    return conn.exec_driver_sql(
        "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a "
        "WHERE a.attrelid = %(rel)s::regclass AND a.attname = 'status'",
        {"rel": quoted_relation(table)},
    ).scalar_one()
