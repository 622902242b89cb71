"""SPEC §16's priority: when more retries are due than slots are free, the highest priority
starts first (a retry with none, last), then the longest overdue; run here and handed to a queue."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from db.layout import Layout, parse_column_map, parse_status_map
from jobs.executors.queue import QueueExecutor
from jobs.retries import process_due_retries
from tests.helpers import ScriptedScraper, insert_due_retry, make_runtime, row

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


def runtime(db_url, executor, **settings):
    return make_runtime(db_url, executor, layout=Layout(columns=parse_column_map("priority=urgency")), **settings)


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
