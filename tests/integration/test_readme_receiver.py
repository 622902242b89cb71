"""The README's minimal webhook receiver (SPEC §12) works: the very code block, run under uvicorn as a
real process, takes a retry stuck-runs delivers, answers a redelivery without scraping twice, and
refuses a forged signature."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from jobs.executors.webhook import SIGNATURE_HEADER, payload, signature
from jobs.model import Run
from jobs.retries import process_due_retries
from tests.conftest import REPO
from tests.fleet_worker import stop_process
from tests.helpers import insert_due_retry, make_runtime, row
from tests.web import free_port

SECRET = "readme-receiver-secret-0123456789"
MARKER = "<!-- receiver example -->"
READY_SECONDS = 20


def receiver_example(readme: Path = REPO / "README.md") -> str:
    """The ```python block right after the marker line."""
    text = readme.read_text(encoding="utf-8")
    found = re.search(re.escape(MARKER) + r"\n```python\n(.*?)\n```\n", text, re.DOTALL)
    assert found, f"README.md has no ```python block right after {MARKER}"
    return found.group(1) + "\n"


class Receiver:
    """The example as `uvicorn receiver_example:app` on a free loopback port; what its stand-in
    scraper prints is its stdout."""

    def __init__(self, directory: Path, code: str) -> None:
        (directory / "receiver_example.py").write_text(code, encoding="utf-8")
        self.port, self.stdout, self.stderr = free_port(), directory / "stdout.txt", directory / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "receiver_example:app", "--host", "127.0.0.1"]
                + ["--port", str(self.port), "--no-access-log"],
                cwd=directory,
                env={**os.environ, "WEBHOOK_SECRET": SECRET, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the README's receiver exited {self.process.returncode}: {self.stderr.read_text()}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"the README's receiver did not listen within {READY_SECONDS}s: {self.stderr.read_text()}")

    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def scrapes(self) -> list[str]:
        """The run ids the stand-in `start_scrape` was called with, in order."""
        return re.findall(r"^scraping (\S+)$", self.stdout.read_text(), re.MULTILINE)


@pytest.fixture
def receiver(tmp_path):
    code = receiver_example()
    started = Receiver(tmp_path, code)
    yield started
    stop_process(started.process)


def route_of(code: str) -> str:
    """The path the example serves (`{run_id}` is a placeholder for FastAPI and stuck-runs alike)."""
    found = re.search(r'@app\.post\("([^"]+)"', code)
    assert found, "the README's receiver declares no @app.post route"
    return found.group(1)


def test_the_readme_receiver_takes_a_delivery_once_and_refuses_a_forged_one(db_url, receiver):
    template = receiver.base() + route_of(receiver_example())
    rt = make_runtime(db_url, webhook=template, webhook_secret=SECRET, webhook_timeout=timedelta(seconds=10))
    try:
        with rt.engine.begin() as conn:
            _, retry = insert_due_retry(conn)
        result = process_due_retries(rt)
        assert [(o.run_id, o.status) for o in result.executed] == [(retry, "handed_off")]
        with rt.engine.connect() as conn:
            handed = row(conn, retry)
            run = Run.from_row(conn.execute(rt.queries.get, {"sr_run_id": retry}).mappings().one(), rt.runs.input_names)
        assert (handed["status"], handed["handed_off"]) == ("running", "webhook")
        assert receiver.scrapes() == [str(retry)]

        # What a stuck-runs process killed before its commit leaves behind: the same body, the same key.
        body = payload(run)
        url = template.format(run_id=retry)
        headers = {"Content-Type": "application/json", "Idempotency-Key": str(retry)}
        again = httpx.post(url, content=body, headers={**headers, SIGNATURE_HEADER: signature(SECRET, body)})
        assert again.status_code == 202, again.text
        assert receiver.scrapes() == [str(retry)]

        # A new key, signed with another secret: refused, and nothing is scraped.
        forged_headers = {**headers, "Idempotency-Key": "forged-key"}
        forged = httpx.post(url, content=body, headers={**forged_headers, SIGNATURE_HEADER: signature("x" * 32, body)})
        assert forged.status_code == 401, forged.text
        unsigned = httpx.post(url, content=body, headers=forged_headers)
        assert unsigned.status_code == 401, unsigned.text
        assert receiver.scrapes() == [str(retry)]
    finally:
        rt.close()
