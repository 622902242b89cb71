"""`.env` is read, never loaded: stuck-runs' own environment stays as it was, and the scrapers its
executors start still receive `.env`'s values under the real environment, as when python-dotenv's
load_dotenv(override=False) put them into the process environment."""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from jobs.executors.outcome import Completed
from jobs.executors.wiring import build_executor
from jobs.settings import settings_from_environment
from tests.integration.test_executor import a_run

PROBED = ("FROM_DOTENV", "SHADOWED", "INTERPOLATED")
PROBE = "import json, os, sys; json.dump(dict((n, os.environ.get(n)) for n in sys.argv[2:]), open(sys.argv[1], 'w'))"


@pytest.fixture
def dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `.env` with a value of its own, one the real environment shadows, and one interpolated
    from a name both give (the real environment's value wins there too)."""
    for name in (*PROBED, "BOTH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHADOWED", "from-environment")
    monkeypatch.setenv("BOTH", "from-environment")
    (tmp_path / ".env").write_text(
        "STUCK_AFTER=5h\nFROM_DOTENV=from-dotenv\nSHADOWED=from-dotenv\nBOTH=from-dotenv\nINTERPOLATED=${BOTH}\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


EXPECTED = {"FROM_DOTENV": "from-dotenv", "SHADOWED": "from-environment", "INTERPOLATED": "from-environment"}


def test_loading_settings_leaves_the_process_environment_untouched(dotenv):
    before = dict(os.environ)
    settings = settings_from_environment()
    assert settings.policy.stuck_after == timedelta(hours=5)  # the .env was read
    assert dict(os.environ) == before


def test_a_command_executors_scraper_sees_the_dotenv_values_under_the_real_environment(dotenv, monkeypatch):
    out = dotenv / "seen.json"
    command = shlex.join([sys.executable, "-c", PROBE, str(out), *PROBED])
    monkeypatch.setenv("SCRAPE_RUN_COMMAND", command)
    executor = build_executor(settings_from_environment())
    result = executor.start(a_run("x")).wait(timedelta(seconds=60), threading.Event())
    assert isinstance(result, Completed), result
    assert json.loads(out.read_text()) == EXPECTED


def probe_environment(run) -> None:
    """A callable scraper (spawned): writes what it sees to the file its run names."""
    with open(run.inputs["search_query"], "w") as handle:
        json.dump({name: os.environ.get(name) for name in PROBED}, handle)


def test_a_callable_executors_child_sees_the_dotenv_values_under_the_real_environment(dotenv, monkeypatch):
    out = dotenv / "seen.json"
    monkeypatch.setenv("SCRAPE_RUN_CALLABLE", f"{__name__}:probe_environment")
    executor = build_executor(settings_from_environment())
    result = executor.start(a_run(str(out))).wait(timedelta(seconds=60), threading.Event())
    assert isinstance(result, Completed), result
    assert json.loads(out.read_text()) == EXPECTED
    assert "FROM_DOTENV" not in os.environ  # only the child took them
