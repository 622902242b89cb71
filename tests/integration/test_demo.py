"""The README's first command: the demo runs the real daemon and tells the story right."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_the_demo_tells_the_story_and_exits_0():
    result = subprocess.run(
        [sys.executable, "-m", "scheduler", "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    story = result.stdout
    for line in (
        'Status: failed — "Run stuck for 1.2h - retry 1/4 scheduled"',
        "Run 2: [RETRY 1/4] Data Architect in Belgium",
        'Status: failed — "Execution timed out after 1.0h - retry 2/4 scheduled"',
        "Run 3: [RETRY 2/4] Data Architect in Belgium",
        "Total attempts: 3 · final status: success",
        "permanently failed after 4 attempts",
        "not retried: permanent error (not_found)",
        "Superseded: run",
        "the story came out right",
    ):
        assert line in story
    assert "Traceback" not in result.stderr
