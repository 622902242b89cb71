"""`stuck-runs migrate`: checks first, so an impossible table gets a clear message, then the steps
the database lacks.

The revisions live in `db/migrations/versions` (Alembic scripts, read for their order), each a
list of idempotent, named `Step`s. One `Pending` is what a database lacks to reach the newest
revision, its record in stuck-runs' Alembic version table included: `migrate` applies it,
`migrate --sql` prints it for a DBA to run by hand (all of it when no database can be asked).
No revision is reversible: the columns may predate stuck-runs and hold the chains' history, so
dropping them is a DBA's decision, not a migration tool's.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from db.engine import database_errors, make_engine, redacted
from db.errors import DatabaseUnavailable
from db.layout import Layout
from db.migration_plan import Step, TablePlan, index_names, plan_for, quote_table, version_table_for
from db.reflect import Reflected, split_name
from db.shape import check_migratable
from db.status_values import extend_check_statements, status_labels

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Fail fast instead of queueing behind a long transaction and blocking the scraper's writes.
LOCK_TIMEOUT = "SET LOCAL lock_timeout = '10s'"


@dataclass(frozen=True)
class MigrateResult:
    table: str
    before: str | None
    after: str | None
    added: tuple[str, ...] = ()  # what a table already at the newest revision lacked (a mapping changed)

    @property
    def changed(self) -> bool:
        return self.before != self.after or bool(self.added)


def _scripts(qualified: str) -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["table"] = qualified
    return ScriptDirectory.from_config(config)


def head_revision() -> str | None:
    return _scripts("scrape_runs").get_current_head()


def current_revision(conn: Connection, qualified: str) -> str | None:
    version_table, schema = version_table_for(qualified)
    context = MigrationContext.configure(conn, opts={"version_table": version_table, "version_table_schema": schema})
    return context.get_current_revision()


class MigrationStopped(Exception):
    """A signal asked `migrate` to stop; it did between two statements. Running it again finishes."""


def stop_point(stop: threading.Event | None, after: str) -> None:
    """Where `migrate` may stop: between statements, never inside one."""
    if stop is not None and stop.is_set():
        raise MigrationStopped(after)


def revision_steps(plan: TablePlan) -> list[tuple[str, list[Step]]]:
    """Each revision, oldest first, with its steps for the planned table."""
    scripts = reversed(list(_scripts(plan.qualified).walk_revisions()))
    dialect = postgresql.dialect()
    return [(script.revision, script.module.steps(plan, dialect)) for script in scripts]


@dataclass(frozen=True)
class Pending:
    """What a database lacks, in the order it is applied and printed: the transactional steps (one
    transaction, rolled back together), the concurrent ones (each a statement of its own), then the
    revision's record (one transaction, after everything it records)."""

    transactional: tuple[Step, ...]
    concurrent: tuple[Step, ...]
    record: tuple[str, ...]


def pending(plan: TablePlan, present: frozenset[str] = frozenset()) -> Pending:
    """The steps whose `creates` is not in `present`, and the record of the newest revision unless
    it is there. Every statement is idempotent, the record included."""
    revisions = revision_steps(plan)
    steps = [step for _, revision in revisions for step in revision if step.creates not in present]
    head = revisions[-1][0]
    older = [revision for revision, _ in revisions[:-1]]
    record = () if f"revision {head}" in present else _record_revision(plan.qualified, head, older)
    return Pending(tuple(s for s in steps if not s.concurrent), tuple(s for s in steps if s.concurrent), tuple(record))


def _record_revision(qualified: str, head: str, older: list[str]) -> list[str]:
    """stuck-runs' Alembic version table brought to `head`, written so that running it again changes nothing."""
    name, schema = version_table_for(qualified)
    dialect = postgresql.dialect()
    table = quote_table(dialect, f"{schema}.{name}" if schema else name)
    # The key's name as Alembic gives it, quoted as Alembic quotes it (`ScrapingJob`'s keeps its case).
    key = dialect.identifier_preparer.quote(f"{name}_pkc"[:63])
    earlier = ", ".join(f"'{rev}'" for rev in older) or "NULL"
    return [
        f"CREATE TABLE IF NOT EXISTS {table} (\n    version_num VARCHAR(32) NOT NULL,\n"
        f"    CONSTRAINT {key} PRIMARY KEY (version_num)\n)",
        f"UPDATE {table} SET version_num = '{head}' WHERE version_num IN ({earlier})",
        f"INSERT INTO {table} (version_num) SELECT '{head}' WHERE NOT EXISTS (SELECT 1 FROM {table})",
    ]


def apply(engine: Engine, steps: Pending, stop: threading.Event | None = None) -> tuple[str, ...]:
    """Runs what `pending` found, as `migration_sql` prints it; returns what the steps created.
    With `stop` set it stops between two statements (`MigrationStopped` says what was done)."""
    if steps.transactional:
        with engine.begin() as conn:
            conn.exec_driver_sql(LOCK_TIMEOUT)
            for step in steps.transactional:
                stop_point(stop, "nothing: the columns and tables were rolled back")
                conn.exec_driver_sql(step.sql)
    done = [step.creates for step in steps.transactional]
    if steps.concurrent:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for step in steps.concurrent:
                stop_point(stop, ", ".join(done))
                conn.exec_driver_sql(step.sql)
                done.append(step.creates)
    if steps.record:
        stop_point(stop, ", ".join(done))
        with engine.begin() as conn:
            for sql in steps.record:
                conn.exec_driver_sql(sql)
    return tuple(done)


def migration_sql(plan: TablePlan, present: frozenset[str] = frozenset(), invalid: tuple[str, ...] = ()) -> str:
    """What `apply` would run, as a script a DBA can review and run with psql.

    Steps whose `creates` is in `present` are left out; `invalid` indexes (a failed CONCURRENTLY
    build, or one built for another mapping) are dropped first so they are built again. Connects to nothing.
    """
    steps = pending(plan, present)
    lines: list[str] = []
    if steps.transactional:
        lines += ["BEGIN;", f"{LOCK_TIMEOUT};", *(f"{s.sql};" for s in steps.transactional), "COMMIT;"]
    lines += [f"DROP INDEX CONCURRENTLY IF EXISTS {name};" for name in invalid]
    lines += [f"{s.sql};" for s in steps.concurrent]
    if steps.record:
        lines += ["BEGIN;", *(f"{sql};" for sql in steps.record), "COMMIT;"]
    return "\n\n".join(lines) + "\n" if lines else ""


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
            present = present_objects(conn, reflected, plan) - {f"index {name.split('.')[-1]}" for name in stale}
            invalid = (*_invalid_indexes(conn, qualified), *stale)
    except DatabaseUnavailable as exc:
        return _full_script(TablePlan(qualified, layout), str(exc))
    finally:
        engine.dispose()
    where, head = f"{qualified} at {redacted(engine.url)}", head_revision()
    sql = migration_sql(plan, present | _needless(reflected, plan), invalid)
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


def _needless(reflected: Reflected, plan: TablePlan) -> frozenset[str]:
    """Steps a table does not need: a text status has no enum to extend."""
    return frozenset() if reflected.status_enum else frozenset({plan.enum_step})


def present_objects(conn: Connection, reflected: Reflected, plan: TablePlan) -> frozenset[str]:
    """What of the migration the database already has, named as `Step.creates` names it."""
    table = reflected.table
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
    or, with `extend_check`, extended first (re-created NOT VALID, then validated). A table at the
    newest revision gets what its mapping now needs (a new enum value, a newly mapped error
    column). With `stop` set (a signal), it stops between two statements and raises
    `MigrationStopped`; running it again finishes the work, every step being idempotent.
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
        steps = pending(plan, present_objects(conn, reflected, plan) | _needless(reflected, plan))
        conn.commit()
        try:
            done = apply(engine, steps, stop)
        except OperationalError as exc:
            if "lock timeout" in str(exc):
                raise DatabaseUnavailable(
                    f"{qualified} stayed locked by another transaction for 10s; run `stuck-runs migrate` again "
                    "when the long transaction has finished (see pg_stat_activity)"
                ) from None
            raise
        after = current_revision(conn, qualified)
        conn.commit()
    return MigrateResult(qualified, before, after, extended + (done if before == after else ()))


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
