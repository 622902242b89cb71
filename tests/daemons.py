"""Real daemon processes for tests. Their logs go to a file, never to a pipe nobody reads:
a daemon logging a big sweep would block on a full pipe."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from tests.conftest import REPO

FAKE_SCRAPER = REPO / "tests" / "fake_scraper.py"
FAKE_COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE_SCRAPER))} {{run_id}}"


class DaemonProcess:
    def __init__(self, db_url: str, *args: str, **env: str) -> None:
        settings = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": FAKE_COMMAND, **env}
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            list(args) or [sys.executable, "-m", "scheduler", "daemon"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **settings},
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> str:
        """SIGKILL, and everything it logged."""
        self.proc.kill()
        self.proc.wait()
        text = self.output()
        self.log.close()
        return text

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 30) -> str:
        """SIGTERM (if still running), wait, and return everything it logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        text = self.output()
        self.log.close()
        return text


def wait_until(condition, timeout: float = 60, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")
