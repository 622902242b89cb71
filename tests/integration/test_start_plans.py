"""Opening a runtime (every command's start: reflection and the table's checks) never reads the
whole runs table, even in a mass event, when a tenth of a big table is running and its ended
runs hold error messages and completion times (the planner then guessed a Seq Scan would soon
find a running run holding one, and read every row to find none)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from tests.conftest import Databases
from tests.helpers import make_runtime

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def mass_event_url(server_url, templates):
    """60,000 runs, one in ten running (a mass event), the others ended with their messages."""
    databases = Databases(server_url)
    url = databases.create(templates["text_tz"])
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at,"
                " error_message) SELECT 'q' || g, 'x', CASE WHEN g % 10 = 0 THEN 'running' ELSE 'failed' END,"
                " :now - g * interval '1 second', CASE WHEN g % 10 <> 0 THEN :now END,"
                " CASE WHEN g % 10 <> 0 THEN 'HTTP 503' END FROM generate_series(1, 60000) g"
            ),
            {"now": NOW},
        )
        conn.exec_driver_sql("ANALYZE scrape_runs")
    engine.dispose()
    yield url
    databases.drop_all()


def test_opening_a_runtime_in_a_mass_event_never_scans_the_runs_table(mass_event_url):
    engine = sa.create_engine(mass_event_url)
    seen: list[tuple[str, object]] = []

    def remember(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if "scrape_runs" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    sa.event.listen(sa.Engine, "before_cursor_execute", remember)
    try:
        make_runtime(mass_event_url).close()
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", remember)
    assert seen, "no statement read the runs table"
    with engine.connect() as conn:
        for statement, parameters in seen:
            plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN (COSTS OFF) {statement}", parameters).scalars())
            assert "Seq Scan on scrape_runs" not in plan, f"{statement}\n{plan}"
    engine.dispose()
