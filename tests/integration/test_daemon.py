"""The daemon as a real process: first run at start-up, schedule visible elsewhere, clean stop."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.errors import DatabaseUnavailable
from jobs.events import (
    DAEMON,
    JOB_IDS,
    JobRunsEnded,
    ProcessorPassFinished,
    RetryEnded,
    RetryStarted,
    SweepFinished,
)
from jobs.executors.inprocess import InProcess
from jobs.settings import load_settings
from scheduler import get_scheduler
from scheduler.daemon import Daemon
from scheduler.schedule import LiveSchedule, RecordedSchedule
from tests.conftest import REPO
from tests.daemons import DaemonProcess, wait_until
from tests.helpers import insert_due_retry, insert_run, make_runtime, row

pytestmark = pytest.mark.slow


def start_daemon(db_url: str, log_dir, **env: str) -> DaemonProcess:
    return DaemonProcess(
        db_url, **{"FAKE_SCRAPER_LOG": str(log_dir), "CHECK_INTERVAL": "1h", "PROCESS_INTERVAL": "30m", **env}
    )


def test_the_daemon_checks_at_start_shows_its_schedule_and_stops_cleanly(db_url, tmp_path):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        stuck = insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=2))
    daemon = start_daemon(db_url, tmp_path)
    try:

        def failed():
            with engine.connect() as conn:
                return row(conn, stuck)["status"] == "failed"

        wait_until(failed)
        schedule = RecordedSchedule(load_settings({"DATABASE_URL": db_url}))
        jobs = wait_until(lambda: [j for j in schedule.get_scheduled_jobs() if j.next_run_time])
        by_id = {j.id: j for j in schedule.get_scheduled_jobs()}
        assert set(by_id) == {"stuck_run_checker", "retry_processor"}
        now = datetime.now(timezone.utc)
        assert timedelta(minutes=50) < by_id["stuck_run_checker"].next_run_time - now <= timedelta(hours=1)
        assert timedelta(minutes=20) < by_id["retry_processor"].next_run_time - now <= timedelta(minutes=30)
        assert all(j.pid == daemon.pid for j in jobs)
        with engine.connect() as conn:
            last = dict(
                conn.execute(
                    sa.text(
                        "SELECT DISTINCT ON (job_id) job_id, outcome || ' failed=' || (counts->>'failed')"
                        " FROM stuck_runs_job_runs WHERE job_id = 'stuck_run_checker' ORDER BY job_id, started_at"
                    )
                ).all()
            )
        assert last == {"stuck_run_checker": "ok failed=1"}
    finally:
        err = daemon.stop()
    assert daemon.returncode == 0, err
    assert "daemon stopped" in err and "Traceback" not in err
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT stopped_at IS NOT NULL FROM stuck_runs_daemons")).scalar_one()
    engine.dispose()


@pytest.fixture
def release_schedule():
    """`get_scheduler()` keeps its engine for the process: let it go after the test."""
    yield
    get_scheduler().close()


def test_get_scheduler_in_the_daemon_s_own_process_reads_its_live_schedule(db_url):
    rt = make_runtime(db_url, InProcess())
    daemon = Daemon(rt)
    thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    thread.start()
    try:
        live = wait_until(lambda: isinstance(get_scheduler(), LiveSchedule) and get_scheduler())
        jobs = wait_until(lambda: [j for j in live.get_scheduled_jobs() if j.next_run_time])
        assert {j.id for j in jobs} == set(JOB_IDS)
        assert all((j.host, j.pid) == (daemon.host, os.getpid()) for j in jobs)
    finally:
        daemon.request_stop()
        thread.join(30)
        rt.close()
    assert not thread.is_alive() and not isinstance(get_scheduler(), LiveSchedule)  # stopped: the recorded one


def test_one_subscription_hears_the_daemon_s_sweeps_passes_retries_and_job_runs(db_url):
    """What notifications (SPEC §15) will do: subscribe once, hear what the daemon's jobs and slots did."""
    rt = make_runtime(db_url, command=("true",))
    with rt.engine.begin() as conn:
        insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=2))
        insert_due_retry(conn)
    heard = []
    rt.events.subscribe(heard.append)
    daemon = Daemon(rt)
    thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: {RetryEnded, JobRunsEnded} <= {type(e) for e in heard} and len(job_runs(heard)) >= 2)
    finally:
        daemon.request_stop()
        thread.join(30)
        rt.close()
    [sweep] = [e.result for e in heard if isinstance(e, SweepFinished)]
    assert sweep.failed == 1 and sweep.retries_scheduled == 1
    assert any(isinstance(e, ProcessorPassFinished) for e in heard)
    [started] = [e.run for e in heard if isinstance(e, RetryStarted)]
    [ended] = [e.outcome for e in heard if isinstance(e, RetryEnded)]
    assert ended.run_id == started.id and ended.status == "completed"
    assert {run.job_id: run.outcome for run in job_runs(heard)} == {job_id: "ok" for job_id in JOB_IDS}


def job_runs(heard: list) -> list:
    return [run for e in heard if isinstance(e, JobRunsEnded) and e.via == DAEMON for run in e.runs]


def test_get_scheduler_in_another_process_without_a_daemon_lists_both_jobs_unscheduled(
    db_url, monkeypatch, release_schedule
):
    monkeypatch.setenv("DATABASE_URL", db_url)
    jobs = get_scheduler().get_scheduled_jobs()
    assert [(j.id, j.next_run_time) for j in jobs] == [("stuck_run_checker", None), ("retry_processor", None)]


def test_get_scheduler_builds_one_engine_for_every_call_until_closed(db_url, monkeypatch, release_schedule):
    from scheduler import schedule

    built = []

    def counted(*args, **kwargs):
        built.append(make_engine(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(schedule, "make_engine", counted)
    monkeypatch.setenv("DATABASE_URL", db_url)
    first = get_scheduler().get_scheduled_jobs()
    assert get_scheduler().get_scheduled_jobs() == first
    assert len(built) == 1
    assert built[0].pool.checkedin() == 1  # its connection is kept for the next call
    get_scheduler().close()
    assert built[0].pool.checkedin() == 0
    assert get_scheduler().get_scheduled_jobs() == first
    assert len(built) == 2  # closed, then built again on demand


def test_get_scheduler_reads_dotenv_without_changing_the_environment(db_url, tmp_path, monkeypatch, release_schedule):
    (tmp_path / ".env").write_text(f"DATABASE_URL={db_url}\nSTUCK_RUNS_DOTENV_PROBE=from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    jobs = get_scheduler().get_scheduled_jobs()  # the URL comes from .env
    assert [j.id for j in jobs] == ["stuck_run_checker", "retry_processor"]
    assert dict(os.environ) == before
    # The real environment still wins over .env, as for every command.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nothing")
    with pytest.raises(DatabaseUnavailable, match="127.0.0.1"):
        get_scheduler().get_scheduled_jobs()


def test_a_forked_child_gets_its_own_engine_and_leaves_the_parents_session_alone(db_url, monkeypatch, release_schedule):
    from db.engine import application_name

    monkeypatch.setenv("DATABASE_URL", db_url)
    get_scheduler().get_scheduled_jobs()
    watcher = make_engine(db_url)

    def sessions(name: str) -> list[int]:
        with watcher.connect() as conn:
            query = "SELECT pid FROM pg_stat_activity WHERE application_name = :name"
            return conn.execute(sa.text(query), {"name": name}).scalars().all()

    parents = sessions(application_name("status"))
    assert len(parents) == 1
    child = os.fork()
    if child == 0:  # the child: ask, close, and leave without running the parent's exit handlers
        code = 1
        try:
            get_scheduler().get_scheduled_jobs()
            get_scheduler().close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    time.sleep(0.5)  # a session the child had ended would be gone by now
    assert sessions(application_name("status")) == parents
    get_scheduler().get_scheduled_jobs()
    assert sessions(application_name("status")) == parents  # the same session, reused
    watcher.dispose()


def test_sigterm_puts_an_executing_retry_back_without_spending_budget(db_url, tmp_path):
    engine = make_engine(db_url)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=now - timedelta(hours=5), search_query="hang")
        retry = insert_run(
            conn,
            status="pending_retry",
            search_query="hang",
            retry_count=1,
            is_retry=True,
            original_run_id=root,
            next_retry_at=now - timedelta(minutes=1),
        )
    daemon = start_daemon(db_url, tmp_path)
    wait_until(lambda: (tmp_path / f"{retry}.json").exists())
    started = time.monotonic()
    err = daemon.stop()
    stop_seconds = time.monotonic() - started
    assert daemon.returncode == 0, err
    with engine.connect() as conn:
        back = row(conn, retry)
    assert (back["status"], back["retry_count"]) == ("pending_retry", 1)
    assert back["next_retry_at"] >= now
    assert stop_seconds < 30
    engine.dispose()


def test_get_scheduler_in_the_daemons_own_process_is_the_live_scheduler(db_url):
    import threading

    from scheduler.daemon import Daemon
    from scheduler.schedule import LiveSchedule
    from tests.helpers import ScriptedScraper, make_runtime

    rt = make_runtime(db_url, ScriptedScraper())
    daemon = Daemon(rt)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        schedule = wait_until(lambda: isinstance(get_scheduler(), LiveSchedule) and get_scheduler())

        def both_ran_once():
            later = [j for j in schedule.get_scheduled_jobs() if j.next_run_time > datetime.now(timezone.utc)]
            return later if len(later) == 2 else None

        jobs = wait_until(both_ran_once)
        assert sorted(j.id for j in jobs) == ["retry_processor", "stuck_run_checker"]
        assert all(j.pid == os.getpid() for j in jobs)
    finally:
        daemon.request_stop()
        runner.join(30)
    assert not runner.is_alive()
    assert not isinstance(get_scheduler(), LiveSchedule)
    rt.close()


def test_a_tick_that_fires_late_still_runs(db_url):
    """SPEC §8: a misfire grace of about one interval. The first ticks are due when the daemon is
    built; here they come 3 s late, past APScheduler's default grace of 1 s, and still run."""
    import threading

    from scheduler.daemon import Daemon
    from tests.helpers import ScriptedScraper, make_runtime

    rt = make_runtime(db_url, ScriptedScraper())
    with rt.engine.begin() as conn:
        stuck = insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=2))
    daemon = Daemon(rt)
    jobs = {job.id: job for job in daemon.scheduler.get_jobs()}
    every = {"stuck_run_checker": rt.settings.check_interval, "retry_processor": rt.settings.process_interval}
    for job_id, interval in every.items():  # a grace of one interval, whatever the interval
        assert jobs[job_id].trigger.interval == interval
        assert jobs[job_id].misfire_grace_time == int(interval.total_seconds())
    assert all(job.coalesce and job.max_instances == 1 for job in jobs.values())
    time.sleep(3)  # a busy host, a suspended VM
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_until(lambda: row_status(rt.engine, stuck) == "failed", timeout=30)
    finally:
        daemon.request_stop()
        runner.join(30)
    assert not runner.is_alive()
    rt.close()


def row_status(engine, run_id) -> str:
    with engine.connect() as conn:
        return row(conn, run_id)["status"]


def test_status_from_another_process_shows_jobs_daemon_and_counts(db_url, tmp_path):
    import json

    engine = make_engine(db_url)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        insert_run(conn, started_at=now - timedelta(hours=3))
        insert_run(conn, started_at=now - timedelta(minutes=5))
    daemon = start_daemon(db_url, tmp_path, RETRY_DELAY="2h")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": db_url}
    try:
        wait_until(lambda: scalar_count(engine, "SELECT count(*) FROM stuck_runs_job_runs") >= 2)
        with engine.begin() as conn:
            insert_run(conn, started_at=now - timedelta(hours=2))  # stuck, not yet seen by the checker
        text = subprocess.run(
            [sys.executable, "-m", "scheduler", "status"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        report = json.loads(
            subprocess.run(
                [sys.executable, "-m", "scheduler", "status", "--json"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
        )
    finally:
        err = daemon.stop()
    assert daemon.returncode == 0, err
    assert text.returncode == 0, text.stderr
    assert f":{daemon.pid}, up since" in text.stdout and "Daemon alive" in text.stdout
    lines = {line.split()[0]: line for line in text.stdout.splitlines() if line.startswith(("stuck_run", "retry_proc"))}
    assert "ok" in lines["stuck_run_checker"] and "failed=1" in lines["stuck_run_checker"]
    assert "ok" in lines["retry_processor"]
    assert "Runs: 2 running (1 stuck) · 1 pending_retry (next due" in text.stdout
    assert "· permanently failed (24h): 0" in text.stdout
    assert report["daemon_alive"] and report["runs"]["pending_retry"] == 1 and report["runs"]["stuck"] == 1
    jobs = {j["job_id"]: j for j in report["jobs"]}
    assert jobs["stuck_run_checker"]["next_run"] and jobs["retry_processor"]["outcome"] == "ok"


def scalar_count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prometheus_metrics_are_served_and_count_what_happened(db_url, tmp_path):
    import urllib.request

    engine = make_engine(db_url)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        for query in ("ok one", "ok two", "fail503 three"):
            insert_run(conn, search_query=query, started_at=now - timedelta(hours=2))
    port = free_port()
    daemon = start_daemon(
        db_url,
        tmp_path,
        METRICS_PORT=str(port),
        RETRY_DELAY="0s",
        DISPATCH_POLL="0.2s",
        PROCESS_INTERVAL="1s",
        MAX_RETRIES="1",
    )

    def scrape() -> dict[str, float]:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return {}
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("stuck_runs_") and not line.startswith("#")
        }

    try:
        metrics = wait_until(
            lambda: (
                (m := scrape())
                and m.get("stuck_runs_retries_failed_total") == 1.0
                and m.get("stuck_runs_retries_succeeded_total") == 2.0
                and m
            )
        )
    finally:
        err = daemon.stop()
    assert daemon.returncode == 0, err
    assert metrics["stuck_runs_stuck_detected_total"] == 3
    assert metrics["stuck_runs_retries_started_total"] == 3
    assert metrics["stuck_runs_retries_succeeded_total"] == 2
    assert metrics["stuck_runs_retries_scheduled_total"] == 3  # budget 1: none after the 503
    assert metrics["stuck_runs_dead_lettered_total"] == 1
    assert metrics['stuck_runs_job_last_success_timestamp_seconds{job="stuck_run_checker"}'] > now.timestamp() - 5
    assert "stuck_runs_pending_retries" in metrics and "stuck_runs_running_retries" in metrics
    # The monitoring kit's gauges (monitoring/): the heartbeat's reading of the fleet, the intervals.
    assert metrics["stuck_runs_live_daemons"] == 1 and metrics["stuck_runs_paused_since_timestamp_seconds"] == 0
    assert metrics["stuck_runs_daemon_heartbeat_timestamp_seconds"] > now.timestamp() - 5
    assert metrics["stuck_runs_daemon_started_timestamp_seconds"] > now.timestamp() - 5
    assert metrics['stuck_runs_job_interval_seconds{job="stuck_run_checker"}'] == 3600
    assert metrics['stuck_runs_job_interval_seconds{job="retry_processor"}'] == 1
    engine.dispose()
