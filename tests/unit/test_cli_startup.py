"""A command imports only what it needs: `--help` loads no database library, `check` no migrations.

Asserted on the modules a real process loaded, not on timings (BENCHMARKS.md has the times).
"""

from __future__ import annotations

import json
import subprocess
import sys

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


def loaded_by(*args: str, env: dict | None = None, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=list(args), heavy=heavy)],
        cwd=REPO,
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
import gc, json, sys
from scheduler.cli import main
before = sum(generation["collections"] for generation in gc.get_stats())
sys.argv = ["stuck-runs", "check", "--help"]
try:
    main()  # as the console script calls it
except SystemExit:
    pass
after = sum(generation["collections"] for generation in gc.get_stats())
print(json.dumps([after - before, gc.get_freeze_count() > 0]))
"""


def test_no_garbage_collection_runs_while_a_commands_modules_load():
    # About a hundred collections walked the import-built heap (30-50 ms of `check`'s start) and
    # freed nothing; what the imports built is frozen, so later collections skip it too.
    result = subprocess.run([sys.executable, "-c", GC_PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    collections, frozen = json.loads(result.stdout.strip().splitlines()[-1])
    assert collections <= 5 and frozen, (collections, frozen)
