"""The retry processor: supersede, claim under the global limit, execute, record."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from db import locks
from jobs.executors.outcome import Failed, Released, TimedOut
from jobs.retries import process_due_retries
from jobs.stuck import sweep_stuck_runs
from tests.helpers import ScriptedScraper, chain_of, insert_due_retry, insert_run, make_runtime, row, rows

NOW = datetime(2026, 11, 22, 13, 0, tzinfo=timezone.utc)


@pytest.fixture
def frozen():
    with freeze_time(NOW) as frozen:
        yield frozen


def pending_retry(conn, *, retry_count: int = 1, due: datetime = NOW, **columns) -> tuple:
    return insert_due_retry(conn, due=due, retry_count=retry_count, now=NOW, **columns)


def test_a_due_retry_runs_and_completes(db_url, frozen):
    scraper = ScriptedScraper()
    rt = make_runtime(db_url, scraper)
    with rt.engine.begin() as conn:
        root, retry = pending_retry(conn, config='{"pages": 4}', user_id=3)
        _, later = pending_retry(conn, due=NOW + timedelta(minutes=1))
    result = process_due_retries(rt)
    assert [(o.run_id, o.status) for o in result.executed] == [(retry, "completed")]
    assert scraper.calls[0].inputs["config"] == {"pages": 4} and scraper.calls[0].chain_id == root
    with rt.engine.connect() as conn:
        done = row(conn, retry)
        assert (done["status"], done["started_at"], done["completed_at"]) == ("completed", NOW, NOW)
        assert row(conn, later)["status"] == "pending_retry"


def test_a_late_completion_supersedes_the_pending_retry(db_url, frozen):
    scraper = ScriptedScraper()
    rt = make_runtime(db_url, scraper)
    with rt.engine.begin() as conn:
        root, retry = pending_retry(conn)
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": root})
    result = process_due_retries(rt)
    assert [(s.run_id, s.message) for s in result.superseded] == [(retry, f"Superseded: run {root} completed")]
    assert result.executed == () and scraper.calls == []
    with rt.engine.connect() as conn:
        cancelled = row(conn, retry)
    assert (cancelled["status"], cancelled["error_message"]) == ("cancelled", f"Superseded: run {root} completed")


def test_a_503_is_retried_with_the_next_retry_row(db_url, frozen):
    rt = make_runtime(db_url, ScriptedScraper(lambda run: Failed(error="HTTP 503 Service Unavailable")))
    with rt.engine.begin() as conn:
        root, retry = pending_retry(conn, config='{"pages": 1}')
    [outcome] = process_due_retries(rt).executed
    assert outcome.message == "HTTP 503 Service Unavailable - retry 2/4 scheduled"
    assert outcome.pattern == "server_error" and outcome.retry_due == NOW + timedelta(hours=4)
    with rt.engine.connect() as conn:
        chain = chain_of(conn, root)
    assert [(r["retry_count"], r["status"]) for r in chain] == [(0, "failed"), (1, "failed"), (2, "pending_retry")]
    assert chain[2]["next_retry_at"] == NOW + timedelta(hours=4) and chain[2]["config"] == {"pages": 1}


def test_a_404_is_permanent_and_dead_lettered_with_its_stderr(db_url, frozen):
    failure = Failed(error="HTTP Error 404: Not Found", detail="Traceback ...\nHTTP Error 404: Not Found")
    rt = make_runtime(db_url, ScriptedScraper(lambda run: failure))
    with rt.engine.begin() as conn:
        root, retry = pending_retry(conn)
    [outcome] = process_due_retries(rt).executed
    assert outcome.message == "HTTP Error 404: Not Found - not retried: permanent error (not_found)"
    assert outcome.retry_due is None and outcome.dead_lettered
    with rt.engine.connect() as conn:
        assert len(chain_of(conn, root)) == 2
        letter = conn.execute(sa.text("SELECT * FROM scrape_run_dead_letters")).mappings().one()
    assert (letter["run_id"], letter["chain_id"], letter["pattern"], letter["attempts"]) == (
        retry,
        root,
        "not_found",
        2,
    )
    assert letter["detail"].startswith("Traceback")


def test_the_last_retry_failing_ends_the_chain(db_url, frozen):
    rt = make_runtime(db_url, ScriptedScraper(lambda run: Failed(error="Connection reset by peer")))
    with rt.engine.begin() as conn:
        root, retry = pending_retry(conn, retry_count=4, max_retries=4)
    [outcome] = process_due_retries(rt).executed
    assert outcome.message == "Connection reset by peer - permanently failed after 4 attempts"
    assert outcome.dead_lettered and outcome.pattern == "network_connectivity"


def test_a_timeout_is_recorded_as_such(db_url, frozen):
    rt = make_runtime(db_url, ScriptedScraper(lambda run: TimedOut()))
    with rt.engine.begin() as conn:
        pending_retry(conn)
    [outcome] = process_due_retries(rt).executed
    assert (outcome.message, outcome.pattern) == ("Execution timed out after 1.0h - retry 2/4 scheduled", "timeout")


def test_a_longer_retry_after_is_honoured(db_url, frozen):
    result = Failed(error="HTTP 429 Too Many Requests", retry_after=timedelta(hours=10))
    rt = make_runtime(db_url, ScriptedScraper(lambda run: result))
    with rt.engine.begin() as conn:
        pending_retry(conn)
    [outcome] = process_due_retries(rt).executed
    assert outcome.pattern == "rate_limited" and outcome.retry_due == NOW + timedelta(hours=10)


def test_a_failed_status_the_scraper_wrote_stands_and_continues_the_chain(db_url, frozen):
    def scraper_fails_its_own_row(run):
        with rt.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE scrape_runs SET status = 'failed', error_message = 'captcha wall',"
                    " completed_at = :t WHERE id = :id"
                ),
                {"id": run.id, "t": NOW + timedelta(minutes=3)},
            )
        return Failed(error="exit code 1")

    rt = make_runtime(db_url, ScriptedScraper(scraper_fails_its_own_row))
    with rt.engine.begin() as conn:
        root, retry = pending_retry(conn)
    [outcome] = process_due_retries(rt).executed
    assert outcome.message == "captcha wall - retry 2/4 scheduled"
    with rt.engine.connect() as conn:
        failed = row(conn, retry)
        assert failed["completed_at"] == NOW + timedelta(minutes=3)  # the scraper's own
        assert [r["status"] for r in chain_of(conn, root)] == ["failed", "failed", "pending_retry"]


def test_a_completed_status_the_scraper_wrote_stands(db_url, frozen):
    def scraper_completes_then_crashes(run):
        with rt.engine.begin() as conn:
            conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": run.id})
        return Failed(error="segfault on exit")

    rt = make_runtime(db_url, ScriptedScraper(scraper_completes_then_crashes))
    with rt.engine.begin() as conn:
        root, retry = pending_retry(conn)
    [outcome] = process_due_retries(rt).executed
    assert outcome.status == "completed"
    with rt.engine.connect() as conn:
        assert [r["status"] for r in chain_of(conn, root)] == ["failed", "completed"]


def test_a_shutdown_puts_the_retry_back_without_spending_budget(db_url, frozen):
    stop = threading.Event()

    def sigterm_during_the_scrape(run):
        stop.set()
        return Released()

    rt = make_runtime(db_url, ScriptedScraper(sigterm_during_the_scrape))
    with rt.engine.begin() as conn:
        root, retry = pending_retry(conn, due=NOW - timedelta(hours=1))
    [outcome] = process_due_retries(rt, stop=stop).executed
    assert outcome.status == "released"
    with rt.engine.connect() as conn:
        back = row(conn, retry)
        assert (back["status"], back["retry_count"], back["next_retry_at"], back["started_at"]) == (
            "pending_retry",
            1,
            NOW,
            None,
        )
        assert len(chain_of(conn, root)) == 2


def test_every_due_retry_runs_in_one_pass_oldest_first(db_url, frozen):
    scraper = ScriptedScraper()
    rt = make_runtime(db_url, scraper)
    with rt.engine.begin() as conn:
        due = [pending_retry(conn, due=NOW - timedelta(minutes=m), search_query=f"q{m}")[1] for m in (5, 50, 20)]
    result = process_due_retries(rt)
    assert [o.run_id for o in result.executed] == [due[1], due[2], due[0]]


def test_the_slot_limit_counts_other_processes(db_url, frozen):
    scraper = ScriptedScraper()
    rt = make_runtime(db_url, scraper)
    with rt.engine.begin() as conn:
        pending_retry(conn)
    other = rt.engine.connect()  # another process executing in slot 0
    locks.try_lock(other, locks.namespace("scrape_runs", locks.SLOTS), 0)
    other.commit()
    try:
        assert process_due_retries(rt).executed == ()
        wider = make_runtime(db_url, scraper, max_concurrent_retries=2)
        assert len(process_due_retries(wider).executed) == 1
    finally:
        other.invalidate()
        other.close()


def test_a_stuck_retry_found_by_the_sweep_continues_its_chain(db_url, frozen):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(hours=9), max_retries=3)
        insert_run(
            conn, started_at=NOW - timedelta(hours=2), retry_count=1, max_retries=3, is_retry=True, original_run_id=root
        )
    [attempt] = sweep_stuck_runs(rt).attempts
    assert attempt.message == "Run stuck for 2.0h - retry 2/3 scheduled"
    with rt.engine.connect() as conn:
        assert [(r["retry_count"], r["max_retries"]) for r in rows(conn, "status = 'pending_retry'")] == [(2, 3)]
