"""A retry executing here is judged by its own clock (SPEC §14), with real scraper processes:
EXECUTION_TIMEOUT defaults to the run's limit (not STUCK_AFTER), and progress that stands
still stops it like a timeout, said stalled; a NULL progress never stalls."""

from __future__ import annotations

import shlex
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.layout import Layout, parse_column_map
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.settings import load_settings
from tests.helpers import insert_due_retry, make_runtime

FAKE = Path(__file__).resolve().parent.parent / "fake_scraper.py"
COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} --run-id={{run_id}}"


@pytest.fixture
def runtime(db_url):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD COLUMN spider TEXT, ADD COLUMN budget FLOAT, ADD COLUMN items INT"
        )
    engine.dispose()
    made = []

    def make(**settings):
        rt = make_runtime(
            db_url,
            command=load_settings({"SCRAPE_RUN_COMMAND": COMMAND}).command,
            layout=Layout(columns=parse_column_map("kind=spider,max_runtime=budget,progress=items")),
            **settings,
        )
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def executed(rt, **columns) -> str:
    with rt.engine.begin() as conn:
        _, retry = insert_due_retry(conn, **columns)
        if "items" in columns:  # a retry starts without progress: the scraper's first count
            conn.execute(
                sa.text("UPDATE scrape_runs SET items = :n WHERE id = :id"), {"n": columns["items"], "id": retry}
            )
    [outcome] = process_due_retries(rt).executed
    return outcome.message


def test_a_healthy_retry_longer_than_stuck_after_is_not_killed_within_its_kinds_limit(runtime):
    rt = runtime(
        policy=RetryPolicy(stuck_after=timedelta(milliseconds=300)), stuck_after_by_kind={"long": timedelta(seconds=30)}
    )
    executed(rt, search_query="slow", spider="long")  # a second's work, STUCK_AFTER 0.3s
    with rt.engine.connect() as conn:
        statuses = conn.execute(sa.text("SELECT status FROM scrape_runs WHERE is_retry")).scalars().all()
    assert statuses == ["completed"]


def test_a_retry_is_killed_at_its_own_max_runtime_and_a_null_progress_never_stalls(runtime):
    rt = runtime(stall_after=timedelta(milliseconds=200))
    message = executed(rt, search_query="hang", budget=1.0)  # items NULL: not stalled at 0.2s
    assert message == "Execution timed out after 1s - retry 2/4 scheduled"


def test_a_retry_whose_progress_stands_still_is_stopped_as_stalled(runtime):
    rt = runtime(stall_after=timedelta(seconds=1))
    assert executed(rt, search_query="hang", items=7) == "Run stalled: no progress for 1s - retry 2/4 scheduled"
