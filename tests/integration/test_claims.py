"""A retry is claimed only by a process that can start it (issue 14).

Every entry point that executes refuses a missing executor before it changes anything; a
scraper that cannot start, or a process that dies between the claim and the start, leaves the
retry exactly as it was: `pending_retry`, due when it was, its budget unspent.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.errors import ConfigError
from jobs.executors.base import ExecutorMisconfigured
from jobs.executors.command import CommandExecutor
from jobs.recovery import fix_stuck_runs_with_retry
from jobs.retries import process_due_retries
from jobs.stuck import sweep_stuck_runs
from tests.conftest import REPO
from tests.helpers import ScriptedScraper, insert_due_retry, insert_run, make_runtime, row, rows
from tests.integration.test_cli import cli, one_line_error

FAKE_SCRAPER = str(REPO / "tests" / "fake_scraper.py")


def table_state(url: str) -> list[tuple]:
    """Every row's state, in an order that does not depend on updates."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [
                (
                    r["id"],
                    r["status"],
                    r["retry_count"],
                    r["max_retries"],
                    r["next_retry_at"],
                    r["started_at"],
                    r["completed_at"],
                    r["error_message"],
                )
                for r in sorted(rows(conn), key=lambda r: str(r["id"]))
            ]
    finally:
        engine.dispose()


@pytest.fixture
def due_and_stuck(db_url):
    """A due retry and a run stuck for two hours."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        _, retry = insert_due_retry(conn)
        insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=2), search_query="Stuck")
    engine.dispose()
    return db_url, retry


@pytest.mark.parametrize(
    "args",
    [
        ["process"],
        ["fix"],
        ["fix", "--max-retries", "4"],
        ["process", "--json"],
    ],
)
def test_no_executor_is_refused_before_anything_changes(due_and_stuck, args):
    url, _ = due_and_stuck
    before = table_state(url)
    result = cli(*args, env={"DATABASE_URL": url})
    assert result.returncode == 2, result.stderr
    assert "no executor configured" in one_line_error(result)
    assert table_state(url) == before


def test_the_cron_script_refuses_no_executor_before_anything_changes(due_and_stuck):
    url, _ = due_and_stuck
    before = table_state(url)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "SCRAPE_"))}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fix_stuck_runs_with_retry.py")],
        env={**base, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "no executor configured" in one_line_error(result)
    assert table_state(url) == before


def test_retry_now_refuses_no_executor_before_scheduling(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        failed = insert_run(conn, status="failed", started_at=datetime.now(timezone.utc), error_message="HTTP 503")
    engine.dispose()
    before = table_state(db_url)
    result = cli("retry", str(failed), "--now", env={"DATABASE_URL": db_url})
    assert result.returncode == 2
    assert "no executor configured" in one_line_error(result)
    assert table_state(db_url) == before


def test_the_daemon_refuses_no_executor_before_anything_changes(due_and_stuck):
    url, _ = due_and_stuck
    before = table_state(url)
    result = cli("daemon", env={"DATABASE_URL": url}, timeout=30)
    assert result.returncode == 2
    assert "no executor configured" in one_line_error(result)
    assert table_state(url) == before


def test_the_service_refuses_no_executor_before_the_sweep(due_and_stuck, monkeypatch):
    url, _ = due_and_stuck
    monkeypatch.setenv("DATABASE_URL", url)
    before = table_state(url)
    with pytest.raises(ConfigError, match="no executor configured"):
        fix_stuck_runs_with_retry(1, 4, 4)
    rt = make_runtime(url)
    with pytest.raises(ConfigError, match="no executor configured"):
        process_due_retries(rt)
    rt.close()
    assert table_state(url) == before


def test_a_dry_run_needs_no_executor(due_and_stuck):
    url, _ = due_and_stuck
    result = cli("fix", "--dry-run", env={"DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert "would execute 1 due retry" in result.stdout


@pytest.fixture
def broken_scraper(tmp_path: Path) -> Path:
    """An executable whose interpreter does not exist: found on PATH, but it cannot start."""
    script = tmp_path / "scraper"
    script.write_text("#!/nonexistent/python3\nprint('never')\n")
    script.chmod(0o755)
    return script


def test_a_scraper_that_cannot_start_leaves_the_retry_as_it_was(due_and_stuck, broken_scraper):
    url, retry = due_and_stuck
    before = [r for r in table_state(url) if r[0] == retry]
    result = cli("process", env={"DATABASE_URL": url, "SCRAPE_RUN_COMMAND": f"{broken_scraper} {{run_id}}"})
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "could not start" in line and str(broken_scraper) in line
    assert [r for r in table_state(url) if r[0] == retry] == before


def test_a_program_that_lost_its_execute_bit_hands_the_claim_back(db_url, tmp_path):
    program = tmp_path / "scraper"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    rt = make_runtime(db_url, CommandExecutor((str(program), "{run_id}")))
    with rt.engine.begin() as conn:
        _, retry = insert_due_retry(conn)
    before = table_state(db_url)
    program.chmod(stat.S_IRUSR)  # a deploy in progress: the binary is there but not executable
    with pytest.raises(ExecutorMisconfigured, match="could not start"):
        process_due_retries(rt)
    assert table_state(db_url) == before
    program.chmod(0o755)
    result = process_due_retries(rt)
    assert [(o.run_id, o.status) for o in result.executed] == [(retry, "completed")]
    rt.close()


def test_a_process_killed_between_claim_and_start_leaves_a_claim_the_checker_fails_never_a_second_run(db_url):
    """The claim commits before the scraper starts: a process killed there leaves the retry
    claimed (running, its lock gone with the process), which no one starts again; the stuck
    checker fails it. The other way round, a scraper started before a claim that rolled back
    ran twice (seen in chaos trial 1003)."""
    rt = make_runtime(db_url, ScriptedScraper())
    with rt.engine.begin() as conn:
        _, retry = insert_due_retry(conn)
    died = subprocess.run(
        [sys.executable, "-m", "tests.procs", "claim_and_die", db_url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr
    with rt.engine.begin() as conn:
        assert row(conn, retry)["status"] == "running"
        conn.execute(
            sa.text("UPDATE scrape_runs SET started_at = started_at - interval '2 hours' WHERE id = :id"), {"id": retry}
        )
    assert process_due_retries(rt).executed == ()  # claimed: nobody runs it again
    swept = sweep_stuck_runs(rt)
    assert swept.failed == 1 and swept.retries_scheduled == 1
    with rt.engine.connect() as conn:
        assert row(conn, retry)["error_message"] == "Run stuck for 2.0h - retry 2/4 scheduled"
    rt.close()


def test_a_start_that_raises_anything_hands_the_claim_back(db_url):
    class Exploding(ScriptedScraper):
        def start(self, run):
            raise RuntimeError("the executor broke")

    rt = make_runtime(db_url, Exploding())
    with rt.engine.begin() as conn:
        insert_due_retry(conn)
    before = table_state(db_url)
    with pytest.raises(RuntimeError, match="the executor broke"):
        process_due_retries(rt)
    assert table_state(db_url) == before
    rt.close()
