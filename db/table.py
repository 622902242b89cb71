"""The scraper's table as stuck-runs sees it: reflected once (db.reflect), checked (db.shape), its
mapping resolved, its columns sorted by role.

Reflection keys each mapped column by its role (`t.c.status` is the column COLUMN_MAP names for
status, rendered in SQL by its real name), so every statement is written once, in roles, and
rendered in the table's names. Status values, the id's kind, the error column's kind and the
run's label are resolved here too: `RunsTable` is the one object that knows the table's names.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.types import UserDefinedType

from db.errors import ConfigError, RunNotFound, UsageError
from db.layout import RETRY_COLUMNS, STATES, Layout, label_fields
from db.reflect import (
    INTERVALS,
    ROLE_KEYS,
    Reflected,
    dead_letters_name,
    id_kind,
    id_sequence,
    is_bookkeeping,
    is_generated,
    limit_role_columns,
    priority_column,
    reflect_table,
    status_sql_type,
    updated_column,
)
from db.shape import check_heartbeat, check_migrated, check_row_security, check_shape
from db.status_values import in_values, status_value


class _NamedType(UserDefinedType):
    """A type known only by its SQL name (the scraper's status enum), for CASTs."""

    cache_ok = True

    def __init__(self, sql_name: str) -> None:
        self.sql_name = sql_name

    def get_col_spec(self, **_: Any) -> str:
        return self.sql_name


@dataclass(frozen=True)
class RunsTable:
    """The reflected runs table with its resolved mapping: what every statement is rendered from."""

    reflected: Reflected  # the table with its mapped columns keyed by role, and the mapping
    heartbeat: str | None  # the heartbeat column's key
    input_columns: tuple[str, ...]  # keys of the columns a retry copies
    status_type: sa.types.TypeEngine  # the enum for CASTs, or the column's own text type
    status_is_enum: bool
    id_kind: str  # "uuid", "integer" or "text"
    id_sequence: str | None = None  # an integer id's sequence, schema-qualified and quoted
    error_kind: str = "text"  # "text", "varchar" or "json"
    error_limit: int | None = None  # a varchar(n) error column's n
    id_default: str | None = None  # a UUID or text id's own default expression (`md5(random()::text)`)
    # The table as every process names it, however SCRAPE_RUNS_TABLE spells it: `public.scrape_runs`
    # and `scrape_runs` are one table, so one set of locks, slots, pause and records.
    canonical: str | None = None
    updated: str | None = None  # the `updated_at` role's column key: set to now on every write
    # SPEC §14's roles, each the mapped column's key or None: what sort of run a row is, the run's
    # own limit (an interval or seconds), the counter the scraper raises as it works.
    kind: str | None = None
    max_runtime: str | None = None
    progress_counter: str | None = None
    priority: str | None = None  # SPEC §16's `priority` role: the mapped column's key, or None

    @property
    def table(self) -> sa.Table:
        return self.reflected.table

    @property
    def layout(self) -> Layout:
        return self.reflected.layout

    def kind_text(self, source: sa.FromClause | None = None) -> sa.ColumnElement | None:
        """The run's kind as text (how limits by kind name it), or None without a `kind` role."""
        c = (source if source is not None else self.table).c
        return sa.cast(c[self.kind], sa.Text) if self.kind else None

    def max_runtime_seconds(self, source: sa.FromClause | None = None) -> sa.ColumnElement | None:
        """The run's own limit in seconds (NULL where the scraper wrote none), or None without the role."""
        if not self.max_runtime:
            return None
        column = (source if source is not None else self.table).c[self.max_runtime]
        if isinstance(column.type, INTERVALS):
            return sa.cast(sa.extract("epoch", column), sa.Float)
        return sa.cast(column, sa.Float)

    def touched(self, now: sa.ColumnElement) -> dict[str, sa.ColumnElement]:
        """The values every write of a row sets besides its own: the bookkeeping time, now."""
        return {self.updated: now} if self.updated else {}

    @property
    def canonical_name(self) -> str:
        return self.canonical or self.qualified_name

    @property
    def c(self) -> sa.sql.base.ReadOnlyColumnCollection:
        return self.table.c

    @property
    def qualified_name(self) -> str:
        return f"{self.table.schema}.{self.table.name}" if self.table.schema else self.table.name

    @property
    def id_type(self) -> sa.types.TypeEngine:
        return self.table.c.id.type

    @property
    def dead_letters_name(self) -> str:
        return dead_letters_name(self.table, self.id_kind)

    @property
    def input_names(self) -> dict[str, str]:
        """Each input column's key and real name: how executors and dead letters name inputs."""
        return {key: self.name_of(key) for key in self.input_columns}

    def name_of(self, key: str) -> str:
        """The real name of the column keyed `key` (a role, or an input's own name)."""
        return self.table.c[key].name

    # -- statuses ---------------------------------------------------------------------------

    def _value(self, value: str) -> sa.ColumnElement:
        return status_value(value, self.status_type if self.status_is_enum else None)

    def status(self, state: str) -> sa.ColumnElement:
        """The value stuck-runs writes for `state`, as SQL that an enum or a text column accepts."""
        return self._value(self.layout.written(state))

    def in_state(self, column: sa.ColumnElement, state: str) -> sa.ColumnElement:
        """`column` holds one of the values that mean `state`."""
        return in_values(column, self.layout.values(state), self._value)

    def state_of(self, column: sa.ColumnElement) -> sa.ColumnElement:
        """The state a status value means, in stuck-runs' words; a value it does not know, as written."""
        # Compared as text: an enum may lack a value of a state stuck-runs never writes (queued).
        text = sa.cast(column, sa.Text)
        whens = [(text.in_(self.layout.values(state)), state) for state in STATES]
        return sa.case(*whens, else_=text)

    # -- the error column ---------------------------------------------------------------------

    def error_value(self, message: sa.ColumnElement) -> sa.ColumnElement:
        """A message as the error column takes it: a JSON string, or cut to a varchar's length
        keeping its ` - retry n/N scheduled` tail (the last ` - ` starts it)."""
        if self.error_kind == "json":
            return sa.func.to_jsonb(sa.cast(message, sa.Text))
        if self.error_limit is None:
            return message
        limit = self.error_limit
        tail = sa.func.coalesce(sa.func.substring(message, r".*( - .*)$"), "")
        head = sa.func.left(message, sa.func.length(message) - sa.func.length(tail))
        kept = sa.func.greatest(limit - 1 - sa.func.length(tail), 0)
        cut = sa.func.left(sa.func.left(head, kept).concat("…").concat(tail), limit)
        return sa.case((sa.func.length(message) <= limit, message), else_=cut)

    def error_text(self, column: sa.ColumnElement) -> sa.ColumnElement:
        """The error column read as text (a JSON string unquoted, other JSON as its text)."""
        return column.op("#>>")(sa.literal_column("'{}'")) if self.error_kind == "json" else column

    # -- ids and labels -----------------------------------------------------------------------

    def new_id(self) -> sa.ColumnElement:
        """A fresh id for a retry row, of the id's type."""
        if self.id_kind == "integer":
            return sa.cast(sa.func.nextval(sa.literal(self.id_sequence, sa.Text)), self.id_type)
        if self.id_default is not None:  # the table's own way of making ids wins
            return sa.cast(sa.literal_column(f"({self.id_default})"), self.id_type)
        if self.id_kind == "text":
            return sa.cast(sa.func.gen_random_uuid(), sa.Text)
        return sa.func.gen_random_uuid()

    def id_from_text(self, text: str | None) -> object:
        """An id the statements returned as text, as the driver returns the id column."""
        return None if text is None else self.parse_id(text)

    def parse_id(self, text: str) -> object:
        """A run id as an operator typed it, checked against the id's kind."""
        value = str(text).strip()
        if self.id_kind == "integer":
            digits = value[1:] if value.startswith("-") else value
            if not (digits.isascii() and digits.isdigit()):
                raise UsageError(f"{text!r} is not a run id: ids of {self.qualified_name} are whole numbers")
            if abs(int(value)) >= 2**63:  # an id, of a run no integer column can hold: not there
                raise RunNotFound(f"run {value} not found in {self.qualified_name}")
            return int(value)
        if self.id_kind == "uuid":
            try:
                return uuid.UUID(value)
            except ValueError:
                raise UsageError(
                    f"{text!r} is not a run id: ids of {self.qualified_name} are UUIDs, like "
                    "3f2b8c1e-4a5d-4e6f-9a7b-1c2d3e4f5a6b"
                ) from None
        if not value or "\x00" in value:
            raise UsageError(f"{text!r} is not a run id: give the run's id as {self.qualified_name} stores it")
        return value

    def what(self, source: sa.FromClause | None = None) -> sa.ColumnElement:
        """What the run is, as text (RUN_LABEL; by default `search_query in location_query` where both
        exist, else the run's id): `[RETRY 1/4] …` is added in Python."""
        c = (source if source is not None else self.table).c
        template = self.layout.label
        if template is None:
            if "search_query" in self.input_columns and "location_query" in self.input_columns:
                parts = [sa.func.nullif(sa.cast(c[k], sa.Text), "") for k in ("search_query", "location_query")]
                return sa.func.coalesce(sa.func.nullif(sa.func.concat_ws(" in ", *parts), ""), "(no query)")
            return sa.literal("run ").concat(sa.cast(c.id, sa.Text))
        pieces: list[sa.ColumnElement] = []
        for literal, column in label_fields(template):
            if literal:
                pieces.append(sa.literal(literal, sa.Text))
            if column is not None:
                pieces.append(sa.func.coalesce(sa.cast(c[self._key_for(column)], sa.Text), ""))
        return sa.func.concat(*pieces)

    def label_keys(self) -> list[str]:
        """The keys of the columns the run's label is made of."""
        if self.layout.label is None:
            pair = ["search_query", "location_query"]
            return pair if all(k in self.input_columns for k in pair) else []
        return [self._key_for(column) for _, column in label_fields(self.layout.label) if column is not None]

    def _key_for(self, name: str) -> str:
        for column in self.table.columns:
            if column.name == name:
                return column.key
        raise KeyError(name)

    def keyed(self, source: sa.FromClause | None = None) -> list[sa.ColumnElement]:
        """Every column as Python reads a row: labelled by key, the status as a state, the error as text,
        and the run's label as `_sr_what`."""
        c = (source if source is not None else self.table).c
        columns: list[sa.ColumnElement] = []
        for key in c.keys():
            if key == "status":
                columns.append(self.state_of(c.status).label("status"))
            elif key == "error_message":
                columns.append(self.error_text(c.error_message).label("error_message"))
            else:
                columns.append(c[key].label(key))
        columns.append(self.what(source).label("_sr_what"))
        return columns

    def inputs_json(self, source: sa.FromClause) -> sa.ColumnElement:
        """The input columns of a row of `source` as one JSON object, by their real names."""
        pairs = [(self.name_of(key), source.c[key]) for key in self.input_columns]
        chunks = [pairs[i : i + 50] for i in range(0, len(pairs), 50)]  # 100 arguments per call at most
        objects = [sa.func.jsonb_build_object(*(x for pair in chunk for x in pair)) for chunk in chunks]
        result = objects[0] if objects else sa.cast(sa.literal("{}"), postgresql.JSONB)
        for more in objects[1:]:
            result = result.op("||")(more)
        return result

    # -- a retry's row ------------------------------------------------------------------------

    def last_sign_of_life(self) -> sa.ColumnElement:
        """When the run last showed a sign of life: the heartbeat when set, else `started_at`.
        (Not SPEC §14's `progress`, the counter a scraper raises: that is `progress_counter`.)"""
        if self.heartbeat:
            return sa.func.coalesce(self.c[self.heartbeat], self.c.started_at)
        return self.c.started_at

    def fresh_attempt_values(self, now: sa.ColumnElement) -> dict[str, sa.ColumnElement]:
        """Values for the lifecycle columns of a new attempt, where the INSERT must spell them out.

        `error_message`, `started_at` and `completed_at` start NULL (or `now` when NOT NULL);
        bookkeeping timestamps (`updatedAt`...) without a default take `now`. Generated columns
        and those with defaults are left to the database; an id without one gets a fresh one.
        """
        values: dict[str, sa.ColumnElement] = {}
        for column in self.table.columns:
            key = column.key
            if key in self.input_columns or key in RETRY_COLUMNS or key == "status" or is_generated(column):
                continue
            has_default = column.server_default is not None
            if key == "id":
                if not has_default:
                    values[key] = self.new_id()
            elif key in _CLEARED and column.nullable:
                values[key] = sa.cast(sa.null(), column.type)
            elif not has_default:
                is_time = isinstance(column.type, (sa.DateTime, sa.Date))
                values[key] = now if is_time else sa.cast(sa.null() if column.nullable else sa.literal(""), column.type)
        return values


# Per-attempt columns that start empty even when the scraper gave them a default.
_CLEARED = frozenset({"error_message", "started_at", "completed_at"})


def load_runs_table(
    conn: Connection, qualified: str, heartbeat: str | None = None, layout: Layout | None = None
) -> RunsTable:
    """Reflects and checks the table, resolving the mapping; raises `SchemaError`, `ConfigError` or
    `NotMigrated` with the fix."""
    layout = layout or Layout()
    reflected = reflect_table(conn, qualified, layout)
    table = reflected.table
    check_shape(conn, reflected)
    check_heartbeat(table, qualified, heartbeat)
    check_migrated(conn, reflected)
    check_row_security(conn, table, qualified)
    heartbeat_key = next((c.key for c in table.columns if c.name == heartbeat), None) if heartbeat else None
    updated = updated_column(reflected)
    limit_roles = limit_role_columns(reflected)
    inputs = tuple(
        c.key
        for c in table.columns
        if c.key not in ROLE_KEYS
        and c.key not in RETRY_COLUMNS
        and c.key != heartbeat_key
        and c.key != limit_roles["progress"]  # a retry starts with no progress of its own
        and not is_bookkeeping(c)
        and c.key != updated
        and not is_generated(c)
    )
    enum_name = reflected.status_enum
    status_type: sa.types.TypeEngine = _NamedType(status_sql_type(conn, table)) if enum_name else table.c.status.type
    _check_label(table, qualified, layout)
    error = table.c.error_message.type
    kind = id_kind(table)
    default = table.c.id.server_default
    own_default = str(default.arg) if default is not None and kind != "integer" else None
    schema = table.schema
    in_search_path = schema is not None and schema == conn.exec_driver_sql("SELECT current_schema()").scalar()
    return RunsTable(
        reflected,
        heartbeat_key,
        inputs,
        status_type,
        enum_name is not None,
        kind,
        id_sequence(conn, table) if kind == "integer" else None,
        "json" if isinstance(error, sa.JSON) else ("varchar" if getattr(error, "length", None) else "text"),
        getattr(error, "length", None) if not isinstance(error, sa.JSON) else None,
        own_default,
        table.name if in_search_path else None,
        updated,
        limit_roles["kind"],
        limit_roles["max_runtime"],
        limit_roles["progress"],
        priority_column(reflected),
    )


def _check_label(table: sa.Table, qualified: str, layout: Layout) -> None:
    """RUN_LABEL may name the table's columns, nothing else."""
    names = {c.name for c in table.columns}
    for _, column in label_fields(layout.label or ""):
        if column is not None and column not in names:
            choices = ", ".join("{" + n + "}" for n in sorted(names))
            raise ConfigError(f"RUN_LABEL: {{{column}}} is not a column of {qualified}; use some of {choices}")
