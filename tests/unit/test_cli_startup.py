"""A command imports only what it needs: `--help` loads no database library, `check` no migrations.

Asserted on the modules a real process loaded, not on timings (BENCHMARKS.md has the times).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import click
import pytest

from scheduler.cli import COMMANDS, cli
from tests.conftest import REPO

PROBE = """
import json, sys
from scheduler.cli import main
try:
    main({args!r})
except SystemExit:
    pass
heavy = {heavy!r}
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""
HEAVY = ("sqlalchemy", "alembic", "apscheduler", "prometheus_client", "psycopg2", "multiprocessing.pool")
# What only executing, cancelling or pausing needs: `check` sweeps and records, nothing more.
PROCESSING = (
    "jobs.recovery",
    "jobs.retries",
    "jobs.delivery",
    "jobs.cancelling",
    "jobs.control",
    "jobs.executors.wiring",
)


def loaded_by(*args: str, env: dict | None = None, heavy: tuple[str, ...] = HEAVY, cwd: Path = REPO) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=list(args), heavy=heavy)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_help_and_version_load_no_database_library(args):
    assert loaded_by(*args) == []


def test_check_loads_no_migrations_scheduler_or_metrics(monkeypatch):
    # Unreachable on purpose: the point is what `check` imports on its way to the database.
    env = {"DATABASE_URL": "postgresql://u@127.0.0.1:1/db", "PATH": "/usr/bin:/bin"}
    assert set(loaded_by("check", env=env)) <= {"sqlalchemy", "psycopg2"}


def test_check_loads_no_retry_processor_or_executors():
    # The processor, hand-over and executors are a third of `check`'s imports (BENCHMARKS.md, start-0612).
    env = {"DATABASE_URL": "postgresql://u@127.0.0.1:1/db", "PATH": "/usr/bin:/bin"}
    assert loaded_by("check", env=env, heavy=PROCESSING) == []


def test_a_process_that_runs_retries_here_loads_no_http_client():
    # httpx is the webhook's and Scrapyd's (jobs/executors/wiring.py imports them only for those):
    # a command executor's `process` has no use for it.
    env = {
        "DATABASE_URL": "postgresql://u@127.0.0.1:1/db",
        "PATH": "/usr/bin:/bin",
        "SCRAPE_RUN_COMMAND": "true",
    }
    assert loaded_by("process", env=env, heavy=("httpx", "jobs.delivery")) == ["jobs.delivery"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_listed_short_help_is_the_commands_own(name):
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    assert (command.help or "").splitlines()[0].strip() == COMMANDS[name][1]


def test_every_registered_command_is_listed():
    for name in sorted(COMMANDS):
        cli.get_command(click.Context(cli), name)  # imports every module
    assert set(cli.commands) == set(COMMANDS)


GC_PROBE = """
import atexit, gc, json, sys
from scheduler.cli import main
before = sum(generation["collections"] for generation in gc.get_stats())

def report():
    after = sum(generation["collections"] for generation in gc.get_stats())
    print(json.dumps([after - before, gc.get_freeze_count() > 0]))

atexit.register(report)  # the console process ends in `main`, its atexit handlers run
sys.argv = ["stuck-runs", "check", "--help"]
main()  # as the console script calls it
"""


def test_no_garbage_collection_runs_while_a_commands_modules_load():
    # About a hundred collections walked the import-built heap (30-50 ms of `check`'s start) and
    # freed nothing; what the imports built is frozen, so later collections skip it too.
    result = subprocess.run([sys.executable, "-c", GC_PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    collections, frozen = json.loads(result.stdout.strip().splitlines()[-1])
    assert collections <= 5 and frozen, (collections, frozen)


def test_check_loads_no_notification_or_dotenv_code_without_them(tmp_path):
    # Without ALERT_URLS nothing notifies, and without a `.env` from here up there is nothing to
    # read: their code (~12 ms of `check`'s start, BENCHMARKS.md start-0612d) stays unloaded.
    env = {"DATABASE_URL": "postgresql://u@127.0.0.1:1/db", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    unused = ("scheduler.alerts", "jobs.alerting", "jobs.alert_urls", "dotenv", "apprise")
    assert loaded_by("check", env=env, heavy=unused, cwd=tmp_path) == []


def test_a_dotenv_file_above_the_current_directory_is_still_read(tmp_path, monkeypatch):
    from jobs.settings.loading import read_dotenv

    (tmp_path / ".env").write_text("STUCK_AFTER=5h\n")
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    monkeypatch.chdir(below)
    assert read_dotenv() == {"STUCK_AFTER": "5h"}
    (tmp_path / ".env").unlink()
    (tmp_path / ".env").mkdir()  # python-dotenv's own test decides: a directory is no `.env`
    assert read_dotenv() == {}


# The console script's process: a module object that reports its own teardown, an atexit handler,
# and optionally a thread that outlives `main`.
EXIT_PROBE = """
import atexit, sys, threading
class Torn:
    def __del__(self):
        print("torn down", flush=True)
torn = Torn()
atexit.register(lambda: print("atexit ran", flush=True))
if {thread!r}:
    done = threading.Event()
    threading.Thread(target=lambda: (done.wait(30), print("thread finished", flush=True))).start()
    threading.Timer(0.2, done.set).start()
sys.argv = ["stuck-runs", "--version"]
from scheduler.cli import main
main()
"""


def _console(thread: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", EXIT_PROBE.format(thread=thread)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_the_console_process_ends_without_the_interpreters_teardown():
    # Freeing every module and object one by one was ~15 ms of each command: the output is flushed
    # and the atexit handlers run, then the process ends.
    done = _console(thread=False)
    assert done.returncode == 0
    assert done.stdout.splitlines() == [f"stuck-runs, version {version('stuck-runs')}", "atexit ran"]


def test_a_console_process_with_a_thread_still_running_ends_as_always():
    done = _console(thread=True)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith("stuck-runs, version") and {"thread finished", "atexit ran", "torn down"} <= set(lines)


OPEN_PROBE = """
import gc, json, os, sys
collected = []
gc.callbacks.append(lambda phase, info: phase == "stop" and collected.append(1))
import jobs.runtime
opening = jobs.runtime.Runtime.open.__func__
during = []

def counted(cls, *args, **kwargs):
    before = len(collected)
    try:
        return opening(cls, *args, **kwargs)
    finally:
        during.append(len(collected) - before)

jobs.runtime.Runtime.open = classmethod(counted)
import atexit
atexit.register(lambda: print(json.dumps({"during_open": during, "frozen": gc.get_freeze_count() > 0})))
sys.argv = ["stuck-runs", "check", "--dry-run"]
from scheduler.cli import main
main()
"""


def test_no_garbage_collection_runs_while_the_console_process_opens_its_runtime(db_url, tmp_path):
    # Connecting, reflecting and checking the table ran 10 collections (of an idle `check`'s 42, now
    # 28) over objects that live as long as the process; they are frozen with the imports' instead.
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", OPEN_PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"during_open": [0], "frozen": True}
