"""Cancelling a running retry (SPEC §16) with real processes: a command retry executed by a
`stuck-runs process` of its own, cancelled from another process (the CLI); the API, the page and
bad input in-process."""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobs.executors.processes import _group_alive
from tests.daemons import DaemonProcess, wait_until
from tests.helpers import insert_due_retry, insert_run, make_runtime, row, rows
from tests.integration.test_cli import cli, one_line_error
from tests.web import ADMIN

pytestmark = pytest.mark.slow
POLL = 0.5  # DISPATCH_POLL of the executing process


def hanging(pid_file: Path, *, ignore_term: bool = False) -> str:
    """A scraper that writes its process group's id and hangs, with a child in its group (what a
    browser would be); with `ignore_term`, SIGTERM is ignored by both (only SIGKILL ends them)."""
    trap = "trap '' TERM; " if ignore_term else ""
    script = f"{trap}sleep 300 & echo $$ > {shlex.quote(str(pid_file))}; wait; sleep 300"
    return f"sh -c {shlex.quote(script)} scraper {{run_id}}"


def executing(db_url: str, command: str, **env: str) -> DaemonProcess:
    """`stuck-runs process`: executes the due retry here and waits for it."""
    settings = {"SCRAPE_RUN_COMMAND": command, "DISPATCH_POLL": str(POLL), **env}
    return DaemonProcess(db_url, sys.executable, "-m", "scheduler", "process", **settings)


def started(engine, retry, pid_file: Path) -> int:
    pgid = wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=30)
    with engine.connect() as conn:
        assert row(conn, retry)["status"] == "running"
    return int(pgid)


def cancelled_at(engine, retry) -> float:
    def done():
        with engine.connect() as conn:
            return row(conn, retry)["status"] == "cancelled"

    wait_until(done, timeout=60, every=0.05)
    return time.monotonic()


def test_a_hanging_command_retry_is_cancelled_from_another_process_within_the_poll(engine, db_url, tmp_path):
    root, retry = due(engine)
    pid_file = tmp_path / "pgid"
    proc = executing(db_url, hanging(pid_file))
    try:
        pgid = started(engine, retry, pid_file)
        asked = cli("cancel", str(root), env={"DATABASE_URL": db_url})  # the chain's root names its running retry
        assert asked.returncode == 0, asked.stderr
        requested = time.monotonic()
        assert (
            f"Cancel of running retry 1/4 ({retry}) requested: the process executing it stops it within" in asked.stdout
        )
        took = cancelled_at(engine, retry) - requested
        assert took < POLL + 2, took  # within the poll (and the group's end), not at CANCEL_TIMEOUT (30s)
        assert not _group_alive(pgid)  # the scraper and its child alike
        assert proc.proc.wait(30) == 0
    finally:
        log = proc.stop()
    assert "cancelled by operator" in log
    with engine.connect() as conn:
        chain = rows(conn, "id = :r OR original_run_id = :r", r=root)
        leftovers = conn.execute(sa.text("SELECT count(*) FROM stuck_runs_cancels")).scalar_one()
    assert [r["status"] for r in chain] == ["failed", "cancelled"]  # no retry scheduled
    assert chain[1]["error_message"] == "Cancelled by operator" and chain[1]["max_retries"] == 4
    assert chain[1]["next_retry_at"] is None and chain[1]["completed_at"] is not None and leftovers == 0


def test_a_retry_that_ignores_sigterm_is_killed_after_cancel_timeout(engine, db_url, tmp_path):
    _, retry = due(engine)
    pid_file = tmp_path / "pgid"
    proc = executing(db_url, hanging(pid_file, ignore_term=True), CANCEL_TIMEOUT="2s")
    try:
        pgid = started(engine, retry, pid_file)
        assert cli("cancel", str(retry), env={"DATABASE_URL": db_url}).returncode == 0
        requested = time.monotonic()
        took = cancelled_at(engine, retry) - requested
        assert 2 <= took < 2 + POLL + 3, took  # SIGTERM ignored: SIGKILL after CANCEL_TIMEOUT
        assert not _group_alive(pgid)
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()


# SIGTERM is ignored from the first line, so the cancel's SIGTERM cannot end the scraper before it
# has written its completion (a slow start under load did, once): only CANCEL_TIMEOUT's SIGKILL
# ends it, well after the completion is in. `ready` tells the test it is reading the requests.
COMPLETES_THEN_HANGS = """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
import os, sys, time
import sqlalchemy as sa
engine = sa.create_engine(os.environ["DATABASE_URL"])
run_id = os.environ["SCRAPE_RUN_ID"]
asked = sa.text("SELECT count(*) FROM stuck_runs_cancels WHERE run_id = :id")
with engine.connect() as conn:
    conn.execute(sa.text("SELECT 1"))
    open(sys.argv[1], "w").close()
    while not conn.execute(asked, dict(id=run_id)).scalar_one():
        conn.rollback()
        time.sleep(0.02)
with engine.begin() as conn:
    conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed', completed_at = now() WHERE id = :id"), dict(id=run_id))
time.sleep(300)
"""


def test_a_cancel_that_races_the_run_s_own_completion_leaves_the_completion_standing(engine, db_url, tmp_path):
    """The scraper writes `completed` once the request is in, then hangs: the cancel still stops
    its processes, and the completion it wrote stands."""
    _, retry = due(engine)
    script = tmp_path / "completes.py"
    script.write_text(COMPLETES_THEN_HANGS)
    ready = tmp_path / "ready"
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(ready))}"
    proc = executing(db_url, command, CANCEL_TIMEOUT="3s")
    try:
        wait_until(ready.exists, timeout=30)
        assert cli("cancel", str(retry), env={"DATABASE_URL": db_url}).returncode == 0
        assert proc.proc.wait(60) == 0  # its process was stopped all the same
    finally:
        log = proc.stop()
    with engine.connect() as conn:
        done = row(conn, retry)
        leftovers = conn.execute(sa.text("SELECT count(*) FROM stuck_runs_cancels")).scalar_one()
    assert done["status"] == "completed" and done["error_message"] is None, log
    assert leftovers == 0 and "the scraper wrote completed; it stands" in log


def due(engine):
    with engine.begin() as conn:
        return insert_due_retry(conn)


def status(engine, run_id) -> str:
    with engine.connect() as conn:
        return row(conn, run_id)["status"]


# -- in-process: the API, the page, what is refused ---------------------------------------------


def running_retry(engine, **columns):
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        root = insert_run(
            conn, status="failed", started_at=now - timedelta(hours=3), error_message="Run stuck for 1.2h"
        )
        retry = insert_run(
            conn, status="running", started_at=now, retry_count=1, is_retry=True, original_run_id=root, **columns
        )
    return root, retry


def run_lock(engine, retry):
    """A session holding the retry's run lock: a live process executing it."""
    rt = make_runtime(engine.url.render_as_string(hide_password=False))
    namespace = rt.queries.runs_ns
    rt.close()
    conn = engine.connect()
    conn.execute(sa.text("SELECT pg_advisory_lock(:ns, hashtext(:id))"), {"ns": namespace, "id": str(retry)})
    conn.commit()
    return conn


def test_the_api_and_the_page_cancel_a_running_retry(engine, web):
    _, gone = running_retry(engine)  # its process died: nobody holds its lock
    _, live = running_retry(engine)
    _, hooked = running_retry(engine, handed_off="webhook")
    holder = run_lock(engine, live)
    try:
        client = web.client(ADMIN)
        page = client.get(f"/runs/{live}")
        assert page.status_code == 200 and "Cancel running retry" in page.text
        answer = client.post(f"/api/runs/{live}/cancel")
        assert answer.status_code == 200, answer.text
        assert "requested: the process executing it stops it within DISPATCH_POLL" in answer.json()["message"]
        assert answer.json()["data"]["running"] == "requested" and status(engine, live) == "running"
        with engine.connect() as conn:
            [request] = conn.execute(sa.text("SELECT run_id, requested_by FROM stuck_runs_cancels")).all()
        assert request[0] == str(live) and request[1].startswith("api on ")
        at_once = client.post(f"/api/runs/{gone}/cancel").json()
        assert "cancelled: no process was executing it" in at_once["message"] and status(engine, gone) == "cancelled"
        row_only = client.post(f"/api/runs/{hooked}/cancel").json()
        assert (
            "cancelled in the row only: it was handed to the webhook's receiver, which is not told"
            in row_only["message"]
        )
        assert status(engine, hooked) == "cancelled"
    finally:
        holder.close()


def test_what_cannot_be_cancelled_is_refused_in_one_line(engine, db_url, web):
    env = {"DATABASE_URL": db_url}
    with engine.begin() as conn:
        original = insert_run(conn, status="running", started_at=datetime.now(timezone.utc))
    refused = cli("cancel", str(original), env=env)
    assert refused.returncode == 1
    assert "is running but is not a retry stuck-runs started: stop it in the scraper itself" in one_line_error(refused)
    answer = web.client(ADMIN).post(f"/api/runs/{original}/cancel")
    assert answer.status_code in (400, 409) and answer.json()["success"] is False
    _, delivering = running_retry(
        engine,
        handed_off="webhook",
        delivering_by="elsewhere pid 1 delivery x",
        delivering_until=datetime.now(timezone.utc) + timedelta(seconds=40),
    )
    busy = web.client(ADMIN).post(f"/api/runs/{delivering}/cancel")
    assert busy.status_code == 409 and "is being delivered to the fleet" in busy.json()["error"]
    usage = cli("cancel", str(original), "--running", env=env)
    assert usage.returncode == 2 and "--running is for a bulk cancel" in one_line_error(usage)
    assert status(engine, original) == "running" and status(engine, delivering) == "running"


def test_bulk_cancel_touches_running_retries_only_with_running(engine, db_url):
    env = {"DATABASE_URL": db_url}
    _, gone = running_retry(engine, search_query="Nurse")
    plain = cli("cancel", "--search-query", "Nurse", env=env)
    assert plain.returncode == 0 and status(engine, gone) == "running", plain.stdout
    bulk = cli("cancel", "--search-query", "Nurse", "--running", env=env)
    assert bulk.returncode == 0, bulk.stderr
    assert "Cancelled 1 of 1 matching pending or running retry(ies)" in bulk.stdout
    assert status(engine, gone) == "cancelled"
