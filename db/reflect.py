"""The runs table as the catalog describes it, before any check: `reflect_table` reads its columns
(keyed by the roles COLUMN_MAP gives them) and primary key into a `Reflected`, the one description
the checks (db.shape, db.status_values) read and `RunsTable` (db.table) is resolved from. The
catalog facts the checks and the statements share (the id's kind and sequence, the status type's
SQL name, where dead letters go, which columns are bookkeeping) are read here too.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from db.errors import ConfigError, SchemaError
from db.layout import LIMIT_ROLES, Layout

ROLE_KEYS = ("id", "status", "started_at", "completed_at", "error_message")
# Bookkeeping timestamps describe one row, not the work: a retry gets its own (now), never a copy.
# Their common spellings, compared without `_` and case: Rails' and Prisma's `created_at`/`updatedAt`,
# Django's `created`/`modified`, `date_created`, `last_modified`... Only date/time columns count.
_CREATED = frozenset({"created", "createdat", "createdon", "datecreated", "creationdate", "inserted", "insertedat"})
# The spellings of the time of a row's last change, in the order one is chosen as the `updated_at`
# role when COLUMN_MAP names none: stuck-runs sets it to now() on every write (ETL syncs by it).
UPDATED_SPELLINGS = (
    "updatedat",
    "modifiedat",
    "updated",
    "modified",
    "updatedon",
    "modifiedon",
    "lastmodified",
    "lastmodifiedat",
    "lastupdated",
    "lastupdatedat",
    "dateupdated",
    "datemodified",
)
_BOOKKEEPING = _CREATED | frozenset(UPDATED_SPELLINGS)
DEAD_LETTERS_TABLE = "scrape_run_dead_letters"
_INPUT_KEY = "_sr_input_"  # the key of a scraper column whose name is a role another column plays


_NEXTVAL = re.compile(r"nextval\('((?:[^']|'')+)'::regclass\)")


@dataclass(frozen=True)
class Reflected:
    """The table with its mapped columns keyed by role (`table.c.status` is the column COLUMN_MAP
    names for status), the name SCRAPE_RUNS_TABLE gives it, the mapping, and the name of its status
    enum when status is one (read as text, cast to it by name when written)."""

    table: sa.Table
    qualified: str
    layout: Layout
    status_enum: str | None = None


def split_name(qualified: str) -> tuple[str | None, str]:
    schema, _, name = qualified.rpartition(".")
    return (schema or None), name


def _spelling(name: str) -> str:
    return name.replace("_", "").lower()


def _is_time(column: sa.Column) -> bool:
    return isinstance(column.type, (sa.DateTime, sa.Date))


def is_bookkeeping(column: sa.Column) -> bool:
    """A row's own creation or change time (not the work's): never copied into a retry."""
    return _is_time(column) and _spelling(column.name) in _BOOKKEEPING


def updated_column(reflected: Reflected) -> str | None:
    """The key of the `updated_at` role's column: COLUMN_MAP's, else the first column spelled like
    one (UPDATED_SPELLINGS), else None. `ConfigError` when the mapped one is missing or no timestamp."""
    table, layout, qualified = reflected.table, reflected.layout, reflected.qualified
    mapped = layout.columns.get("updated_at")
    if mapped is not None:
        column = next((c for c in table.columns if c.name == mapped), None)
        if column is None or not isinstance(column.type, sa.DateTime) or is_generated(column):
            what = "is not a column of" if column is None else f"({sql_type(column)}) is no writable timestamp of"
            raise ConfigError(
                f"COLUMN_MAP: updated_at={mapped} {what} {qualified}: map a timestamp column, or leave updated_at out"
            )
        return column.key
    found = {
        _spelling(c.name): c.key
        for c in table.columns
        if isinstance(c.type, sa.DateTime) and not is_generated(c) and c.key not in ROLE_KEYS
    }
    return next((found[s] for s in UPDATED_SPELLINGS if s in found), None)


# An interval as reflected (PostgreSQL's own type) or as declared.
INTERVALS = (sa.Interval, postgresql.INTERVAL)


def limit_role_columns(reflected: Reflected) -> dict[str, str | None]:
    """The keys of the columns mapped to SPEC §14's roles (`kind`, `max_runtime`, `progress`), None
    where unmapped. `ConfigError` for a column the table lacks, or a `max_runtime` that is neither
    an interval nor a number of seconds."""
    table, layout, qualified = reflected.table, reflected.layout, reflected.qualified
    keys: dict[str, str | None] = {}
    for role in LIMIT_ROLES:
        mapped = layout.columns.get(role)
        column = next((c for c in table.columns if c.name == mapped), None) if mapped else None
        if mapped and column is None:
            raise ConfigError(
                f"COLUMN_MAP: {role}={mapped} is not a column of {qualified}: map one of its columns, or leave {role} out"
            )
        if (
            role == "max_runtime"
            and column is not None
            and not isinstance(column.type, (*INTERVALS, sa.Numeric, sa.Integer, sa.Float))
        ):
            raise ConfigError(
                f"COLUMN_MAP: max_runtime={mapped} ({sql_type(column)}) is no interval or number of seconds: "
                f"map an interval or numeric column, or leave max_runtime out"
            )
        keys[role] = column.key if column is not None else None
    return keys


def priority_column(reflected: Reflected) -> str | None:
    """The key of the column mapped to SPEC §16's `priority` role, None when unmapped; `ConfigError`
    for a column the table lacks or one that holds no number."""
    table, layout, qualified = reflected.table, reflected.layout, reflected.qualified
    mapped = layout.columns.get("priority")
    if not mapped:
        return None
    column = next((c for c in table.columns if c.name == mapped), None)
    if column is None:
        raise ConfigError(
            f"COLUMN_MAP: priority={mapped} is not a column of {qualified}: map one of its columns, or leave priority out"
        )
    if not isinstance(column.type, (sa.Integer, sa.Numeric, sa.Float)):
        raise ConfigError(
            f"COLUMN_MAP: priority={mapped} ({sql_type(column)}) is not a number: "
            f"map an integer or numeric column, or leave priority out"
        )
    return column.key


def dead_letters_name(table: sa.Table, id_kind: str) -> str:
    """Where the table's dead letters go: UUID ids share `scrape_run_dead_letters` (they cannot
    collide, and that is where they always went); integer and text ids would collide with another
    table's, so such a table gets its own, typed like its ids."""
    return DEAD_LETTERS_TABLE if id_kind == "uuid" else f"{table.name}_dead_letters"[:63]


def is_generated(column: sa.Column) -> bool:
    default = column.server_default
    serial = default is not None and "nextval(" in str(getattr(default, "arg", ""))
    return bool(column.computed is not None or column.identity is not None or serial)


def reflect_table(conn: Connection, qualified: str, layout: Layout | None = None) -> Reflected:
    """The table, its mapped columns keyed by their roles. Raises `SchemaError` when it does not exist."""
    layout = layout or Layout()
    schema, name = split_name(qualified)
    roles = {layout.column(role): role for role in ROLE_KEYS}
    enum_names: dict[str, str] = {}

    def key_by_role(_inspector: Any, _table: Any, info: dict[str, Any]) -> None:
        column = info["name"]
        if column in roles:
            info["key"] = roles[column]
        elif column in ROLE_KEYS:  # `error_message` kept as an input while `error` plays the role
            info["key"] = _INPUT_KEY + column
        # A reflected Enum rejects values it did not know when reflected ('pending_retry' before
        # the migration); read status as text and cast to the enum by name when writing.
        if isinstance(info["type"], postgresql.ENUM):
            enum_names[info.get("key", column)] = info["type"].name
            info["type"] = sa.Text()

    table = sa.Table(name, sa.MetaData(), schema=schema, listeners=[("column_reflect", key_by_role)])
    inspector = sa.inspect(conn)
    inspector.__class__ = _columns_and_key_only(type(inspector))
    try:
        inspector.reflect_table(table, None)
    except sa.exc.NoSuchTableError:
        raise SchemaError(
            f"table {qualified} does not exist in this database: check DATABASE_URL and SCRAPE_RUNS_TABLE"
        ) from None
    return Reflected(table, qualified, layout, enum_names.get("status"))


@functools.cache
def _columns_and_key_only(inspector: type) -> type:
    """The inspector, reflecting a table's columns and primary key and nothing else: stuck-runs
    reads the indexes and constraints it needs itself (db.shape, db.migrate), so the other six
    catalog queries were a quarter of an idle `check`'s start-up. CHECK constraints above all:
    SQLAlchemy 2.1 fails to build a reflected `NOT VALID` one (it passes its dialect options as a
    keyword `CheckConstraint` does not take), which would refuse any table that has one."""

    def nothing(*_: Any, **__: Any) -> dict:
        return {}

    skipped = (
        "get_multi_foreign_keys",
        "get_multi_indexes",
        "get_multi_unique_constraints",
        "get_multi_table_comment",
        "get_multi_check_constraints",
        "get_multi_table_options",
    )
    return type("InspectorColumnsAndKey", (inspector,), dict.fromkeys(skipped, nothing))


def id_kind(table: sa.Table) -> str:
    kind = table.c.id.type
    if isinstance(kind, sa.Uuid):
        return "uuid"
    if isinstance(kind, sa.Integer):
        return "integer"
    return "text"


def id_sequence(conn: Connection, table: sa.Table) -> str | None:
    """The sequence that numbers an integer id (serial, identity, or a default of nextval of one
    the column does not own), as a regclass text."""
    owned = conn.execute(
        sa.select(sa.func.pg_get_serial_sequence(quoted_relation(table), table.c.id.name))
    ).scalar_one_or_none()
    if owned:
        return owned
    default = table.c.id.server_default
    found = _NEXTVAL.search(str(getattr(default, "arg", ""))) if default is not None else None
    return found[1].replace("''", "'") if found else None


def status_sql_type(conn: Connection, table: sa.Table) -> str:
    """The status column's type as SQL can name it (schema-qualified, quoted when needed)."""
    return conn.execute(
        sa.text(
            "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a "
            "WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = :column"
        ),
        {"rel": quoted_relation(table), "column": table.c.status.name},
    ).scalar_one()


def sql_type(column: sa.Column) -> str:
    """The column's type as PostgreSQL spells it (`integer`, `timestamp with time zone`...)."""
    return column.type.compile(dialect=postgresql.dialect()).lower()


def quoted_relation(table: sa.Table) -> str:
    quote = postgresql.dialect().identifier_preparer.quote
    return f"{quote(table.schema)}.{quote(table.name)}" if table.schema else quote(table.name)
