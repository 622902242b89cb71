"""The values a status column accepts: the CHECK constraints on it, and its enum's labels.

A CHECK or an enum may lack values stuck-runs writes (STATUS_MAP's, `pending_retry`...): these
find them, asking PostgreSQL itself whether a CHECK accepts a value, and give the statements that
extend a CHECK (`migrate --extend-check`).
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from db.layout import Layout
from db.reflect import Reflected, quoted_relation


def status_value(value: str, enum: sa.types.TypeEngine | None = None) -> sa.ColumnElement:
    """A status value as SQL: cast to the status enum, or a plain literal for a text column."""
    return sa.cast(sa.literal(value, sa.Text), enum) if enum is not None else sa.literal(value)


def in_values(
    column: sa.ColumnElement, values: tuple[str, ...], value: Callable[[str], sa.ColumnElement] = status_value
) -> sa.ColumnElement:
    """`column` holds one of `values` (those that mean one state): the predicate of every statement,
    and, compiled, of the partial indexes (db.migrate), which must say the same for the planner to use them."""
    if len(values) == 1:
        return column == value(values[0])
    return column.in_([value(v) for v in values])


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


def _written_values(layout: Layout) -> list[str]:
    return [layout.written(state) for state in layout.written_states()]


def _mapped_values(layout: Layout) -> list[str]:
    """Every value the mapping names, written or only recognised (`indexing` of running=running|indexing)."""
    return [value for state in layout.written_states() for value in layout.values(state)]


def allows(conn: Connection, definition: str, table: sa.Table, value: str) -> bool:
    """Whether a CHECK definition accepts `value` as the status (asked of PostgreSQL itself)."""
    expression = definition.removeprefix("CHECK ").removesuffix(" NOT VALID")
    probe = sa.text(f"SELECT {expression} FROM (SELECT CAST(:value AS text) AS {_quote(table.c.status.name)}) AS probe")
    return conn.execute(probe, {"value": value}).scalar_one() is not False


def _quote(name: str) -> str:
    return postgresql.dialect().identifier_preparer.quote(name)


def check_lacks(conn: Connection, reflected: Reflected) -> tuple[str, str] | None:
    """The first CHECK constraint on status that forbids a value stuck-runs writes, if any."""
    table = reflected.table
    for name, definition in status_constraints(conn, table):
        if any(not allows(conn, definition, table, v) for v in _written_values(reflected.layout)):
            return name, definition
    return None


def missing_values(conn: Connection, reflected: Reflected) -> str:
    """The values stuck-runs writes that the first CHECK on status forbids, quoted, for a message."""
    lacking = check_lacks(conn, reflected)
    if not lacking:
        return ""
    _, definition = lacking
    written = _written_values(reflected.layout)
    return ", ".join(repr(v) for v in written if not allows(conn, definition, reflected.table, v))


def extend_check_statements(conn: Connection, reflected: Reflected) -> list[str]:
    """The statements that let every CHECK on status accept the values stuck-runs writes: each is
    re-created NOT VALID with those values allowed, then validated (no long lock for a scan)."""
    table = reflected.table
    column = _quote(table.c.status.name)
    relation = quoted_relation(table)
    statements = []
    for name, definition in status_constraints(conn, table):
        missing = [v for v in _written_values(reflected.layout) if not allows(conn, definition, table, v)]
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


def missing_enum_values(conn: Connection, reflected: Reflected) -> list[str]:
    """The values stuck-runs writes that the status enum lacks (none when status is text)."""
    if not reflected.status_enum:
        return []
    labels = status_labels(conn, reflected.table)
    return [v for v in _mapped_values(reflected.layout) if v not in labels]
