"""A real Scrapyd on loopback, started by a test module (one per module, never per test), with the
tiny Scrapy project of tests/scrapyd_project deployed: its egg is built here in memory (a zip with
the project's entry point) and put where Scrapyd's egg storage reads it, so no deploy tool and no
addversion round trip is needed.

`poll_interval` large: Scrapyd queues jobs and never starts them (a test of scheduling alone costs
no spider process); small: each job starts a real `scrapy crawl` process.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.services import require_service

PROJECT_DIR = Path(__file__).parent / "scrapyd_project"
PROJECT = "fleet"


def scrapyd_installed() -> bool:
    try:
        import scrapy  # noqa: F401
        import scrapyd  # noqa: F401
    except ImportError:
        return False
    return True


def project_egg(project_dir: Path = PROJECT_DIR, package: str = "stuck_spiders") -> bytes:
    """The project as an egg: its package and EGG-INFO/entry_points.txt naming its settings
    (`package` in `project_dir`: the tests' project, or the chaos trials' own)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as egg:
        for path in sorted((project_dir / package).rglob("*.py")):
            egg.write(path, path.relative_to(project_dir).as_posix())
        egg.writestr("EGG-INFO/entry_points.txt", f"[scrapy]\nsettings = {package}.settings\n")
        egg.writestr("EGG-INFO/PKG-INFO", "Metadata-Version: 1.0\nName: stuck-spiders\nVersion: 1\n")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Scrapyd:
    url: str
    home: Path
    port: int
    poll_interval: float
    process: subprocess.Popen | None = None
    env: dict[str, str] | None = None  # its spiders' environment too (None: this process's)
    start_timeout: float = 30.0

    def api(self, endpoint: str, **params: str) -> dict:
        return httpx.get(f"{self.url}/{endpoint}", params=params, timeout=10).json()

    def jobs(self) -> dict[str, list[str]]:
        """Job ids by state: pending, running, finished (a job listed twice was scheduled twice)."""
        answer = self.api("listjobs.json", project=PROJECT)
        return {state: [job["id"] for job in answer[state]] for state in ("pending", "running", "finished")}

    def start(self) -> None:
        with (self.home / "scrapyd.out").open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "scrapyd"], cwd=self.home, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                if httpx.get(f"{self.url}/daemonstatus.json", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Scrapyd did not start: {(self.home / 'scrapyd.out').read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_scrapyd(
    home: Path,
    *,
    poll_interval: float = 0.1,
    max_proc: int = 4,
    egg: bytes | None = None,
    env: dict[str, str] | None = None,
    finished_to_keep: int = 100,
    start_timeout: float = 30.0,
) -> Scrapyd:
    """Scrapyd in `home`, the project deployed (version 1; `egg`: another project's), answering on
    a free loopback port; `env` its own and its spiders' environment."""
    require_service("scrapyd", scrapyd_installed(), "pip install scrapyd scrapy")
    shutil.rmtree(home, ignore_errors=True)
    (home / "eggs" / PROJECT).mkdir(parents=True)
    (home / "eggs" / PROJECT / "1.egg").write_bytes(project_egg() if egg is None else egg)
    port = free_port()
    (home / "scrapyd.conf").write_text(
        "[scrapyd]\n"
        f"bind_address = 127.0.0.1\nhttp_port = {port}\n"
        f"eggs_dir = {home / 'eggs'}\ndbs_dir = {home / 'dbs'}\nlogs_dir = {home / 'logs'}\n"
        f"poll_interval = {poll_interval}\nmax_proc = {max_proc}\nfinished_to_keep = {finished_to_keep}\n"
    )
    server = Scrapyd(f"http://127.0.0.1:{port}", home, port, poll_interval, env=env, start_timeout=start_timeout)
    server.start()
    return server
