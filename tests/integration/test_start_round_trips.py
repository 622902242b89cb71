"""What `check` sends before its first batch: each statement is a round trip to the server, paid
by every command before it does anything (BENCHMARKS.md, start-0612d)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from db.errors import NotMigrated
from jobs.runtime import Runtime
from jobs.settings import Settings

# Reflection (SQLAlchemy's three: the columns, the table's oid, its primary key), running runs
# holding the written columns, UNIQUE constraints on inputs, a CHECK on status, the dead letters'
# and pauses' tables present (one statement for both), row-level security.
OPENING_STATEMENTS = 8


@pytest.fixture
def statements():
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append(statement)

    sa.event.listen(Engine, "before_cursor_execute", record)
    yield sent
    sa.event.remove(Engine, "before_cursor_execute", record)


def test_opening_the_runtime_sends_one_statement_per_check(db_url, statements):
    Runtime.open(Settings(database_url=db_url)).close()
    assert len(statements) == OPENING_STATEMENTS, statements


@pytest.mark.parametrize("dropped", ["stuck_runs_pauses", "scrape_run_dead_letters"])
def test_a_missing_dead_letters_or_pauses_table_is_still_not_migrated(db_url, dropped):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {dropped}")
    engine.dispose()
    with pytest.raises(NotMigrated, match=f"missing {dropped}\\)"):
        Runtime.open(Settings(database_url=db_url))
