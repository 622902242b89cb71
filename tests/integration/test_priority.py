"""SPEC §16's priority: when more retries are due than slots are free, the highest priority
starts first (a retry with none, last), then the longest overdue; run here and handed to a queue."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.layout import Layout, parse_column_map, parse_status_map
from jobs.delivery import Deliveries
from jobs.executors.queue import QueueExecutor
from jobs.retries import process_due_retries
from tests.helpers import ScriptedScraper, insert_due_retry, make_runtime, row
from tests.receiver import start_receiver

NOW = datetime.now(timezone.utc)
# (search_query, priority, overdue by minutes), in the order they must start.
EXPECTED = [("urgent", 9, 5), ("normal old", 5, 60), ("normal", 5, 10), ("low", 1, 120), ("none", None, 600)]


def due_retries(engine) -> dict[str, object]:
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN urgency SMALLINT")
        ids = {}
        for name, priority, minutes in reversed(EXPECTED):  # inserted in the wrong order
            _, ids[name] = insert_due_retry(
                conn, search_query=name, due=NOW - timedelta(minutes=minutes), urgency=priority
            )
    return ids


def runtime_layout() -> Layout:
    return Layout(columns=parse_column_map("priority=urgency"))


def runtime(db_url, executor, **settings):
    return make_runtime(db_url, executor, layout=runtime_layout(), **settings)


def test_with_one_slot_the_highest_priority_starts_first_then_the_longest_overdue(engine, db_url):
    due_retries(engine)
    scraper = ScriptedScraper()
    rt = runtime(db_url, scraper, max_concurrent_retries=1)
    try:
        process_due_retries(rt)
    finally:
        rt.close()
    assert [run.inputs["search_query"] for run in scraper.calls] == [name for name, _, _ in EXPECTED]
    assert [run.inputs["urgency"] for run in scraper.calls] == [p for _, p, _ in EXPECTED]  # a retry keeps it


def test_a_queue_with_room_for_two_gets_the_two_of_highest_priority(engine, db_url):
    ids = due_retries(engine)
    layout = Layout(columns=parse_column_map("priority=urgency"), statuses=parse_status_map("queued=queued"))
    rt = make_runtime(db_url, QueueExecutor("queued"), layout=layout, max_concurrent_retries=2, handoff="queued")
    try:
        process_due_retries(rt)
        with rt.engine.connect() as conn:
            queued = {name for name, run_id in ids.items() if row(conn, run_id)["status"] == "queued"}
            pending = conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'pending_retry'")).scalar()
    finally:
        rt.close()
    assert queued == {"urgent", "normal old"} and pending == 3


def insert_prioritized(engine, column_type: str, retries: list[tuple[str, str | None, int]]) -> None:
    """Due retries (name, priority as SQL text, overdue by minutes) in the wrong order, on a fresh table."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM scrape_runs")
        conn.exec_driver_sql(f"ALTER TABLE scrape_runs ADD COLUMN IF NOT EXISTS urgency {column_type}")
        for name, priority, minutes in reversed(retries):
            _, retry = insert_due_retry(conn, search_query=name, due=NOW - timedelta(minutes=minutes))
            conn.execute(
                sa.text(f"UPDATE scrape_runs SET urgency = CAST(:p AS {column_type}) WHERE id = :id"),
                {"p": priority, "id": retry},
            )


@pytest.mark.parametrize(
    ("column_type", "not_numbers"),
    [("DOUBLE PRECISION", ("NaN", "Infinity", "-Infinity")), ("NUMERIC", ("NaN", "NaN", "NaN"))],
)
def test_nan_and_infinity_are_no_priority_run_here_and_in_a_set_of_marks(
    engine, db_url, tmp_path, column_type, not_numbers
):
    """A numeric or double precision column holds NaN and ±Infinity (jobs.rules.known_priority: no
    priority, sent to Scrapyd and Celery as none): they start last with the retries without one, by
    how long overdue. PostgreSQL sorts NaN above every number, and Python cannot order a Decimal NaN."""
    nan, infinite, negative = not_numbers
    expected = [("urgent", "9", 5), ("low", "1", 120), ("infinite", infinite, 700), ("nan", nan, 600)]
    expected += [("negative", negative, 400), ("none", None, 30)]
    insert_prioritized(engine, column_type, expected)
    scraper = ScriptedScraper()
    rt = runtime(db_url, scraper, max_concurrent_retries=1)
    try:
        process_due_retries(rt)  # run here, one slot: the order of the claims
    finally:
        rt.close()
    assert [run.inputs["search_query"] for run in scraper.calls] == [name for name, _, _ in expected]

    insert_prioritized(engine, column_type, expected)  # a set of marks: the order a pass delivers in
    receiver = start_receiver(tmp_path)
    rt = make_runtime(db_url, webhook=receiver.url + "/r/{run_id}", layout=runtime_layout(), max_concurrent_retries=10)
    try:
        marked = Deliveries(rt, rt.executor, rt.settings.policy).mark_batch([None] * len(expected))
    finally:
        rt.close()
        receiver.stop()
    assert [m.run.inputs["search_query"] for m in marked] == [name for name, _, _ in expected]
