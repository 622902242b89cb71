"""SCRAPE_RUN_COMMAND: an argv template run without a shell, in its own process group so a
timeout or a shutdown ends the whole scraper (run here: jobs/executors/base.py)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from jobs.executors.base import StartFailed, Strategies, T, grace_of
from jobs.executors.outcome import Completed, Failed, RanHere, Released, TimedOut
from jobs.executors.processes import end_group, last_line, run_environment, wait_until
from jobs.model import Run
from jobs.patterns import parse_retry_after

STDERR_TAIL_BYTES = 8192  # kept for the dead-letter record


class CommandExecutor:
    def __init__(self, argv_template: tuple[str, ...], environment: Mapping[str, str] | None = None) -> None:
        self.argv_template = argv_template
        self.environment = dict(environment or {})  # `.env`'s values: the real environment wins over them

    def dispatch_with(self, strategies: Strategies[T]) -> T:
        return strategies.run_here(self)

    def close(self) -> None:
        pass

    def argv(self, run: Run) -> list[str]:
        """Each template item becomes exactly one argument; a query is text, never shell."""
        values = {name: "" if value is None else str(value) for name, value in run.inputs.items()}
        values["run_id"] = str(run.id)
        return [item.format_map(values) for item in self.argv_template]

    def start(self, run: Run) -> CommandExecution:
        stderr = tempfile.TemporaryFile()
        try:
            process = subprocess.Popen(
                self.argv(run),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**self.environment, **os.environ, **run_environment(run)},
                start_new_session=True,
            )
        except OSError as exc:
            stderr.close()
            raise StartFailed(
                f"SCRAPE_RUN_COMMAND: {self.argv_template[0]!r} could not start: {exc.strerror}"
            ) from None
        return CommandExecution(process, stderr)

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> RanHere:
        """Starts and waits: one attempt from end to end."""
        return self.start(run).wait(timeout, cancel)


@dataclass
class CommandExecution:
    process: subprocess.Popen
    stderr: Any  # a temporary file holding everything the scraper wrote on stderr

    def wait(self, timeout: timedelta, cancel: threading.Event) -> RanHere:
        process = self.process
        with self.stderr as stderr:
            stopped = wait_until(_exited(process), timeout, cancel)
            end_group(
                process.pid, lambda: process.poll() is not None, grace_of(cancel) if stopped == "cancel" else None
            )
            stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - STDERR_TAIL_BYTES))
            tail = stderr.read().decode("utf-8", "replace")
        if stopped == "timeout":
            return TimedOut(detail=tail)
        if stopped == "cancel":
            return Released(detail=tail)
        if process.returncode == 0:
            return Completed(detail=tail)
        code = process.returncode
        fallback = f"Command exited with code {code}" if code > 0 else f"Command killed by signal {-code}"
        return Failed(error=last_line(tail) or fallback, detail=tail, retry_after=parse_retry_after(tail))


def _exited(process: subprocess.Popen) -> Callable[[float], bool]:
    def finished(seconds: float) -> bool:
        try:
            process.wait(seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    return finished
