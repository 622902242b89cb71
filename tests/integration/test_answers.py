"""Answers an operator can trust: `stats` adds up, `status` and `stats` agree, every entry point
shows in `status`, counts use one vocabulary, a completed run has no retry due."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.errors import DatabaseUnavailable
from jobs.events import CHECKER, PROCESSOR
from jobs.retries import supersede_completed_chains
from jobs.stats import retry_stats
from jobs.status import job_run, read_status
from jobs.stuck import sweep_stuck_runs
from scheduler.wiring import wire
from tests.cli import run
from tests.conftest import REPO
from tests.helpers import insert_run, make_runtime, row

NOW = datetime.now(timezone.utc)


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "STUCK_", "RETRY_", "SCRAPE_"))}
    return run([*args], env={**base, **env}, timeout=60)


def ended(hours: float) -> dict:
    return {"started_at": NOW - timedelta(hours=hours + 1), "completed_at": NOW - timedelta(hours=hours)}


def retry_of(conn, root, number: int, status: str, **columns) -> object:
    return insert_run(conn, status=status, is_retry=True, original_run_id=root, retry_count=number, **columns)


def dead_letter(conn, run_id, chain_id, pattern: str, requeued_run_id=None) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO scrape_run_dead_letters (run_id, chain_id, attempts, budget, pattern, inputs, created_at,"
            " requeued_at, requeued_run_id) VALUES (:run, :chain, 1, 4, :pattern, '{}', :now, :requeued, :requeued_run)"
        ),
        {
            "run": run_id,
            "chain": chain_id,
            "pattern": pattern,
            "now": NOW - timedelta(hours=1),
            "requeued": NOW if requeued_run_id else None,
            "requeued_run": requeued_run_id,
        },
    )


@pytest.fixture
def week(db_url):
    """Chains in every state a retry can be in: completed, failed, running, pending, cancelled."""
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        # A: stuck, its retry completed.
        a = insert_run(conn, status="failed", failure_pattern="stuck", **ended(30))
        retry_of(conn, a, 1, "completed", **ended(20))
        # B: stuck, its retry failed with a 503, the next one pending.
        b = insert_run(conn, status="failed", failure_pattern="stuck", **ended(30))
        retry_of(conn, b, 1, "failed", failure_pattern="server_error", next_retry_at=NOW, **ended(10))
        retry_of(conn, b, 2, "pending_retry", next_retry_at=NOW + timedelta(hours=2))
        # C: stuck, its retry running now.
        c = insert_run(conn, status="failed", failure_pattern="stuck", **ended(5))
        retry_of(conn, c, 1, "running", started_at=NOW - timedelta(minutes=5))
        # D: stuck, completed late by the scraper; its retry superseded before it ran.
        d = insert_run(conn, status="completed", failure_pattern="stuck", **ended(5))
        retry_of(conn, d, 1, "cancelled", error_message=f"Superseded: run {d} completed", completed_at=NOW)
        # E: a 404 the first time: permanent, dead-lettered.
        e = insert_run(conn, status="failed", failure_pattern="not_found", **ended(8))
        dead_letter(conn, e, e, "not_found")
        # F: failed by the scraper itself, retried by an operator, then a 404: dead-lettered.
        f = insert_run(conn, status="failed", error_message="boom", **ended(9))
        f1 = retry_of(conn, f, 1, "failed", failure_pattern="not_found", **ended(7))
        dead_letter(conn, f1, f, "not_found")
        # H: a 404, dead-lettered, requeued, and the requeued retry completed.
        h = insert_run(conn, status="failed", failure_pattern="not_found", **ended(12))
        h1 = retry_of(conn, h, 1, "completed", **ended(2))
        dead_letter(conn, h, h, "not_found", requeued_run_id=h1)
        # I: a 404 forty days ago: permanently failed, outside a 30-day window.
        insert_run(conn, status="failed", failure_pattern="not_found", **ended(40 * 24))
        # G: failed by the scraper and never retried: stuck-runs never handled it.
        insert_run(conn, status="failed", error_message="scraper crashed", **ended(3))
    yield rt
    rt.close()


def test_every_stats_number_counts_the_retries_that_ended(week):
    stats = retry_stats(week, timedelta(days=30))
    assert (stats.retries, stats.succeeded, stats.failed, stats.chains) == (4, 2, 2, 4)
    assert (stats.pending, stats.running, stats.cancelled) == (1, 1, 1)
    assert [(a.attempt, a.retries, a.succeeded) for a in stats.by_attempt] == [(1, 4, 2)]
    assert [(p.pattern, p.failures, p.retries, p.retries_succeeded) for p in stats.by_pattern] == [
        ("stuck", 4, 2, 1),
        ("not_found", 3, 1, 1),
        ("server_error", 1, 0, 0),
        (None, 0, 1, 0),  # F's retry: the attempt it retried the scraper failed itself
    ]
    assert sum(a.retries for a in stats.by_attempt) == sum(p.retries for p in stats.by_pattern) == stats.retries
    assert stats.stuck_detections == next(p.failures for p in stats.by_pattern if p.pattern == "stuck")


def test_the_stats_page_says_what_it_counts(week, db_url):
    text = cli("stats", "--since", "30d", env={"DATABASE_URL": db_url})
    assert text.returncode == 0, text.stderr
    assert "retries that ended (completed or failed)" in text.stdout
    assert "retries ended 4 · succeeded 2 (50.0%) · failed 2 · chains 4" in text.stdout
    assert "not counted above: 1 pending and 1 running now, 1 cancelled before they ran" in text.stdout
    assert "RETRIES ENDED" in text.stdout and "(unclassified)" in text.stdout


def test_status_and_stats_count_permanent_failures_alike(week, db_url):
    assert read_status(week).runs.permanently_failed == 2  # E and F: I ended 40 days ago, outside the 24h
    assert retry_stats(week, timedelta(hours=24)).permanently_failed == 2  # the same count over the same window
    assert retry_stats(week, timedelta(days=30)).permanently_failed == 2  # I ended before the window
    assert retry_stats(week, timedelta(days=60)).permanently_failed == 3
    env = {"DATABASE_URL": db_url}
    assert "permanently failed (24h): 2 (chains ended failed, no retry coming)" in cli("status", env=env).stdout
    assert "permanently failed 3 (chains whose last attempt ended failed in the window" in (
        cli("stats", "--since", "60d", env=env).stdout
    )


def last_runs(db_url: str) -> dict[str, dict]:
    status = cli("status", "--json", env={"DATABASE_URL": db_url})
    assert status.returncode == 0, status.stderr
    return {job["job_id"]: job for job in json.loads(status.stdout)["jobs"]}


def test_check_process_fix_and_the_script_show_in_status(db_url, tmp_path):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        insert_run(conn, started_at=NOW - timedelta(hours=3))
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"}

    assert cli("check", "--dry-run", env=env).returncode == 0
    assert {j: r["outcome"] for j, r in last_runs(db_url).items()} == {CHECKER: None, PROCESSOR: None}

    assert cli("check", env=env).returncode == 0
    checked = last_runs(db_url)
    assert checked[CHECKER]["outcome"] == "ok" and checked[PROCESSOR]["outcome"] is None
    assert checked[CHECKER]["host"] == socket.gethostname() and checked[CHECKER]["pid"] > 0
    assert checked[CHECKER]["counts"]["failed"] == 1 and not checked[CHECKER]["by_daemon"]
    text = cli("status", env=env).stdout
    assert f"{socket.gethostname()}:{checked[CHECKER]['pid']} (cli)" in text and "never ran" in text

    assert cli("process", env=env).returncode == 0
    processed = last_runs(db_url)
    assert processed[PROCESSOR]["outcome"] == "ok" and processed[CHECKER] == checked[CHECKER]

    fixed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fix_stuck_runs_with_retry.py")],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fixed.returncode == 0, fixed.stderr
    after = last_runs(db_url)
    for job in (CHECKER, PROCESSOR):
        assert after[job]["outcome"] == "ok" and after[job]["last_started"] > processed[job]["last_started"]
    assert after[CHECKER]["pid"] == after[PROCESSOR]["pid"] != processed[PROCESSOR]["pid"]
    assert set(after[CHECKER]["counts"]) >= {"failed", "retries_scheduled"}
    assert set(after[PROCESSOR]["counts"]) >= {"superseded", "executed"}
    rt.close()


def test_a_run_that_failed_is_recorded_with_its_error(db_url):
    rt = wire(make_runtime(db_url))  # the records subscribe as in every entry point
    with pytest.raises(DatabaseUnavailable), job_run(rt, (CHECKER,), dry_run=False):
        raise DatabaseUnavailable("database error while sweeping at db:5432: server closed the connection")
    [checker, processor] = read_status(rt).jobs
    assert (checker.outcome, checker.error) == (
        "error",
        "database error while sweeping at db:5432: server closed the connection",
    )
    assert processor.outcome is None
    rt.close()


def test_counts_of_attempts_leave_out_retries_that_never_ran(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        late = insert_run(conn, status="completed", failure_pattern="stuck", **ended(5))
        retry_of(conn, late, 1, "cancelled", error_message=f"Superseded: run {late} completed", completed_at=NOW)
        spent = insert_run(conn, status="failed", failure_pattern="stuck", max_retries=4, **ended(50))
        for number in range(1, 5):
            retry_of(conn, spent, number, "failed", max_retries=4, failure_pattern="server_error", **ended(50 - number))
    env = {"DATABASE_URL": db_url}
    history = cli("history", str(late), env=env)
    assert history.returncode == 0, history.stderr
    assert "Total attempts: 1 · final status: success" in history.stdout  # the cancelled retry never ran
    refused = cli("retry", str(spent), env=env)
    assert refused.returncode == 1
    assert "(4 of 4 retries spent; 5 attempts, the original run included)" in refused.stderr
    rt.close()


def test_a_late_completion_leaves_no_retry_due_once_superseded(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        stuck = insert_run(conn, started_at=NOW - timedelta(hours=2))
        other = insert_run(conn, status="completed", next_retry_at=NOW, **ended(1))  # no retry of its chain pending
    [attempt] = sweep_stuck_runs(rt).attempts
    with rt.engine.begin() as conn:  # the scraper finishes the "stuck" run after all, as scrapers write it
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": stuck})
        assert row(conn, stuck)["next_retry_at"] is not None
    [superseded] = supersede_completed_chains(rt)
    assert superseded.run_id == attempt.retry_id
    with rt.engine.connect() as conn:
        chain = conn.execute(
            sa.text(
                "SELECT id, status, error_message, next_retry_at FROM scrape_runs"
                " WHERE original_run_id = :root OR id = :root ORDER BY retry_count"
            ),
            {"root": stuck},
        ).all()
        assert [(r.status, r.next_retry_at) for r in chain] == [("completed", None), ("cancelled", None)]
        assert chain[1].error_message == f"Superseded: run {stuck} completed"
        assert row(conn, other)["next_retry_at"] is not None  # only the superseded chains change
    rt.close()


def test_a_late_completion_loses_stuck_runs_message_but_keeps_the_scrapers_own(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        quiet = insert_run(conn, started_at=NOW - timedelta(hours=2), search_query="quiet")
        chatty = insert_run(conn, started_at=NOW - timedelta(hours=2), search_query="chatty")
    sweep_stuck_runs(rt)
    with rt.engine.begin() as conn:  # both finish after all; one scraper writes its own words as it does
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": quiet})
        conn.execute(
            sa.text("UPDATE scrape_runs SET status = 'completed', error_message = '3 pages skipped' WHERE id = :id"),
            {"id": chatty},
        )
        assert re.fullmatch(r"Run stuck for 2\.\dh - retry 1/4 scheduled", row(conn, quiet)["error_message"])
    assert len(supersede_completed_chains(rt)) == 2
    with rt.engine.connect() as conn:
        assert (row(conn, quiet)["status"], row(conn, quiet)["error_message"]) == ("completed", None)
        assert row(conn, chatty)["error_message"] == "3 pages skipped"
    rt.close()
