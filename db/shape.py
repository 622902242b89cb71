"""What makes a runs table one stuck-runs can work with, checked on the reflected table.

Each check turns a table stuck-runs cannot work with into one line that says why and what to do.
`load_runs_table` and `migrate` apply the same checks, so a table every command would refuse is
refused before `migrate` changes anything. Columns are named here as the table names them.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.errors import ConfigError, NotMigrated, SchemaError
from db.layout import RETRY_COLUMNS, Layout, label_fields
from db.pauses import PAUSES
from db.reflect import (
    DEAD_LETTERS_TABLE,
    Reflected,
    dead_letters_name,
    id_kind,
    id_sequence,
    quoted_relation,
    reflect_table,
    sql_type,
)
from db.status_values import check_lacks, extend_check_statements, in_values, missing_enum_values, missing_values

_WRITTEN_ROLES = ("status", "error_message", "started_at", "completed_at")
# Roles a table may lack before `migrate`, which adds them (SPEC §11).
ADDED_ROLES = {"completed_at": "TIMESTAMPTZ", "error_message": "TEXT"}


class CheckForbids(SchemaError):
    """A CHECK constraint on status forbids values stuck-runs writes: `migrate --extend-check` extends it."""


def check_shape(conn: Connection, reflected: Reflected) -> None:
    """Raises `SchemaError` for a table stuck-runs cannot work with, migrated or not."""
    table, qualified, layout = reflected.table, reflected.qualified, reflected.layout
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
    _check_written_columns(conn, reflected)
    _check_unique_inputs(conn, table, qualified)
    _check_status(conn, reflected)


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


def _check_written_columns(conn: Connection, reflected: Reflected) -> None:
    """The error and completion columns are stuck-runs' to write: refused when they are the scraper's
    data (named in RUN_LABEL, NOT NULL, or filled on running runs), which stuck-runs would overwrite."""
    table, qualified, layout = reflected.table, reflected.qualified, reflected.layout
    labelled = {column for _, column in label_fields(layout.label or "") if column}
    values = layout.values("running")
    if reflected.status_enum:
        running = sa.cast(table.c.status, sa.Text).in_(values)  # a value the enum lacks is no error
    else:  # as the running runs' partial index says it, so it can serve
        running = in_values(table.c.status, values)
    # Which of the two columns running runs hold values in, in one walk of the running runs (their
    # partial index): a mass event leaves a tenth of a big table running, each walk reads them all
    # to find none, and a walk per column was two at every command's start.
    roles = [role for role in ("error_message", "completed_at") if role in table.c]
    held: dict[str, bool] | None = None
    for role in roles:
        column = table.c[role]
        why = None
        if column.name in labelled:
            why = "RUN_LABEL names it"
        elif not column.nullable:
            why = "it is NOT NULL, and a new attempt has none"
        else:
            held = held if held is not None else _held_by_running(conn, table, running, roles)
            if held[role]:
                why = "running runs already hold values in it"
        if why:
            raise ConfigError(
                f"COLUMN_MAP: {qualified}.{column.name} cannot be the {role}: {why}, so it is the scraper's data "
                f"and stuck-runs would overwrite it; map a column for stuck-runs to write (migrate adds a missing one)"
            )


def _held_by_running(
    conn: Connection, table: sa.Table, running: sa.ColumnElement[bool], roles: list[str]
) -> dict[str, bool]:
    """For each role's column, whether a running run holds a value in it."""
    filled = [table.c[role].is_not(None) for role in roles]
    found = sa.select(*(sa.func.coalesce(sa.func.bool_or(f), False) for f in filled)).where(running, sa.or_(*filled))
    return dict(zip(roles, conn.execute(found).one(), strict=True))


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


def _check_status(conn: Connection, reflected: Reflected) -> None:
    qualified, status, layout = reflected.qualified, reflected.table.c.status, reflected.layout
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
    lacking = check_lacks(conn, reflected)
    if lacking:
        name, _ = lacking
        raise CheckForbids(
            f"{qualified} has CHECK constraint {name} on {status.name} that forbids {missing_values(conn, reflected)}: "
            "run `stuck-runs migrate --extend-check` to extend it (or `migrate --sql` to see the statements)"
        )


def check_migrated(conn: Connection, reflected: Reflected) -> None:
    """Raises `NotMigrated` when what `migrate` adds is not there yet."""
    table, qualified = reflected.table, reflected.qualified
    missing = [c for c in RETRY_COLUMNS if c not in table.c]
    missing += [reflected.layout.column(role) for role in ADDED_ROLES if role not in table.c]
    missing += [f"status value {v!r}" for v in missing_enum_values(conn, reflected)]
    dead = dead_letters_name(table, id_kind(table)) if "id" in table.c else DEAD_LETTERS_TABLE
    if not missing:
        present = _tables_present(conn, (dead, PAUSES), table.schema)
        missing += [name for name in (dead, PAUSES) if name not in present]
    if missing:
        raise NotMigrated(f"table {qualified} is not migrated (missing {', '.join(missing)}): run `stuck-runs migrate`")


def _tables_present(conn: Connection, names: tuple[str, ...], schema: str | None) -> set[str]:
    """Which of `names` are tables or views in `schema` (without one: visible on the search path), as
    SQLAlchemy's `has_table` says of each, in one round trip rather than one per name."""
    where = "n.nspname = :schema" if schema else "pg_catalog.pg_table_is_visible(c.oid)"
    return set(
        conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                f"WHERE c.relname = ANY (CAST(:names AS text[])) AND c.relkind IN ('r', 'p', 'f', 'v', 'm') AND {where}"
            ),
            {"names": list(names), **({"schema": schema} if schema else {})},
        ).scalars()
    )


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


def check_migratable(
    conn: Connection,
    qualified: str,
    heartbeat: str | None = None,
    layout: Layout | None = None,
    *,
    extend_check: bool = False,
) -> Reflected:
    """Raises what makes the migration impossible or useless, before any change: every check
    `load_runs_table` applies to the table and the heartbeat, and duplicate retry rows that the
    unique index would reject. A CHECK on status that forbids stuck-runs' values is refused with
    the statements that extend it, unless `extend_check` (the caller extends it). Returns the
    reflected table."""
    reflected = reflect_table(conn, qualified, layout)
    table = reflected.table
    try:
        check_shape(conn, reflected)
    except CheckForbids:
        lacking = check_lacks(conn, reflected)
        if not extend_check and lacking:
            statements = "\n".join(f"  {sql};" for sql in extend_check_statements(conn, reflected))
            raise SchemaError(
                f"{qualified} has CHECK constraint {lacking[0]} on {table.c.status.name} that forbids values "
                "stuck-runs writes: run `stuck-runs migrate --extend-check` to run these statements (NOT VALID, "
                f"then VALIDATE: no long lock), or run them yourself:\n{statements}"
            ) from None
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
    return reflected
