"""Dead letters, statistics, doctor, JSON logs and help: the operator's side of the tool."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from db.engine import make_engine
from db.errors import RunNotFound, UsageError
from jobs.dead_letters import get_dead_letter, list_dead_letters, purge_dead_letters, requeue
from jobs.doctor import run_checks
from jobs.executors.outcome import Completed, Failed
from jobs.retries import process_due_retries
from jobs.settings import load_settings
from jobs.stats import retry_stats
from jobs.stuck import sweep_stuck_runs
from tests.cli import run
from tests.helpers import ScriptedScraper, insert_due_retry, insert_run, make_runtime, rows

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([*args], env={**os.environ, **(env or {})}, timeout=60)


@pytest.fixture
def history(db_url):
    """A day of recovery: stuck runs, retries that succeed, fail, and a chain dead-lettered."""
    outcomes = {
        "ok": Completed(),
        "503": Failed(error="HTTP 503 Service Unavailable"),
        "404": Failed(error="HTTP 404 Not Found", detail="Traceback: ...\nHTTP 404 Not Found"),
    }
    scraper = ScriptedScraper(lambda run: outcomes[run.inputs["search_query"].split()[0]])
    with freeze_time(NOW - timedelta(hours=10)) as frozen:
        rt = make_runtime(db_url, scraper)
        with rt.engine.begin() as conn:
            for query in ("ok a", "ok b", "503 c", "404 d"):
                insert_run(conn, search_query=query, started_at=NOW - timedelta(hours=12), config='{"pages": 1}')
        sweep_stuck_runs(rt)  # 4 stuck detections, 4 retries scheduled
        frozen.tick(timedelta(hours=4, minutes=1))
        process_due_retries(rt)  # 2 succeed, the 503 is retried again, the 404 is dead-lettered
    yield rt
    rt.close()


def test_stats_over_a_day_of_recovery(history):
    with freeze_time(NOW):
        stats = retry_stats(history, timedelta(days=1))
    assert (stats.retries, stats.succeeded, stats.chains, stats.stuck_detections, stats.permanently_failed) == (
        4,
        2,
        4,
        4,
        1,
    )
    assert stats.success_rate == 0.5 and stats.retries_per_chain == 1.0
    assert [(a.attempt, a.retries, a.succeeded) for a in stats.by_attempt] == [(1, 4, 2)]
    assert {p.pattern: (p.failures, p.retries, p.retries_succeeded) for p in stats.by_pattern} == {
        "stuck": (4, 4, 2),
        "server_error": (1, 0, 0),  # its retry is pending: it has not ended
        "not_found": (1, 0, 0),
    }
    with freeze_time(NOW + timedelta(days=2)):
        assert retry_stats(history, timedelta(days=1)).retries == 0


def test_dead_letters_list_show_requeue_and_purge(history):
    [letter] = list_dead_letters(history)
    assert (letter.pattern, letter.attempts, letter.budget) == ("not_found", 2, 4)
    assert letter.last_error == "HTTP 404 Not Found - not retried: permanent error (not_found)"
    assert letter.inputs["search_query"] == "404 d" and letter.inputs["config"] == {"pages": 1}
    assert "Traceback" in letter.detail
    assert get_dead_letter(history, str(letter.run_id)) == get_dead_letter(history, str(letter.id)) == letter
    with pytest.raises(RunNotFound):
        get_dead_letter(history, "999999")
    with pytest.raises(UsageError):
        get_dead_letter(history, "forty-two")

    scheduled = requeue(history, str(letter.id))
    assert scheduled.message == "Run scheduled for retry (attempt 2/5)"  # a new budget of 4 more retries
    assert list_dead_letters(history) == ()
    [requeued] = list_dead_letters(history, include_requeued=True)
    assert requeued.requeued_run_id == scheduled.retry_id

    with freeze_time(NOW + timedelta(days=31)):
        assert purge_dead_letters(history, timedelta(days=30)) == 1
        assert purge_dead_letters(history, timedelta(days=30)) == 0
    with history.engine.connect() as conn:
        assert len(rows(conn, "search_query = '404 d'")) == 3  # the runs themselves stay


def test_history_shows_the_failure_pattern(history, db_url):
    with history.engine.connect() as conn:
        root = rows(conn, "search_query = '503 c' AND NOT is_retry")[0]["id"]
    result = cli("history", str(root), env={"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    header, *attempts, summary = result.stdout.splitlines()
    column = header.index("PATTERN")  # "stuck" is also in the error message: read the column itself
    assert [line[column:].split()[0] for line in attempts] == ["stuck", "server_error", "-"]
    assert summary == "Total attempts: 2 · final status: pending_retry"


def test_dlq_and_stats_commands(history, db_url):
    env = {"DATABASE_URL": db_url}
    listed = cli("dlq", "list", env=env)
    assert listed.returncode == 0 and "not_found" in listed.stdout and "2 (budget 4)" in listed.stdout
    number = listed.stdout.splitlines()[1].split()[0]
    shown = cli("dlq", "show", number, env=env)
    assert "pattern: not_found" in shown.stdout and 'search_query = "404 d"' in shown.stdout
    assert "Traceback" in shown.stdout
    requeued = cli("dlq", "requeue", number, env=env)
    assert requeued.returncode == 0 and "Requeued: Run scheduled for retry (attempt 2/5)" in requeued.stdout
    purged = cli("dlq", "purge", "--older-than", "30d", env=env)
    assert purged.returncode == 0 and "Removed 0 dead letter(s) older than 30d." in purged.stdout
    stats = json.loads(cli("stats", "--since", "30d", "--json", env=env).stdout)
    assert stats["retries"] == 4 and stats["stuck_detections"] == 4
    text = cli("stats", "--since", "30d", env=env).stdout
    assert "retries ended 4 · succeeded 2 (50.0%)" in text and "server_error" in text


def test_doctor_passes_on_a_healthy_setup_and_names_each_problem(db_url, databases):
    healthy = run_checks(
        lambda: load_settings({"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"}),
        lambda: datetime.now(timezone.utc),
    )
    assert [c.name for c in healthy] == [
        "configuration",
        "executor",
        "connectivity",
        "clock skew",
        "mapping",
        "migration",
        "indexes",
        "untimed runs",
        "limits",
        "privileges",
    ]
    assert all(c.ok for c in healthy), healthy

    skewed = run_checks(
        lambda: load_settings({"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"}),
        lambda: datetime.now(timezone.utc) + timedelta(minutes=3),
    )
    clock = next(c for c in skewed if c.name == "clock skew")
    assert not clock.ok and "+180" in clock.detail and "NTP" in clock.fix

    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_scrape_runs_pending_next_retry_at")
        conn.exec_driver_sql("CREATE ROLE sr_reader LOGIN")
        conn.exec_driver_sql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO sr_reader")
    engine.dispose()
    broken = run_checks(
        lambda: load_settings({"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "no-such-scraper"}),
        lambda: datetime.now(timezone.utc),
    )
    by_name = {c.name: c for c in broken}
    assert not by_name["executor"].ok and "not found" in by_name["executor"].detail
    assert not by_name["indexes"].ok and "ix_scrape_runs_pending_next_retry_at (missing)" in by_name["indexes"].detail
    reader = sa.engine.make_url(db_url).set(username="sr_reader").render_as_string(hide_password=False)
    limited = {
        c.name: c
        for c in run_checks(
            lambda: load_settings({"DATABASE_URL": reader, "SCRAPE_RUN_COMMAND": "true"}),
            lambda: datetime.now(timezone.utc),
        )
    }
    assert not limited["privileges"].ok and "INSERT on scrape_runs" in limited["privileges"].detail

    result = cli("doctor", env={"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"})
    assert result.returncode == 1
    assert "✓ connectivity: PostgreSQL" in result.stdout and "✗ indexes:" in result.stdout
    assert "→ run `stuck-runs migrate`" in result.stdout
    unreachable = cli("doctor", env={"DATABASE_URL": "postgresql://x:pw-s3cret@127.0.0.1:1/db"})
    assert unreachable.returncode == 1 and "✗ connectivity" in unreachable.stdout
    assert "pw-s3cret" not in unreachable.stdout + unreachable.stderr
    bad_config = cli("doctor", env={"STUCK_AFTER": "later"})
    assert bad_config.returncode == 2 and "✗ configuration: STUCK_AFTER='later'" in bad_config.stdout


def test_running_runs_the_checker_cannot_time_are_named_with_the_fix(db_url):
    """A run left `running` with no started_at would otherwise sit there forever, unseen."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        for _ in range(2):
            insert_run(conn, started_at=None)
        insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(minutes=5))
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"}

    def untimed_check():
        checks = run_checks(lambda: load_settings(env), lambda: datetime.now(timezone.utc))
        return next(c for c in checks if c.name == "untimed runs")

    check = untimed_check()
    assert not check.ok
    assert check.detail == "2 running runs have no started_at (nor heartbeat): the checker can never find them stuck"
    status = cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert "Runs: 3 running (0 stuck)" in status.stdout
    assert "Warning: 2 running runs have no started_at" in status.stdout
    assert json.loads(cli("status", "--json", env=env).stdout)["runs"]["untimed"] == 2
    doctor = cli("doctor", env=env)
    assert doctor.returncode == 1 and "✗ untimed runs: 2 running runs" in doctor.stdout

    with engine.begin() as conn:
        conn.exec_driver_sql(check.fix.split("for these: ", 1)[1])  # the fix doctor gives, verbatim
    engine.dispose()
    assert untimed_check().ok
    assert "Warning" not in cli("status", env=env).stdout


def test_json_logs_carry_run_chain_attempt_and_event(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        run_id = insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=2))
    engine.dispose()
    result = cli("--log-format", "json", "check", env={"DATABASE_URL": db_url})
    assert result.returncode == 0
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    [stuck] = [e for e in entries if e.get("event") == "stuck"]
    assert stuck["run_id"] == str(run_id) and stuck["level"] == "WARNING"
    assert stuck["message"] == "Data Architect in Belgium: Run stuck for 2.0h - retry 1/4 scheduled"
    assert stuck["limit"] == "limit 1.0h, the default (STUCK_AFTER)"  # SPEC §14: which limit, and why
    assert stuck["chain"] == str(run_id) and stuck["attempt"] == 0 and stuck["retry_id"]


def test_fix_records_each_jobs_run_with_that_jobs_own_counts(db_url, engine):
    """`fix` is both jobs: `status` shows the sweep's counts as the checker's last run and the
    pass's as the processor's, as the daemon's runs of them would be."""
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        insert_run(conn, started_at=now - timedelta(hours=2))  # stuck: failed, its retry due in 4h
        insert_due_retry(conn, search_query="Engineer", now=now)  # due now: executed by the pass
    result = cli("fix", env={"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"})
    assert result.returncode == 0, result.stderr
    with engine.connect() as conn:
        counts = dict(conn.execute(sa.text("SELECT job_id, counts FROM stuck_runs_job_runs")).all())
    assert counts["stuck_run_checker"]["failed"] == 1 and "executed" not in counts["stuck_run_checker"]
    assert counts["retry_processor"]["executed"] == 1 and "batches" not in counts["retry_processor"]


@pytest.mark.parametrize(
    "command",
    [
        ["check"],
        ["process"],
        ["fix"],
        ["retry"],
        ["history"],
        ["status"],
        ["stats"],
        ["dlq"],
        ["dlq", "list"],
        ["dlq", "show"],
        ["dlq", "requeue"],
        ["dlq", "purge"],
        ["migrate"],
        ["doctor"],
        ["daemon"],
        ["demo"],
    ],
)
def test_every_command_has_help_with_an_example(command):
    result = cli(*command, "--help")
    assert result.returncode == 0 and "Example" in result.stdout
