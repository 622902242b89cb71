"""Executors against real processes: argv without a shell, timeouts, stderr, callables."""

from __future__ import annotations

import json
import shlex
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from db.errors import ConfigError
from jobs.executors.base import ExecutorMisconfigured
from jobs.executors.callable import CallableExecutor
from jobs.executors.command import CommandExecutor
from jobs.executors.outcome import Completed, Failed, Released, TimedOut
from jobs.executors.wiring import build_executor
from jobs.model import Run
from jobs.settings import load_settings
from tests.daemons import wait_until

FAKE = Path(__file__).resolve().parent.parent / "fake_scraper.py"
COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} --query {{search_query}} --run-id={{run_id}}"


def a_run(search_query: str, location_query: str = "Belgium", **inputs) -> Run:
    return Run(
        id=uuid.uuid4(),
        status="running",
        what=f"{search_query} in {location_query}",
        retry_count=1,
        max_retries=4,
        is_retry=True,
        original_run_id=uuid.uuid4(),
        inputs={"search_query": search_query, "location_query": location_query, **inputs},
    )


@pytest.fixture
def log_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FAKE_SCRAPER_LOG", str(tmp_path))
    return tmp_path


def command_executor() -> CommandExecutor:
    return build_executor(load_settings({"SCRAPE_RUN_COMMAND": COMMAND}))


def record(log_dir: Path, run: Run) -> dict:
    return json.loads((log_dir / f"{run.id}.json").read_text())


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie waiting for a reaper counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_query_reaches_the_command_as_plain_text(log_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    marker = tmp_path / "marker"
    query = f"ok $(touch {marker}); rm -rf {victim}; `touch {marker}`"
    run = a_run(query, location_query="Köln; echo 'x'")
    result = command_executor().execute(run, timedelta(seconds=30), threading.Event())
    assert isinstance(result, Completed)
    assert record(log_dir, run)["argv"] == ["--query", query, f"--run-id={run.id}"]
    assert not marker.exists() and victim.exists()


def test_the_runs_fields_are_in_the_environment(log_dir):
    run = a_run("ok jobs", config={"pages": 3}, user_id=7)
    command_executor().execute(run, timedelta(seconds=30), threading.Event())
    env = record(log_dir, run)["env"]
    assert env["SCRAPE_RUN_ID"] == str(run.id)
    assert env["SCRAPE_RUN_SEARCH_QUERY"] == "ok jobs" and env["SCRAPE_RUN_LOCATION_QUERY"] == "Belgium"
    assert env["SCRAPE_RUN_RETRY_COUNT"] == "1" and env["SCRAPE_RUN_ORIGINAL_RUN_ID"] == str(run.original_run_id)
    assert json.loads(env["SCRAPE_RUN_CONFIG"]) == {"pages": 3} and env["SCRAPE_RUN_USER_ID"] == "7"
    assert json.loads(env["SCRAPE_RUN_INPUTS"])["config"] == {"pages": 3}


def test_a_failure_reports_the_last_stderr_line_and_keeps_the_tail(log_dir):
    result = command_executor().execute(a_run("fail503"), timedelta(seconds=30), threading.Event())
    assert isinstance(result, Failed)
    assert result.error == "requests.exceptions.HTTPError: 503 Server Error: Service Unavailable"
    assert "fetching page 1" in result.detail


def test_a_retry_after_on_stderr_is_reported(log_dir):
    result = command_executor().execute(a_run("ratelimited"), timedelta(seconds=30), threading.Event())
    assert result.retry_after == timedelta(hours=2)


def test_a_hanging_scraper_and_its_children_are_killed_at_the_timeout(log_dir):
    run = a_run("hang forever")
    result = command_executor().execute(run, timedelta(seconds=1), threading.Event())
    assert isinstance(result, TimedOut)
    pids = record(log_dir, run)
    assert not alive(pids["pid"]) and not alive(pids["child_pid"])


def test_nothing_the_scraper_started_outlives_its_attempt(log_dir, monkeypatch):
    monkeypatch.setattr("jobs.executors.processes.KILL_GRACE_SECONDS", 0.5)
    run = a_run("leak a browser")
    result = command_executor().execute(run, timedelta(seconds=30), threading.Event())
    assert isinstance(result, Completed)
    assert not alive(record(log_dir, run)["child_pid"])  # it ignored SIGTERM: SIGKILL ended it


def test_a_hanging_callable_and_its_children_are_killed_at_the_timeout(log_dir):
    run = a_run("hang with a child")
    result = CallableExecutor("tests.scrapers:spawn_and_hang").execute(run, timedelta(seconds=2), threading.Event())
    assert isinstance(result, TimedOut)
    assert not alive(int((log_dir / f"{run.id}.child").read_text()))


def test_a_cancel_stops_the_scraper_and_says_so(log_dir):
    run = a_run("hang")
    execution = command_executor().start(run)
    wait_until(lambda: (log_dir / f"{run.id}.json").exists())  # it runs, and has started its child
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    result = execution.wait(timedelta(minutes=5), cancel)
    assert isinstance(result, Released)
    pids = record(log_dir, run)
    assert not alive(pids["pid"]) and not alive(pids["child_pid"])


def test_a_missing_program_is_a_configuration_error():
    with pytest.raises(ExecutorMisconfigured, match="not found"):
        build_executor(load_settings({"SCRAPE_RUN_COMMAND": "no-such-scraper --run {run_id}"}))
    with pytest.raises(ConfigError, match="no executor configured"):
        build_executor(load_settings({}))


def test_a_callable_that_returns_succeeds():
    result = CallableExecutor("tests.scrapers:succeed").execute(a_run("x"), timedelta(seconds=60), threading.Event())
    assert isinstance(result, Completed)


def test_a_callable_that_raises_fails_with_its_traceback():
    result = CallableExecutor("tests.scrapers:fail_503").execute(
        a_run("Data Architect"), timedelta(seconds=60), threading.Event()
    )
    assert result.error == "RuntimeError: HTTP 503 Service Unavailable while scraping Data Architect"
    assert "Traceback" in result.detail and "fail_503" in result.detail


def test_a_callables_retry_after_attribute_is_reported():
    result = CallableExecutor("tests.scrapers:rate_limited").execute(
        a_run("x"), timedelta(seconds=60), threading.Event()
    )
    assert result.retry_after == timedelta(hours=1)


def test_a_hanging_callable_is_killed_at_the_timeout():
    execution = CallableExecutor("tests.scrapers:hang").start(a_run("x"))
    result = execution.wait(timedelta(seconds=2), threading.Event())
    assert isinstance(result, TimedOut)
    assert not alive(execution.process.pid)


@pytest.mark.parametrize("path", ["tests.scrapers:nothing_here", "tests.no_such_module:run"])
def test_a_callable_that_cannot_be_imported_is_refused_at_start(path):
    with pytest.raises(ExecutorMisconfigured, match="cannot be imported"):
        CallableExecutor(path)


@pytest.mark.parametrize(
    ("query", "message", "retried"),
    [
        (
            "fail503 jobs",
            "requests.exceptions.HTTPError: 503 Server Error: Service Unavailable - retry 2/4 scheduled",
            True,
        ),
        ("404 jobs", "HTTP Error 404: Not Found - not retried: permanent error (not_found)", False),
        ("hang jobs", "Execution timed out after 1s - retry 2/4 scheduled", True),
    ],
)
def test_real_commands_through_the_processor(db_url, log_dir, query, message, retried):
    from jobs.retries import process_due_retries
    from tests.helpers import insert_due_retry, make_runtime

    rt = make_runtime(
        db_url, command=load_settings({"SCRAPE_RUN_COMMAND": COMMAND}).command, execution_timeout=timedelta(seconds=1)
    )
    with rt.engine.begin() as conn:
        insert_due_retry(conn, search_query=query)
    [outcome] = process_due_retries(rt).executed
    assert (outcome.message, outcome.retry_due is not None) == (message, retried)
    rt.close()
