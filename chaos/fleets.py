"""The fleets a chaos trial hands retries to (SPEC §12), as real processes the monkey can kill.

- `WebhookFleet`: the receiver of tests/receiver.py in fleet mode (it de-duplicates on the
  Idempotency-Key, runs what it accepted and writes the outcome into the row, every fifth one a
  failure) on a port fixed for the trial, answering from a seeded script of mostly 2xx with 503s,
  429s, 500s, 404s, resets and answers slower than the daemons wait. Crashes are `kill -9` and a
  restart on the same port.
- `WorkerFleet`: two workers of tests/fleet_worker.py polling the queued value, each run's fate
  seeded (ok, a 503 or a 404 written as `failed`, or a hang); `kill -9`ed mid-run and restarted.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.fleet_worker import read_log
from tests.receiver import write_script

REPO = Path(__file__).resolve().parent.parent
QUEUED_VALUE = "pending"
WEBHOOK_TIMEOUT = "1s"
ANSWERS = {"ok": 70, "503": 6, "429:1": 5, "status:500": 5, "status:404": 2, "reset": 4, "hang:2": 8}
HUNG_AFTER = 3.0  # seconds a worker's log has not moved while it holds a run: hung (settling only)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postponed_due_now(url: str) -> None:
    """A fleet's outage is over: what it could not take is due now, as an operator would make it,
    rather than after a postponement's backoff (at least a minute: longer than a trial)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE scrape_runs SET next_retry_at = now() "
                    "WHERE status = 'pending_retry' AND postponements > 0 AND next_retry_at > now()"
                )
            )
    finally:
        engine.dispose()


class WebhookFleet:
    def __init__(self, url: str, work: Path, rng: random.Random, env: dict[str, str]) -> None:
        self.url, self.work, self.env = url, work, env
        self.port = free_port()
        self.log, self.script = work / "receiver.jsonl", work / "receiver-script.json"
        write_script(self.script, rng.choices(list(ANSWERS), list(ANSWERS.values()), k=3000), "ok")
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def settings(self) -> dict[str, str]:
        return {
            "SCRAPE_RUN_WEBHOOK": f"http://127.0.0.1:{self.port}/retry/{{run_id}}",
            "WEBHOOK_TIMEOUT": WEBHOOK_TIMEOUT,
        }

    def start(self) -> None:
        port_file = self.work / "receiver.port"
        port_file.unlink(missing_ok=True)
        args = ["--port", str(self.port), "--port-file", str(port_file), "--log", str(self.log)]
        args += [
            "--script",
            str(self.script),
            "--database-url",
            self.url,
            "--table",
            "scrape_runs",
            "--fail-every",
            "5",
            "--log-answers",  # the auditor tells an answer the monkey cut short from one the daemon heard
        ]
        with open(self.work / "receiver.stderr", "a") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.receiver", *args], cwd=REPO, env=self.env, stdout=err, stderr=err
            )
        deadline = time.monotonic() + 20
        while not port_file.exists() and time.monotonic() < deadline and self.process.poll() is None:
            time.sleep(0.02)

    def crash(self, rng: random.Random) -> str:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        time.sleep(rng.uniform(0.2, 1.5))
        self.start()
        return "kill -9 receiver"

    def settle(self) -> None:
        write_script(self.script, [], "ok")  # the answers from now on: all 2xx (the counter goes on)
        # The outage is over: what the fleet could not take is due now, as an operator would make
        # it, rather than after its postponement's backoff (at least a minute: longer than a trial).
        postponed_due_now(self.url.replace("postgresql://", "postgresql+psycopg2://", 1))

    def tend(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class WorkerFleet:
    def __init__(self, url: str, work: Path, seed: int, env: dict[str, str]) -> None:
        self.url, self.work, self.seed, self.env = url, work, seed, env
        self.logs = [work / f"worker{i}.log" for i in range(2)]
        self.processes: list[subprocess.Popen | None] = [None, None]
        for index in range(2):
            self.start(index)

    settings = {"SCRAPE_RUN_HANDOFF": "queued", "STATUS_MAP": f"queued={QUEUED_VALUE}"}

    def start(self, index: int) -> None:
        args = ["--database-url", self.url, "--log", str(self.logs[index]), "--queued", QUEUED_VALUE]
        args += ["--fate", "random", "--seed", str(self.seed), "--work", "0.05", "--poll", "0.05"]
        with open(f"{self.logs[index]}.stderr", "a") as err:
            self.processes[index] = subprocess.Popen(
                [sys.executable, "-m", "tests.fleet_worker", *args], cwd=REPO, env=self.env, stdout=err, stderr=err
            )

    def crash(self, rng: random.Random) -> str:
        index = rng.randrange(2)
        process = self.processes[index]
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        time.sleep(rng.uniform(0, 0.5))
        self.start(index)
        return "kill -9 worker"

    def settle(self) -> None:
        pass

    def tend(self) -> None:
        """While settling: a worker that died, or hangs on a run (its fate), is restarted, as an
        operator would; the run it held is the stuck checker's."""
        for index, (process, log) in enumerate(zip(self.processes, self.logs, strict=True)):
            lines = read_log(log)
            hung = lines and lines[-1][0] == "claimed" and time.time() - os.path.getmtime(log) > HUNG_AFTER
            if process is None or process.poll() is not None or hung:
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
                self.start(index)

    def stop(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
