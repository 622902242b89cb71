"""What makes a runs table one stuck-runs can work with, checked on the reflected table.

Each check turns a table stuck-runs cannot work with into one line that says why and what to do.
`load_runs_table` and `migrate` apply the same checks, so a table every command would refuse is
refused before `migrate` changes anything. Columns are named here as the table names them.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from db.errors import ConfigError, NotMigrated, SchemaError
from db.layout import Layout, label_fields
from db.pauses import PAUSES
from db.table import DEAD_LETTERS_TABLE, RETRY_COLUMNS, dead_letters_name, quoted_relation, sql_type

_WRITTEN_ROLES = ("status", "error_message", "started_at", "completed_at")
_NEXTVAL = re.compile(r"nextval\('((?:[^']|'')+)'::regclass\)")
# Roles a table may lack before `migrate`, which adds them (SPEC §11).
ADDED_ROLES = {"completed_at": "TIMESTAMPTZ", "error_message": "TEXT"}


class CheckForbids(SchemaError):
    """A CHECK constraint on status forbids values stuck-runs writes: `migrate --extend-check` extends it."""


def _layout(table: sa.Table) -> Layout:
    return table.info.get("layout") or Layout()


def _name(table: sa.Table, role: str) -> str:
    return _layout(table).column(role)


def check_shape(conn: Connection, table: sa.Table, qualified: str) -> None:
    """Raises `SchemaError` for a table stuck-runs cannot work with, migrated or not."""
    layout = _layout(table)
    mapped = "COLUMN_MAP" if layout.columns else None
    for role in ("id", "status", "started_at"):
        if role not in table.c:
            name = layout.column(role)
            fix = f"map it with COLUMN_MAP={role}=<column>" if role not in layout.columns else "fix COLUMN_MAP"
            key = [c.name for c in table.primary_key.columns]
            if role == "id" and len(key) == 1:
                fix = f"its primary key is {key[0]}: set COLUMN_MAP=id={key[0]}"
            what = "no status column" if role == "status" and not mapped else f"no column {name} (the {role})"
            # A column COLUMN_MAP names that is not there is a setting to fix (exit 2), not the table.
            error = ConfigError if role in layout.columns else SchemaError
            raise error(f"table {qualified} has {what}: {fix}, or point SCRAPE_RUNS_TABLE at another table")
    _check_key(conn, table, qualified)
    for key in (*_WRITTEN_ROLES, *RETRY_COLUMNS):
        if key in table.c and table.c[key].computed is not None:
            raise SchemaError(
                f"{qualified}.{table.c[key].name} is a generated column: stuck-runs cannot write it; "
                "make it a plain column, or map another column in COLUMN_MAP"
            )
    for role in ("started_at", "completed_at"):
        if role in table.c and not isinstance(table.c[role].type, sa.DateTime):
            error = ConfigError if role in layout.columns else SchemaError
            raise error(
                f"{qualified}.{table.c[role].name} (the {role}) is {sql_type(table.c[role])}: stuck-runs needs a "
                "timestamp (with or without time zone); map another column in COLUMN_MAP"
            )
    if "error_message" in table.c:
        error = table.c.error_message
        wrong = ConfigError if "error_message" in layout.columns else SchemaError
        if not isinstance(error.type, (sa.String, sa.JSON)):
            raise wrong(
                f"{qualified}.{error.name} (the error_message) is {sql_type(error)}: stuck-runs writes text, "
                "varchar or json there; map another column in COLUMN_MAP"
            )
        length = getattr(error.type, "length", None)
        if length is not None and length < MIN_ERROR_LENGTH:
            raise wrong(
                f"{qualified}.{error.name} (the error_message) is varchar({length}): too short for stuck-runs' "
                f"messages (`Run stuck for 2.0h - retry 1/4 scheduled`); widen it to at least {MIN_ERROR_LENGTH}, "
                "or map another column"
            )
    _check_retry_columns(table, qualified)
    _check_written_columns(conn, table, qualified)
    _check_unique_inputs(conn, table, qualified)
    _check_status(conn, table, qualified)


MIN_ERROR_LENGTH = 64
# What stuck-runs' own columns must be, when a table already has one of that name.
_RETRY_TYPES = {
    "retry_count": (sa.Integer, "integer"),
    "max_retries": (sa.Integer, "integer"),
    "next_retry_at": (sa.DateTime, "a timestamp"),
    "is_retry": (sa.Boolean, "boolean"),
    "failure_pattern": (sa.String, "text"),
    "handed_off": (sa.String, "text"),
    "delivering_until": (sa.DateTime, "a timestamp"),
    "delivering_by": (sa.String, "text"),
    "postponements": (sa.Integer, "integer"),
}


def _check_retry_columns(table: sa.Table, qualified: str) -> None:
    """A column named like one stuck-runs adds, of another type, is the scraper's own: refused."""
    for name, (kind, wanted) in _RETRY_TYPES.items():
        if name in table.c and not isinstance(table.c[name].type, kind):
            raise SchemaError(
                f"{qualified}.{name} is {sql_type(table.c[name])}, but stuck-runs keeps its own {name} ({wanted}) "
                "there: rename the scraper's column, or point SCRAPE_RUNS_TABLE at another table"
            )
    if "original_run_id" in table.c and sql_type(table.c.original_run_id) != sql_type(table.c.id):
        raise SchemaError(
            f"{qualified}.original_run_id is {sql_type(table.c.original_run_id)}, but it must hold ids of "
            f"{table.c.id.name} ({sql_type(table.c.id)}): rename the scraper's column, or change its type"
        )


def _check_written_columns(conn: Connection, table: sa.Table, qualified: str) -> None:
    """The error and completion columns are stuck-runs' to write: refused when they are the scraper's
    data (named in RUN_LABEL, NOT NULL, or filled on running runs), which stuck-runs would overwrite."""
    layout = _layout(table)
    labelled = {column for _, column in label_fields(layout.label or "") if column}
    running = sa.cast(table.c.status, sa.Text).in_(layout.values("running"))
    for role in ("error_message", "completed_at"):
        if role not in table.c:
            continue
        column = table.c[role]
        why = None
        if column.name in labelled:
            why = "RUN_LABEL names it"
        elif not column.nullable:
            why = "it is NOT NULL, and a new attempt has none"
        elif conn.execute(sa.select(sa.literal(1)).where(running, column.is_not(None)).limit(1)).first():
            why = "running runs already hold values in it"
        if why:
            raise ConfigError(
                f"COLUMN_MAP: {qualified}.{column.name} cannot be the {role}: {why}, so it is the scraper's data "
                f"and stuck-runs would overwrite it; map a column for stuck-runs to write (migrate adds a missing one)"
            )


def _check_unique_inputs(conn: Connection, table: sa.Table, qualified: str) -> None:
    """A UNIQUE constraint on input columns alone: a retry copies them, so no retry could ever be created."""
    managed = {"id", *_WRITTEN_ROLES, *RETRY_COLUMNS}
    for columns in conn.execute(
        sa.text(
            "SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) "
            "WHERE i.indrelid = CAST(:rel AS regclass) AND i.indisunique AND NOT i.indisprimary "
            "AND i.indpred IS NULL AND 0 <> ALL (i.indkey) GROUP BY i.indexrelid"
        ),
        {"rel": quoted_relation(table)},
    ).scalars():
        keys = [next(c.key for c in table.columns if c.name == name) for name in columns]
        if not set(keys) & managed and not {"original_run_id", "retry_count"} <= set(keys):
            raise SchemaError(
                f"{qualified} has a UNIQUE constraint on ({', '.join(columns)}): a retry copies those columns, so "
                "no retry could be created; make it unique per attempt (add retry_count to it) or drop it"
            )


def id_kind(table: sa.Table) -> str:
    kind = table.c.id.type
    if isinstance(kind, sa.Uuid):
        return "uuid"
    if isinstance(kind, sa.Integer):
        return "integer"
    return "text"


def _check_key(conn: Connection, table: sa.Table, qualified: str) -> None:
    key = [c.name for c in table.primary_key.columns]
    id_name = table.c.id.name
    if key != [id_name]:
        if not key:
            raise SchemaError(
                f"table {qualified} has no primary key: stuck-runs finds runs by a unique id; add one "
                f"(ALTER TABLE … ADD PRIMARY KEY ({id_name}))"
            )
        fix = f"set COLUMN_MAP=id={key[0]}" if len(key) == 1 else "stuck-runs needs a one-column key"
        raise SchemaError(f"{qualified}.{id_name} is not the table's primary key ({', '.join(key)}): {fix}")
    column = table.c.id
    if not isinstance(column.type, (sa.Uuid, sa.Integer, sa.String)):
        raise SchemaError(f"{qualified}.{id_name} is {sql_type(column)}: stuck-runs takes UUID, integer or text ids")
    if isinstance(column.type, sa.Integer) and id_sequence(conn, table) is None:
        raise SchemaError(
            f"{qualified}.{id_name} is an integer without a sequence or identity: stuck-runs cannot number the "
            "retries it creates; make it serial or GENERATED BY DEFAULT AS IDENTITY"
        )


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


def _check_status(conn: Connection, table: sa.Table, qualified: str) -> None:
    status, layout = table.c.status, _layout(table)
    if not isinstance(status.type, sa.String):
        raise SchemaError(
            f"{qualified}.{status.name} (the status) is {sql_type(status)}: stuck-runs needs text, varchar or an enum"
        )
    limit = status.type.length
    for state in layout.written_states():
        value = layout.written(state)
        if limit is not None and len(value) > limit:
            error = ConfigError if state in layout.statuses else SchemaError
            raise error(
                f"{qualified}.{status.name} is varchar({limit}), too short for {state}={value!r}: map {state} to a "
                f"value of at most {limit} characters in STATUS_MAP, or widen the column"
            )
    lacking = check_lacks(conn, table)
    if lacking:
        name, _ = lacking
        raise CheckForbids(
            f"{qualified} has CHECK constraint {name} on {status.name} that forbids {_missing_values(conn, table)}: "
            "run `stuck-runs migrate --extend-check` to extend it (or `migrate --sql` to see the statements)"
        )


def status_constraints(conn: Connection, table: sa.Table) -> list[tuple[str, str]]:
    """The CHECK constraints on the status column: (name, definition)."""
    return [
        (name, definition)
        for name, definition in conn.execute(
            sa.text(
                "SELECT c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
                "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) "
                "WHERE c.conrelid = CAST(:rel AS regclass) AND c.contype = 'c' AND a.attname = :column "
                "ORDER BY c.conname"
            ),
            {"rel": quoted_relation(table), "column": table.c.status.name},
        )
    ]


def _written_values(table: sa.Table) -> list[str]:
    layout = _layout(table)
    return [layout.written(state) for state in layout.written_states()]


def _mapped_values(table: sa.Table) -> list[str]:
    """Every value the mapping names, written or only recognised (`indexing` of running=running|indexing)."""
    layout = _layout(table)
    return [value for state in layout.written_states() for value in layout.values(state)]


def allows(conn: Connection, definition: str, table: sa.Table, value: str) -> bool:
    """Whether a CHECK definition accepts `value` as the status (asked of PostgreSQL itself)."""
    expression = definition.removeprefix("CHECK ").removesuffix(" NOT VALID")
    probe = sa.text(f"SELECT {expression} FROM (SELECT CAST(:value AS text) AS {_quote(table.c.status.name)}) AS probe")
    return conn.execute(probe, {"value": value}).scalar_one() is not False


def _quote(name: str) -> str:
    return postgresql.dialect().identifier_preparer.quote(name)


def check_lacks(conn: Connection, table: sa.Table) -> tuple[str, str] | None:
    """The first CHECK constraint on status that forbids a value stuck-runs writes, if any."""
    for name, definition in status_constraints(conn, table):
        if any(not allows(conn, definition, table, v) for v in _written_values(table)):
            return name, definition
    return None


def _missing_values(conn: Connection, table: sa.Table) -> str:
    lacking = check_lacks(conn, table)
    if not lacking:
        return ""
    _, definition = lacking
    return ", ".join(repr(v) for v in _written_values(table) if not allows(conn, definition, table, v))


def extend_check_statements(conn: Connection, table: sa.Table) -> list[str]:
    """The statements that let every CHECK on status accept the values stuck-runs writes: each is
    re-created NOT VALID with those values allowed, then validated (no long lock for a scan)."""
    column = _quote(table.c.status.name)
    relation = quoted_relation(table)
    statements = []
    for name, definition in status_constraints(conn, table):
        missing = [v for v in _written_values(table) if not allows(conn, definition, table, v)]
        if not missing:
            if definition.endswith(" NOT VALID"):  # extended by an --extend-check stopped before its VALIDATE
                statements.append(f"ALTER TABLE {relation} VALIDATE CONSTRAINT {_quote(name)}")
            continue
        values = ", ".join("'" + v.replace("'", "''") + "'" for v in missing)
        expression = definition.removeprefix("CHECK ").removesuffix(" NOT VALID")
        statements += [
            f"ALTER TABLE {relation} DROP CONSTRAINT {_quote(name)}",
            f"ALTER TABLE {relation} ADD CONSTRAINT {_quote(name)} CHECK ({expression} OR {column} IN ({values})) "
            "NOT VALID",
            f"ALTER TABLE {relation} VALIDATE CONSTRAINT {_quote(name)}",
        ]
    return statements


def status_labels(conn: Connection, table: sa.Table) -> set[str]:
    """The values of the status enum (empty when status is not an enum)."""
    return set(
        conn.execute(
            sa.text(
                "SELECT e.enumlabel FROM pg_enum e JOIN pg_attribute a ON a.atttypid = e.enumtypid "
                "WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = :column"
            ),
            {"rel": quoted_relation(table), "column": table.c.status.name},
        ).scalars()
    )


def missing_enum_values(conn: Connection, table: sa.Table) -> list[str]:
    """The values stuck-runs writes that the status enum lacks (none when status is text)."""
    if not table.info["enum_names"].get("status"):
        return []
    labels = status_labels(conn, table)
    return [v for v in _mapped_values(table) if v not in labels]


def status_sql_type(conn: Connection, table: sa.Table) -> str:
    """The status column's type as SQL can name it (schema-qualified, quoted when needed)."""
    return conn.execute(
        sa.text(
            "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a "
            "WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = :column"
        ),
        {"rel": quoted_relation(table), "column": table.c.status.name},
    ).scalar_one()


def check_migrated(conn: Connection, table: sa.Table, qualified: str) -> None:
    """Raises `NotMigrated` when what `migrate` adds is not there yet."""
    missing = [c for c in RETRY_COLUMNS if c not in table.c]
    missing += [_name(table, role) for role in ADDED_ROLES if role not in table.c]
    missing += [f"status value {v!r}" for v in missing_enum_values(conn, table)]
    dead = dead_letters_name(table, id_kind(table)) if "id" in table.c else DEAD_LETTERS_TABLE
    inspector = sa.inspect(conn)
    missing += [name for name in (dead, PAUSES) if not missing and not inspector.has_table(name, schema=table.schema)]
    if missing:
        raise NotMigrated(f"table {qualified} is not migrated (missing {', '.join(missing)}): run `stuck-runs migrate`")


def heartbeat_candidates(table: sa.Table) -> list[str]:
    """The columns HEARTBEAT_COLUMN could name: timestamps that stuck-runs does not manage and can write."""
    managed = {"id", *_WRITTEN_ROLES, *RETRY_COLUMNS}
    return [
        c.name for c in table.columns if isinstance(c.type, sa.DateTime) and c.key not in managed and c.computed is None
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
    column = next((c for c in table.columns if c.name == heartbeat), None)
    if column is None:
        return f"{setting} is not a column of {qualified}: {fix}, or unset it"
    kind = sql_type(column)
    if column.key in {"id", *_WRITTEN_ROLES, *RETRY_COLUMNS}:
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


def row_security_problem(conn: Connection, table: sa.Table, qualified: str) -> str | None:
    """Why row-level security would make stuck-runs' statements see or change nothing, if it would.

    The connected role is exempt when it is a superuser, has BYPASSRLS, or owns the table (unless
    FORCE ROW LEVEL SECURITY); otherwise it needs a policy for each of SELECT, INSERT and UPDATE.
    """
    row = conn.execute(
        sa.text(
            "SELECT c.relrowsecurity, c.relforcerowsecurity, pg_has_role(current_user, c.relowner, 'USAGE'), "
            "r.rolsuper OR r.rolbypassrls, current_user FROM pg_class c, pg_roles r "
            "WHERE c.oid = CAST(:rel AS regclass) AND r.rolname = current_user"
        ),
        {"rel": quoted_relation(table)},
    ).one()
    enabled, forced, owner, bypasses, role = row
    if not enabled or bypasses or (owner and not forced):
        return None
    covered = set(
        conn.execute(
            sa.text(
                "SELECT DISTINCT p.cmd FROM pg_policies p WHERE p.schemaname = coalesce(:schema, current_schema()) "
                "AND p.tablename = :name AND p.permissive = 'PERMISSIVE' AND ('public' = ANY (p.roles) OR EXISTS "
                "(SELECT 1 FROM unnest(p.roles) AS r(name) WHERE pg_has_role(current_user, r.name, 'MEMBER')))"
            ),
            {"schema": table.schema, "name": table.name},
        ).scalars()
    )
    lacking = [cmd for cmd in ("SELECT", "INSERT", "UPDATE") if cmd not in covered and "ALL" not in covered]
    if not lacking:
        return None
    return (
        f"{qualified} has row-level security and role {role} has no {'/'.join(lacking)} policy on it: its "
        f"statements would see or change nothing, silently; CREATE POLICY … FOR {lacking[0]} TO {role}, "
        "or connect as a role with BYPASSRLS"
    )


def check_row_security(conn: Connection, table: sa.Table, qualified: str) -> None:
    problem = row_security_problem(conn, table, qualified)
    if problem:
        raise SchemaError(problem)
