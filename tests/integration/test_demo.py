"""The README's first command: the demo runs the real daemon and tells the story right."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import REPO

pytestmark = pytest.mark.slow


STORY = (
    'Status: failed — "Run stuck for 1.2h - retry 1/4 scheduled"',
    "Run 2: [RETRY 1/4] Data Architect in Belgium",
    'Status: failed — "Execution timed out after 1.0h - retry 2/4 scheduled"',
    "Run 3: [RETRY 2/4] Data Architect in Belgium",
    "Total attempts: 3 · final status: success",
    "permanently failed after 4 attempts",
    "not retried: permanent error (not_found)",
    "Superseded: run",
    "the story came out right",
)


def test_the_demo_tells_the_story_and_with_keep_names_the_server_it_leaves_and_how_to_stop_it(tmp_path):
    """The README's command, from the console script (one run: it takes about twenty seconds).
    As root, pgserver runs PostgreSQL as another user and `pg_ctl` refuses: the printed command
    must work anyway. The help's duration is the measured one."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "stuck-runs"), "demo", "--keep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    data = Path(re.search(r"^  data:     (\S+)", out, re.M).group(1))
    pid = int(re.search(r"keeps running \(pid (\d+), as user \S+\)", out).group(1))
    try:
        assert result.returncode == 0, out + result.stderr
        assert [line for line in STORY if line not in out] == []
        assert "Traceback" not in result.stderr
        url = re.search(r"^  connect:  (\S+)$", out, re.M).group(1)
        assert ":@" not in url and "psycopg2" not in url
        engine = sa.create_engine(sa.engine.make_url(url).set(drivername="postgresql+psycopg2"))
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM scrape_runs").scalar_one() > 5
        engine.dispose()
        stop = re.search(r"^  stop it:  (.+)$", out, re.M).group(1)
        subprocess.run(stop, shell=True, check=True, timeout=30)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), f"{stop!r} left PostgreSQL {pid} running"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)

    claimed = int(re.search(r"about\s+(\d+)\s+seconds", _help("demo")).group(1))
    took = float(re.search(r"Demo finished in ([\d.]+)s", out).group(1))
    assert claimed / 2 <= took <= claimed * 2, (claimed, took)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _help(command: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "scheduler", command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    ).stdout
