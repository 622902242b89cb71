"""tests/cli.py runs commands in the test's process; these hold it to what the real process does,
so that a test going through it can still fail for everything a process would show."""

from __future__ import annotations

import os
import re
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from loguru import logger

from db.engine import make_engine
from tests.cli import run, run_process
from tests.daemons import wait_until
from tests.helpers import insert_run
from tests.integration.test_cli import one_line_error

STAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?")


def same(text: str) -> str:
    """Output with what differs from one run to the next (times, ids, database names, pids,
    durations: every number) blanked."""
    text = STAMP.sub("<time>", text)
    text = re.sub(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", "<uuid>", text)
    text = re.sub(r"sr_test_[0-9a-f]+", "<database>", text)
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "<n>", text)


@pytest.fixture
def stuck(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(days=2))
    engine.dispose()
    return db_url


@pytest.mark.parametrize(
    "env",
    [{}, {"DATABASE_URL": "postgresql://u@127.0.0.1:1/db"}],
    ids=["no database", "a database"],
)
@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["check", "--no-such-flag"],  # click's usage error: 2
        ["no-such-command"],
        ["check"],  # DATABASE_URL is not set / the server cannot be reached
        ["check", "--stuck-after", "soon"],
        ["check", "--json", "--stuck-after", "soon"],
    ],
)
def test_a_refusal_is_the_same_in_process_and_in_the_console_script(args, env):
    env = {"PATH": os.environ["PATH"], **env}
    inside, process = run(args, env=env), run_process(args, env=env)
    assert inside.returncode == process.returncode, (inside, process)
    assert same(inside.stdout) == same(process.stdout)
    assert same(inside.stderr) == same(process.stderr)


# Every command family once through the real console script (the daemon, serve and demo always
# run as processes), beside the same command in-process, each on its own copy of the same table.
@pytest.mark.parametrize(
    "args",
    [
        ["--log-level", "DEBUG", "check"],
        ["fix", "--json"],
        ["history", "not-a-uuid"],
        ["retry", "--older-than", "1h"],
        ["cancel", "--search-query", "Data Architect"],
        ["pause", "--for", "1h"],
        ["resume"],
        ["stats"],
        ["dlq"],
        ["doctor"],
        ["migrate", "--sql"],
        ["sql", "pending"],
        ["status", "--json"],
    ],
    ids=lambda args: args[-1] if args[0] == "--log-level" else args[0],
)
def test_a_command_answers_and_changes_the_table_alike_in_process_and_in_the_console_script(databases, templates, args):
    results, tables = [], []
    for runner in (run, run_process):
        url = databases.create(templates["text_tz"])
        engine = make_engine(url)
        with engine.begin() as conn:
            insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(days=2))
            insert_run(conn, status="failed", started_at=datetime.now(timezone.utc) - timedelta(hours=3))
        env = {"PATH": os.environ["PATH"], "DATABASE_URL": url, "SCRAPE_RUN_COMMAND": "true"}
        results.append(runner(args, env=env))
        with engine.connect() as conn:
            tables.append(
                conn.exec_driver_sql("SELECT status, is_retry, retry_count FROM scrape_runs ORDER BY 1, 2, 3").all()
            )
        engine.dispose()
    inside, process = results
    assert inside.returncode == process.returncode, (inside, process)
    assert "Traceback" not in inside.stderr + process.stderr
    assert same(inside.stdout) == same(process.stdout)
    assert same(inside.stderr) == same(process.stderr)
    assert tables[0] == tables[1]


def test_an_exception_that_escapes_is_a_traceback_on_stderr_and_exit_1(stuck, monkeypatch):
    import scheduler.cli

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug, not an operator's mistake")

    monkeypatch.setattr(scheduler.cli, "settings_from_environment", broken)
    result = run(["check"], env={"DATABASE_URL": stuck})
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.rstrip().endswith("RuntimeError: a bug, not an operator's mistake")
    with pytest.raises(AssertionError, match="Traceback"):
        one_line_error(result)  # the check the suite relies on sees it


def test_exit_codes_stdin_and_the_environment_are_the_processes_own(monkeypatch):
    import scheduler.cli

    seen = {}

    def probe(*_args, **_kwargs):
        seen["stdin"] = __import__("sys").stdin.read()
        seen["child's stdin"] = subprocess.run(["cat"], capture_output=True, text=True, timeout=10).stdout
        seen["env"] = dict(os.environb)
        seen["cwd"] = os.getcwd()
        raise SystemExit(3)

    monkeypatch.setattr(scheduler.cli, "settings_from_environment", probe)
    before = dict(os.environb)
    result = run(["check"], env={"ONLY": "this", "RAW": b"\xff", "PATH": os.environ["PATH"]}, cwd="/")
    assert result.returncode == 3
    path = os.environ["PATH"].encode()
    assert seen == {
        "stdin": "",
        "child's stdin": "",
        "env": {b"ONLY": b"this", b"RAW": b"\xff", b"PATH": path},
        "cwd": "/",
    }
    assert dict(os.environb) == before and os.getcwd() != "/"


def test_loguru_is_left_as_it_was_found(stuck):
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="INFO")
    try:
        handlers = dict(logger._core.handlers)
        result = run(["check"], env={"DATABASE_URL": stuck})
        assert result.returncode == 0, result.stderr
        assert "WARNING" in result.stderr and lines == []  # the command's logs went to its own stderr
        assert logger._core.handlers == handlers
        logger.info("after the command")
        assert lines == ["after the command"]
    finally:
        logger.remove(sink)


def test_no_session_of_a_command_outlives_it_even_one_the_command_forgot(stuck, monkeypatch):
    from jobs.runtime import Runtime

    monkeypatch.setattr(Runtime, "close", lambda self: None)  # a command that leaves its engine open
    result = run(["check"], env={"DATABASE_URL": stuck})
    assert result.returncode == 0, result.stderr
    engine = make_engine(stuck)

    def others() -> int:
        with engine.connect() as conn:
            return conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).scalar_one()

    # Closed on the client, a session's backend ends a moment later (at load ~4 it was still
    # listed once): waited for, with a deadline a session left open never meets.
    try:
        assert wait_until(lambda: others() == 0, timeout=15)
    finally:
        engine.dispose()
