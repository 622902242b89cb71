"""Ctrl-C and SIGTERM on the real console script, at each stage: nothing lost, nothing left running.

A signal during a sweep ends it after its batch and the command prints what it committed; during
an execution the scraper's whole process group is ended and the retry goes back to
`pending_retry`, due now, budget unspent; during the output the printing stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from tests.conftest import REPO
from tests.daemons import wait_until
from tests.helpers import insert_due_retry, insert_run, insert_stuck_runs, rows

pytestmark = pytest.mark.slow  # real processes, signalled

FAKE_SCRAPER = str(REPO / "tests" / "fake_scraper.py")
SCRIPT = str(REPO / "scripts" / "fix_stuck_runs_with_retry.py")


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "STUCK_", "RETRY_", "SCRAPE_"))}
    return subprocess.Popen(
        args,
        env={**base, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "Z"
    return state != "Z"


@pytest.fixture
def hanging(db_url, tmp_path):
    """A due retry whose scraper hangs (with a child of its own), and a run stuck for two hours."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        root, retry = insert_due_retry(conn, search_query="hang forever")
        stuck = insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=2), search_query="Stuck")
    log_dir = tmp_path / "scraper-log"
    log_dir.mkdir()
    env = {
        "DATABASE_URL": db_url,
        "SCRAPE_RUN_COMMAND": f"{sys.executable} {FAKE_SCRAPER}",
        "FAKE_SCRAPER_LOG": str(log_dir),
    }
    yield engine, env, retry, stuck, log_dir
    engine.dispose()


COMMANDS = {
    "process": [sys.executable, "-m", "scheduler", "process"],
    "fix": [sys.executable, "-m", "scheduler", "fix"],
    "script": [sys.executable, SCRIPT],
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_signal_during_an_execution_puts_the_retry_back_and_ends_the_scraper(hanging, command, signum):
    engine, env, retry, stuck, log_dir = hanging
    proc = start(COMMANDS[command], env)
    record = log_dir / f"{retry}.json"
    wait_until(record.exists)
    scraper = json.loads(record.read_text())
    before_signal = datetime.now(timezone.utc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)

    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert f"Interrupted by {signal.Signals(signum).name}" in out
    assert "1 put back to pending_retry" in out
    with engine.connect() as conn:
        by_id = {r["id"]: r for r in rows(conn)}
    back = by_id[retry]
    assert back["status"] == "pending_retry" and back["retry_count"] == 1 and back["max_retries"] == 4
    assert back["next_retry_at"] <= before_signal + timedelta(seconds=30)  # due now, not in 4 hours
    assert not alive(scraper["pid"]) and not alive(scraper["child_pid"])
    if command != "process":  # the sweep before the execution committed, and said so first
        assert by_id[stuck]["status"] == "failed"
        assert out.index("failed 1 stuck run(s)") < out.index("Executing [RETRY 1/4] hang forever in Belgium")


def test_fix_says_what_it_does_as_it_does_it(hanging):
    engine, env, retry, _, log_dir = hanging
    proc = start(COMMANDS["fix"], env)
    wait_until((log_dir / f"{retry}.json").exists)
    # While the scraper runs, the sweep's result and the execution under way are already on stdout.
    first = proc.stdout.readline()
    assert first.startswith("Stuck-run sweep: failed 1 stuck run(s)")
    lines = [first]
    while not lines[-1].startswith("Executing "):
        lines.append(proc.stdout.readline())
    assert lines[-1].startswith("Executing [RETRY 1/4] hang forever in Belgium")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)


@pytest.fixture
def many_stuck(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        insert_stuck_runs(conn, 20000, datetime.now(timezone.utc) - timedelta(hours=3))
    yield engine
    engine.dispose()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_sweep_ends_it_after_its_batch_and_reports_what_was_committed(db_url, many_stuck, signum):
    engine = many_stuck
    proc = start([sys.executable, "-m", "scheduler", "check", "--batch-size", "10", "--json"], {"DATABASE_URL": db_url})

    def some_failed() -> bool:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'failed'")).scalar() > 0

    wait_until(some_failed)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    reported = json.loads(out[: out.rindex("}") + 1])
    with engine.connect() as conn:
        failed = conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'failed'")).scalar()
        pending = conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'pending_retry'")).scalar()
    assert 0 < failed < 20000  # it stopped early...
    assert reported["failed"] == failed == pending  # ...and said exactly what it had committed


def test_a_signal_during_the_output_stops_the_printing(db_url, many_stuck):
    # --all: every one of the 20,000 rows is printed, so the pipe fills and the printing is still going
    proc = start([sys.executable, "-m", "scheduler", "check", "--all"], {"DATABASE_URL": db_url})
    first = proc.stdout.readline()  # the sweep is over; the 20,000-row table is being written
    assert first.startswith("Stuck-run sweep: failed 20000 stuck run(s)")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert "interrupted while printing the result; the work itself had finished" in err
    assert len(out.splitlines()) < 20000


def test_a_signal_during_retry_now_puts_the_retry_back(hanging):
    engine, env, _, _, log_dir = hanging
    with engine.begin() as conn:
        failed = insert_run(conn, status="failed", started_at=datetime.now(timezone.utc), search_query="hang again")
    proc = start(
        [sys.executable, "-m", "scheduler", "retry", str(failed), "--now", "--max-concurrent-retries", "2"], env
    )
    wait_until(lambda: _retry_of(engine, failed) is not None)
    retry = _retry_of(engine, failed)
    wait_until((log_dir / f"{retry}.json").exists)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Interrupted by SIGINT" in out
    with engine.connect() as conn:
        again = {r["id"]: r for r in rows(conn)}[retry]
    assert again["status"] == "pending_retry" and again["retry_count"] == 1


def _retry_of(engine: sa.Engine, failed) -> object:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id FROM scrape_runs WHERE original_run_id = :f"), {"f": failed}).scalar()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_migrate_stops_it_between_statements_and_a_rerun_finishes(databases, sig):
    from tests.schema import TEXT_STATUS

    url = databases.create()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql(  # big enough that each CONCURRENTLY build takes a moment
            "INSERT INTO scrape_runs (search_query, location_query, status, started_at) "
            "SELECT 'q' || g, 'l', CASE WHEN mod(g, 7) = 0 THEN 'running' ELSE 'completed' END, now() "
            "FROM generate_series(1, 300000) g"
        )

    def migrated_columns() -> bool:
        with engine.connect() as conn:
            return (
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_attribute WHERE attrelid = 'scrape_runs'::regclass AND attname = 'is_retry'"
                ).scalar_one()
                == 1
            )

    proc = start([sys.executable, "-m", "scheduler", "migrate"], {"DATABASE_URL": url})
    wait_until(migrated_columns, timeout=60)  # the columns are committed; the indexes are being built
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (out, err)
    assert "Traceback" not in err
    assert "migrate stopped between two statements" in err and "Run `stuck-runs migrate` again" in err
    assert "Migrated" not in out
    again = subprocess.run(
        [sys.executable, "-m", "scheduler", "migrate"],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert again.returncode == 0 and "Migrated scrape_runs from revision none to 0010" in again.stdout, again.stderr
    with engine.connect() as conn:
        invalid = conn.exec_driver_sql("SELECT count(*) FROM pg_index WHERE NOT indisvalid").scalar_one()
    engine.dispose()
    assert invalid == 0
