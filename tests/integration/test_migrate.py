"""`stuck-runs migrate` over the tables scrapers really have."""

from __future__ import annotations

import re
import time

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.errors import NotMigrated, SchemaError
from db.migrate import current_revision, head_revision, migrate, migration_sql
from db.migration_plan import TablePlan
from db.shape import check_migratable
from db.table import load_runs_table
from tests.schema import ENUM_NAIVE, TEXT_STATUS

NEW_COLUMNS = {"retry_count", "max_retries", "next_retry_at", "original_run_id", "is_retry", "failure_pattern"}


def columns(engine: sa.Engine, table: str = "scrape_runs") -> dict[str, dict]:
    return {c["name"]: c for c in sa.inspect(engine).get_columns(table)}


def indexes(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(
            conn.exec_driver_sql("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'scrape_runs'").all()
        )


@pytest.fixture
def engine(databases):
    engine = make_engine(databases.create())
    yield engine
    engine.dispose()


def test_fresh_table_gets_columns_indexes_and_a_version(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
    result = migrate(engine, "scrape_runs")
    assert (result.before, result.after, result.changed) == (None, head_revision(), True)
    cols = columns(engine)
    assert NEW_COLUMNS <= set(cols)
    assert str(cols["retry_count"]["default"]) == "0" and not cols["retry_count"]["nullable"]
    assert str(cols["max_retries"]["default"]) == "4" and not cols["max_retries"]["nullable"]
    assert "false" in str(cols["is_retry"]["default"]) and cols["next_retry_at"]["nullable"]
    found = indexes(engine)
    assert "WHERE ((status)::text = 'running'::text)" in found["ix_scrape_runs_running_started_at"]
    assert "WHERE ((status)::text = 'pending_retry'::text)" in found["ix_scrape_runs_pending_next_retry_at"]
    assert found["ux_scrape_runs_chain_retry"].startswith("CREATE UNIQUE INDEX")
    assert "WHERE is_retry" in found["ux_scrape_runs_chain_retry"]
    with engine.connect() as conn:
        assert current_revision(conn, "scrape_runs") == head_revision()
        # The scraper's own Alembic keeps its version table to itself.
        assert not sa.inspect(conn).has_table("alembic_version")
        load_runs_table(conn, "scrape_runs")


def test_migrating_twice_changes_nothing(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
    migrate(engine, "scrape_runs")
    before = (columns(engine).keys(), indexes(engine))
    second = migrate(engine, "scrape_runs")
    assert not second.changed
    assert (columns(engine).keys(), indexes(engine)) == before


def test_hand_added_columns_are_left_alone(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD COLUMN retry_count SMALLINT NOT NULL DEFAULT 0,"
            " ADD COLUMN max_retries INTEGER NOT NULL DEFAULT 3"
        )
        conn.exec_driver_sql("INSERT INTO scrape_runs (search_query, location_query, max_retries) VALUES ('a', 'b', 7)")
    migrate(engine, "scrape_runs")
    cols = columns(engine)
    assert isinstance(cols["retry_count"]["type"], sa.SmallInteger)
    assert str(cols["max_retries"]["default"]) == "3"
    assert NEW_COLUMNS <= set(cols)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT max_retries, is_retry FROM scrape_runs").one() == (7, False)


def test_enum_status_gets_the_new_values(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(ENUM_NAIVE.format(table="scrape_runs"))
    migrate(engine, "scrape_runs")
    with engine.connect() as conn:
        labels = conn.exec_driver_sql(
            "SELECT array_agg(enumlabel ORDER BY enumsortorder) FROM pg_enum e "
            "JOIN pg_type t ON t.oid = e.enumtypid WHERE t.typname = 'scrape_status'"
        ).scalar_one()
    assert labels == ["running", "completed", "failed", "pending_retry", "cancelled"]
    migrate(engine, "scrape_runs")  # and again, harmlessly


def test_a_check_constraint_on_status_is_named_with_the_fix(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD CONSTRAINT runs_status_ok CHECK (status IN ('running', 'completed', 'failed'))"
        )
    before = constraints(engine)
    with pytest.raises(SchemaError) as raised:
        migrate(engine, "scrape_runs")
    message = str(raised.value)
    assert "runs_status_ok" in message and "--extend-check" in message
    assert "ALTER TABLE scrape_runs DROP CONSTRAINT runs_status_ok;" in message
    added = re.search(r"ALTER TABLE scrape_runs ADD CONSTRAINT runs_status_ok CHECK \((.*)\) NOT VALID;", message)
    assert added and added[1].endswith(" OR status IN ('pending_retry', 'cancelled')")
    assert "ALTER TABLE scrape_runs VALIDATE CONSTRAINT runs_status_ok;" in message
    assert "retry_count" not in columns(engine)  # nothing changed
    assert constraints(engine) == before


def test_extend_check_extends_the_constraint_then_migrates(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql(
            "INSERT INTO scrape_runs (search_query, location_query, status) VALUES ('q', 'l', 'failed')"
        )
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD CHECK (status IN ('running', 'completed', 'failed'))")
    assert migrate(engine, "scrape_runs", extend_check=True).changed
    [(name, definition, valid)] = constraints(engine)
    assert valid and "pending_retry" in definition and "cancelled" in definition
    with engine.begin() as conn:  # the constraint still guards the table
        with pytest.raises(sa.exc.IntegrityError):
            conn.exec_driver_sql("UPDATE scrape_runs SET status = 'bogus'")
    assert not migrate(engine, "scrape_runs", extend_check=True).changed


def test_extend_check_validates_a_constraint_an_interrupted_run_left_not_valid(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql(  # what --extend-check leaves when stopped between its two transactions
            "ALTER TABLE scrape_runs ADD CONSTRAINT runs_status_ok CHECK (status IN "
            "('running', 'completed', 'failed', 'pending_retry', 'cancelled')) NOT VALID"
        )
    assert [valid for _, _, valid in constraints(engine)] == [False]
    migrate(engine, "scrape_runs", extend_check=True)
    assert [valid for _, _, valid in constraints(engine)] == [True]


def test_extend_check_does_not_wait_on_its_own_reads(engine):
    """With the retry columns already there, the duplicate check reads the table: that session's
    lock must be released before the constraint is re-created (it used to time out after 10 s)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD COLUMN retry_count INTEGER NOT NULL DEFAULT 0, "
            "ADD COLUMN original_run_id UUID, ADD COLUMN is_retry BOOLEAN NOT NULL DEFAULT false, "
            "ADD CHECK (status IN ('running', 'completed', 'failed'))"
        )
    started = time.monotonic()
    assert migrate(engine, "scrape_runs", extend_check=True).changed
    assert time.monotonic() - started < 8  # LOCK_TIMEOUT is 10 s


def constraints(engine) -> list[tuple[str, str, bool]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.exec_driver_sql(
                "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
                "WHERE conrelid = 'scrape_runs'::regclass AND contype = 'c' ORDER BY conname"
            )
        ]


def test_a_check_constraint_that_allows_the_values_is_fine(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD CONSTRAINT runs_status_ok CHECK (status IN "
            "('running', 'completed', 'failed', 'pending_retry', 'cancelled'))"
        )
    assert migrate(engine, "scrape_runs").changed


@pytest.mark.parametrize(
    ("ddl", "fragment"),
    [
        (
            "CREATE TABLE scrape_runs (run_id UUID PRIMARY KEY, search_query TEXT, location_query TEXT, status TEXT,"
            " error_message TEXT, started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ)",
            "has no column id (the id): its primary key is run_id: set COLUMN_MAP=id=run_id",
        ),
        ("CREATE TABLE other_table (id UUID)", "does not exist"),
    ],
)
def test_impossible_tables_get_a_clear_message(engine, ddl, fragment):
    with engine.begin() as conn:
        conn.exec_driver_sql(ddl)
    with pytest.raises(SchemaError, match=re.escape(fragment)):
        migrate(engine, "scrape_runs")


def test_duplicate_retries_from_an_old_system_are_reported_before_the_unique_index(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD COLUMN original_run_id UUID, ADD COLUMN retry_count INT"
            " DEFAULT 0, ADD COLUMN is_retry BOOLEAN DEFAULT false"
        )
        conn.exec_driver_sql(
            "INSERT INTO scrape_runs (search_query, location_query, original_run_id, retry_count,"
            " is_retry) SELECT 'a', 'b', '00000000-0000-0000-0000-000000000001', 1, true"
            " FROM generate_series(1, 2)"
        )
    with pytest.raises(SchemaError, match="1 \\(original_run_id, retry_count\\) pair"):
        migrate(engine, "scrape_runs")


def test_an_invalid_index_from_a_failed_concurrent_build_is_rebuilt(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
    migrate(engine, "scrape_runs")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_scrape_runs_running_started_at'::regclass"
        )
        conn.exec_driver_sql("DELETE FROM stuck_runs_alembic_scrape_runs")
    migrate(engine, "scrape_runs")
    with engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_scrape_runs_running_started_at'::regclass"
        ).scalar_one()


def test_schema_qualified_tables(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA scraping")
        conn.exec_driver_sql(TEXT_STATUS.format(table="scraping.runs"))
    migrate(engine, "scraping.runs")
    with engine.connect() as conn:
        runs = load_runs_table(conn, "scraping.runs")
        assert runs.qualified_name == "scraping.runs"
        assert sa.inspect(conn).has_table("scrape_run_dead_letters", schema="scraping")


def test_an_unmigrated_table_says_to_run_migrate(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
    with engine.connect() as conn, pytest.raises(NotMigrated, match="run `stuck-runs migrate`"):
        load_runs_table(conn, "scrape_runs")
    with engine.connect() as conn:
        check_migratable(conn, "scrape_runs")  # but it can be migrated


def test_sql_mode_prints_the_ddl_without_a_database():
    sql = migration_sql(TablePlan("scrape_runs"))
    assert "ADD COLUMN IF NOT EXISTS retry_count INTEGER NOT NULL DEFAULT 0" in sql
    assert "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_scrape_runs_running_started_at" in sql
    assert "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ux_scrape_runs_chain_retry" in sql
    assert "ADD VALUE IF NOT EXISTS ''pending_retry''" in sql
    assert "%%" not in sql
    assert "stuck_runs_alembic_scrape_runs" in sql


def test_migrate_sql_adds_the_delivery_mark_and_the_postponements_revision_0005():
    sql = migration_sql(TablePlan("scrape_runs"))
    assert "ADD COLUMN IF NOT EXISTS delivering_until TIMESTAMPTZ NULL" in sql
    assert "ADD COLUMN IF NOT EXISTS delivering_by TEXT NULL" in sql
    assert "ADD COLUMN IF NOT EXISTS postponements INTEGER NOT NULL DEFAULT 0" in sql
    assert "'0005'" in sql
