"""What the revisions are rendered from: the planned table (`TablePlan`: its names from the mapping,
its id's SQL type, where its dead letters go), stuck-runs' names for its indexes and version
table, and the `Step`, one named idempotent statement of a revision. Only `plan_for` reads the
database (the id's SQL type); a plan without one is what `migrate --sql` prints with no URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect

from db.layout import Layout
from db.reflect import DEAD_LETTERS_TABLE, Reflected, dead_letters_name, id_kind, quoted_relation, split_name
from db.shape import ADDED_ROLES
from db.status_values import in_values

# DDL is run and printed as text: a dialect that does not double `%` (no parameters follow).
_DDL = postgresql.dialect(paramstyle="named")


@dataclass(frozen=True)
class TablePlan:
    """What the revisions need to know of the table: its names (from the mapping), its id's SQL
    type, where its dead letters go. Without a database (`migrate --sql`, no URL): UUID ids."""

    qualified: str
    layout: Layout = field(default_factory=Layout)
    id_type: str = "UUID"
    dead_letters: str = DEAD_LETTERS_TABLE
    missing_roles: tuple[str, ...] = ()  # completed_at / error_message columns migrate adds

    def column(self, role: str) -> str:
        return postgresql.dialect().identifier_preparer.quote(self.layout.column(role))

    def in_state(self, state: str) -> str:
        """The statements' predicate for `state` (`in_values`), compiled for a partial index's WHERE:
        the index must say what the queries say for the planner to use it. Its values are plain
        literals (PostgreSQL compares an enum column with them as it does with the queries' casts)."""
        predicate = in_values(sa.column(self.layout.column("status")), self.layout.values(state))
        return str(predicate.compile(dialect=_DDL, compile_kwargs={"literal_binds": True}))

    @property
    def enum_values(self) -> tuple[str, ...]:
        """The values stuck-runs writes and a status enum may lack (the scraper's own it has)."""
        states = ("pending_retry", "cancelled", "running", "completed", "failed")
        states += ("queued",) if "queued" in self.layout.statuses else ()
        return tuple(value for state in states for value in self.layout.values(state))

    @property
    def enum_step(self) -> str:
        return "status enum values " + ", ".join(self.enum_values)


def plan_for(conn: Connection, reflected: Reflected) -> TablePlan:
    table = reflected.table
    kind = id_kind(table)
    return TablePlan(
        reflected.qualified,
        reflected.layout,
        id_type=conn.execute(
            sa.text(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = :column"
            ),
            {"rel": quoted_relation(table), "column": table.c.id.name},
        ).scalar_one(),
        dead_letters=dead_letters_name(table, kind),
        missing_roles=tuple(role for role in ADDED_ROLES if role not in table.c),
    )


def version_table_for(qualified: str) -> tuple[str, str | None]:
    """stuck-runs' own Alembic version table, next to the table it migrates."""
    schema, name = split_name(qualified)
    return f"stuck_runs_alembic_{name}"[:63], schema


def index_names(qualified: str) -> dict[str, str]:
    """stuck-runs' index names for the table: lower case, so they need no quoting (`ScrapingJob`)."""
    _, name = split_name(qualified)
    name = name.lower()
    return {
        "running": f"ix_{name}_running_started_at"[:63],
        "pending": f"ix_{name}_pending_next_retry_at"[:63],
        "chain": f"ix_{name}_original_run_id"[:63],
        "unique_retry": f"ux_{name}_chain_retry"[:63],
        "stats": f"ix_{name}_ended_attempts"[:63],
        "newest": f"ix_{name}_newest_first"[:63],
        "handed_off": f"ix_{name}_handed_off"[:63],
        "fleet_failed": f"ix_{name}_fleet_failed"[:63],
    }


def quote_table(dialect: Dialect, qualified: str) -> str:
    schema, name = split_name(qualified)
    quote = dialect.identifier_preparer.quote
    return f"{quote(schema)}.{quote(name)}" if schema else quote(name)


def own_table_prefix(dialect: Dialect, qualified: str) -> str:
    """Where stuck-runs' own tables go: the runs table's schema, quoted, with its dot (`"crawler".`),
    or nothing for a table in the search path."""
    schema = qualified.rpartition(".")[0]
    return f"{dialect.identifier_preparer.quote(schema)}." if schema else ""


@dataclass(frozen=True)
class Step:
    """One idempotent statement of a revision, named by what it creates ("column retry_count",
    "index ix_..."), so `migrate` and `migrate --sql` leave out what a database already has."""

    creates: str
    sql: str
    concurrent: bool = False  # must run outside a transaction (CONCURRENTLY, ALTER TYPE ... ADD VALUE)
