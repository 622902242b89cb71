"""`stuck-runs migrate`: Alembic, with checks first so an impossible table gets a clear message.

The revisions live in `db/migrations/versions`, each a list of idempotent, named `Step`s; `--sql`
prints the same steps (those a database lacks, when it can be asked) for a DBA to run by hand.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
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
from db.layout import Layout
from db.reflect import (
    DEAD_LETTERS_TABLE,
    Reflected,
    dead_letters_name,
    id_kind,
    quoted_relation,
    reflect_table,
    split_name,
)
from db.shape import ADDED_ROLES, CheckForbids, check_heartbeat, check_shape
from db.status_values import check_lacks, extend_check_statements, status_labels
from db.table import in_values

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Fail fast instead of queueing behind a long transaction and blocking the scraper's writes.
LOCK_TIMEOUT = "SET LOCAL lock_timeout = '10s'"
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


@dataclass(frozen=True)
class MigrateResult:
    table: str
    before: str | None
    after: str | None
    added: tuple[str, ...] = ()  # what a table already at the newest revision lacked (a mapping changed)

    @property
    def changed(self) -> bool:
        return self.before != self.after or bool(self.added)


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


class MigrationStopped(Exception):
    """A signal asked `migrate` to stop; it did between two statements. Running it again finishes."""


def stop_point(stop: threading.Event | None, after: str) -> None:
    """Where `migrate` may stop: between statements, never inside one."""
    if stop is not None and stop.is_set():
        raise MigrationStopped(after)


def apply_steps(op: Any, steps: list[Step], stop: threading.Event | None = None) -> None:
    """Runs a revision's steps: the transactional ones first (rolled back together when stopped),
    then the concurrent ones, each a statement of its own."""
    transactional = [s for s in steps if not s.concurrent]
    if transactional:
        op.execute(LOCK_TIMEOUT)
        for step in transactional:
            stop_point(stop, "nothing: the columns and tables were rolled back")
            op.execute(step.sql)
    concurrent = [s for s in steps if s.concurrent]
    done = [s.creates for s in transactional]
    if concurrent:
        with op.get_context().autocommit_block():
            for step in concurrent:
                stop_point(stop, ", ".join(done))
                op.execute(step.sql)
                done.append(step.creates)


def revision_steps(plan: TablePlan) -> list[tuple[str, list[Step]]]:
    """Each revision, oldest first, with its steps for the planned table."""
    scripts = reversed(list(ScriptDirectory.from_config(_config(plan.qualified)).walk_revisions()))
    dialect = postgresql.dialect()
    return [(script.revision, script.module.steps(plan, dialect)) for script in scripts]


def migration_sql(plan: TablePlan, present: frozenset[str] = frozenset(), invalid: tuple[str, ...] = ()) -> str:
    """The DDL `migrate` would run, as a script a DBA can review and run with psql.

    Every statement is idempotent, the revision record included. Steps whose `creates` is in
    `present` are left out; `invalid` indexes (a failed CONCURRENTLY build) are dropped first
    so they are built again. Connects to nothing.
    """
    qualified = plan.qualified
    revisions = revision_steps(plan)
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


def script_for_dba(url: str | None, qualified: str, heartbeat: str | None = None, layout: Layout | None = None) -> str:
    """`migrate --sql`: what the database lacks, after the checks `migrate` makes, when it can be
    asked; else (no URL, or unreachable) the full idempotent script, saying why at the top. A CHECK
    on status that forbids values stuck-runs writes: the statements that extend it come first."""
    layout = layout or Layout()
    if not url:
        return _full_script(TablePlan(qualified, layout), "DATABASE_URL is not set")
    engine = make_engine(url, role="migrate", pool_size=1)
    try:
        with database_errors(engine, "reading what is already migrated"), engine.connect() as conn:
            reflected = check_migratable(conn, qualified, heartbeat, layout, extend_check=True)
            extend = extend_check_statements(conn, reflected)
            plan = plan_for(conn, reflected)
            stale = stale_indexes(conn, plan)
            present = present_objects(conn, reflected.table, plan) - {f"index {name.split('.')[-1]}" for name in stale}
            invalid = (*_invalid_indexes(conn, qualified), *stale)
    except DatabaseUnavailable as exc:
        return _full_script(TablePlan(qualified, layout), str(exc))
    finally:
        engine.dispose()
    where, head = f"{qualified} at {redacted(engine.url)}", head_revision()
    # A text status has no enum to extend: that step is not needed, nor is it there.
    needless = frozenset() if reflected.status_enum else frozenset({plan.enum_step})
    sql = migration_sql(plan, present | needless, invalid)
    if extend:
        sql = _extend_check_script(extend) + sql
    if not sql:
        return f"-- {where} has everything up to revision {head}: nothing to run.\n"
    made = [step.creates for _, steps in revision_steps(plan) for step in steps]
    there = [name for name in made if name in present]
    already = f"-- Already there: {', '.join(there)}.\n" if there else ""
    return f"-- What {where} lacks to reach revision {head}.\n{already}\n{sql}"


def _extend_check_script(statements: list[str]) -> str:
    """The CHECK on status re-created NOT VALID, then validated in its own transaction."""
    validate = [s for s in statements if " VALIDATE CONSTRAINT " in s]
    recreate = [s for s in statements if s not in validate]
    lines = ["-- The CHECK on status forbids values stuck-runs writes: extend it (`migrate --extend-check`)."]
    lines += ["BEGIN;", f"{LOCK_TIMEOUT};", *(f"{sql};" for sql in recreate), "COMMIT;"]
    lines += [f"{sql};" for sql in validate]
    return "\n\n".join(lines) + "\n\n"


def _full_script(plan: TablePlan, reason: str) -> str:
    return (
        f"-- {reason}.\n-- So this is the full script for {plan.qualified} up to revision {head_revision()}: every\n"
        "-- statement is idempotent, safe to run on a database that has some or all of it.\n\n" + migration_sql(plan)
    )


def present_objects(conn: Connection, table: sa.Table, plan: TablePlan) -> frozenset[str]:
    """What of the migration the database already has, named as `Step.creates` names it."""
    found = {f"column {column.name}" for column in table.columns}
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
    if not set(plan.enum_values) - status_labels(conn, table):
        found.add(plan.enum_step)
    if current_revision(conn, plan.qualified) == head_revision():
        found.add(f"revision {head_revision()}")
    return frozenset(found)


def migrate(
    engine: Engine,
    qualified: str,
    heartbeat: str | None = None,
    layout: Layout | None = None,
    *,
    extend_check: bool = False,
    stop: threading.Event | None = None,
) -> MigrateResult:
    """Brings `qualified` up to the newest revision; a second call changes nothing.

    A table that `load_runs_table` would refuse is refused before the first statement. A CHECK on
    status that forbids values stuck-runs writes is refused with the statements that extend it,
    or, with `extend_check`, extended first (re-created NOT VALID, then validated). With `stop` set
    (a signal), it stops between two statements and raises `MigrationStopped`; running it again
    finishes the work, every step being idempotent.
    """
    layout = layout or Layout()
    with database_errors(engine, f"migrating {qualified}"), engine.connect() as conn:
        reflected = check_migratable(conn, qualified, heartbeat, layout, extend_check=extend_check)
        extended: tuple[str, ...] = ()
        if extend_check:
            statements = extend_check_statements(conn, reflected)
            conn.commit()  # this session's reads hold a lock the ALTER TABLE would wait for
            _extend_check(engine, statements, stop)
            extended = tuple(f"CHECK {s.split(' CONSTRAINT ')[1]}" for s in statements if " VALIDATE " in s)
            reflected = check_migratable(conn, qualified, heartbeat, layout)
        plan = plan_for(conn, reflected)
        _drop_invalid_indexes(engine, conn, qualified, plan)
        before = current_revision(conn, qualified)
        conn.commit()
        try:
            command.upgrade(_config(qualified, connection=conn, plan=plan, stop=stop), "head")
        except OperationalError as exc:
            if "lock timeout" in str(exc):
                raise DatabaseUnavailable(
                    f"{qualified} stayed locked by another transaction for 10s; run `stuck-runs migrate` again "
                    "when the long transaction has finished (see pg_stat_activity)"
                ) from None
            raise
        after = current_revision(conn, qualified)
        conn.commit()
        added = _complete(engine, conn, qualified, layout, stop) if before == after else ()
    return MigrateResult(qualified, before, after, extended + added)


def _complete(
    engine: Engine, conn: Connection, qualified: str, layout: Layout, stop: threading.Event | None = None
) -> tuple[str, ...]:
    """Runs the steps a table at the newest revision still lacks: a mapping changed since it was
    migrated (a new status value for the enum, a newly mapped error column). Every step is idempotent."""
    reflected = reflect_table(conn, qualified, layout)
    plan = plan_for(conn, reflected)
    present = present_objects(conn, reflected.table, plan)
    needless = set() if reflected.status_enum else {plan.enum_step}
    missing = [
        step
        for _, steps in revision_steps(plan)
        for step in steps
        if step.creates not in present and step.creates not in needless
    ]
    conn.commit()
    transactional = [step for step in missing if not step.concurrent]
    if transactional:
        with engine.begin() as run:
            run.exec_driver_sql(LOCK_TIMEOUT)
            for step in transactional:
                stop_point(stop, "nothing: the columns were rolled back")
                run.exec_driver_sql(step.sql)
    done = [step.creates for step in transactional]
    concurrent = [step for step in missing if step.concurrent]
    if concurrent:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as run:
            for step in concurrent:
                stop_point(stop, ", ".join(done))
                run.exec_driver_sql(step.sql)
                done.append(step.creates)
    return tuple(done)


def _extend_check(engine: Engine, statements: list[str], stop: threading.Event | None = None) -> None:
    """Re-creates the CHECK NOT VALID (a brief lock, no scan), then validates it (no write lock)."""
    if not statements:
        return
    validate = [s for s in statements if " VALIDATE CONSTRAINT " in s]
    with engine.begin() as conn:
        conn.exec_driver_sql(LOCK_TIMEOUT)
        for sql in statements:
            if sql not in validate:
                conn.exec_driver_sql(sql)
    with engine.begin() as conn:
        for sql in validate:
            stop_point(stop, "the CHECK's re-creation (NOT VALID; the next migrate --extend-check validates it)")
            conn.exec_driver_sql(sql)


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


def stale_indexes(conn: Connection, plan: TablePlan) -> list[str]:
    """stuck-runs' partial indexes built for another mapping (STATUS_MAP or the started_at column
    changed since): the sweeps' predicates no longer match them, so PostgreSQL would scan the table.
    Judged by the status values their predicate names and the column they index; schema-qualified."""
    schema, _ = split_name(plan.qualified)
    names = index_names(plan.qualified)
    wanted = {
        names["running"]: (set(plan.layout.values("running")), f"({plan.column('started_at')})"),
        names["pending"]: (set(plan.layout.values("pending_retry")), "(next_retry_at)"),
        names["fleet_failed"]: (set(plan.layout.values("failed")), f"({plan.column('started_at')})"),
    }
    found = conn.execute(
        sa.text(
            "SELECT c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname), "
            "pg_get_expr(i.indpred, i.indrelid), pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = ANY (:names) AND n.nspname = coalesce(:schema, current_schema())"
        ),
        {"names": list(wanted), "schema": schema},
    ).all()
    stale = []
    for name, qualified_name, predicate, definition in found:
        values, key = wanted[name]
        named = {v.replace("''", "'") for v in _LITERAL.findall(predicate or "")}
        if named != values or key not in definition:
            stale.append(qualified_name)
    return stale


_LITERAL = re.compile(r"'((?:[^']|'')*)'")


def _drop_invalid_indexes(engine: Engine, conn: Connection, qualified: str, plan: TablePlan | None = None) -> None:
    """A CONCURRENTLY build that failed leaves an invalid index IF NOT EXISTS would keep; an index
    built for another mapping is dropped too, so the steps build it again for this one."""
    invalid = _invalid_indexes(conn, qualified) + (stale_indexes(conn, plan) if plan else [])
    conn.commit()
    if invalid:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as autocommit:
            for name in invalid:
                autocommit.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
