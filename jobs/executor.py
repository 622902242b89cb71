"""Executors run one retry attempt of the scraper. One small protocol, chosen by configuration:
`start(run)` starts the scraper and returns at once (or raises `StartFailed`); the returned
`Execution` is then waited for. The processor commits its claim of a retry before the start,
so no retry runs twice; a start that fails puts it back as it was (jobs/retries.py).

- `CommandExecutor`: `SCRAPE_RUN_COMMAND`, an argv template run without a shell, in its own
  process group so a timeout or a shutdown kills the whole scraper.
- `CallableExecutor`: `SCRAPE_RUN_CALLABLE`, `package.module:function` called with the run, in a
  spawned process leading its own group, so it too can be killed.

Nothing the scraper started outlives its attempt: when the attempt ends, for whatever reason,
what is left of its process group gets SIGTERM, then SIGKILL.

An executor only reports what happened; the processor decides what it means.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from db.errors import EXIT_USAGE, ConfigError, OperatorError
from jobs.model import Run
from jobs.patterns import bounded_retry_after, parse_retry_after
from jobs.settings import Settings

STDERR_TAIL_BYTES = 8192  # kept for the dead-letter record
ERROR_LINE_CHARS = 500  # the part that goes into error_message
KILL_GRACE_SECONDS = 5  # between SIGTERM and SIGKILL
POLL_SECONDS = 0.2  # how often a wait looks at the cancel flag
GROUP_POLL_SECONDS = 0.05  # how often the end of an attempt looks for processes left behind


@dataclass(frozen=True)
class ExecutionResult:
    """What one execution did. `cancelled`: stopped by a shutdown, so it does not count."""

    ok: bool
    error: str | None = None
    detail: str | None = None  # stderr tail or traceback
    timed_out: bool = False
    cancelled: bool = False
    retry_after: timedelta | None = None
    handed_off: str | None = None  # the fleet took the retry (SPEC §12); its outcome is the scraper's
    postponed: bool = False  # the fleet could not take it now: due again later, no budget spent


class ExecutorMisconfigured(OperatorError):
    """The configured executor cannot run a retry: its callable is not importable, its command not
    found. A configuration problem (exit 2), raised here where executors are built and started."""

    exit_code = EXIT_USAGE


class StartFailed(ExecutorMisconfigured):
    """The scraper could not be started (its program vanished, lost its execute bit...): a
    configuration problem, not a failed attempt, so it spends no budget."""


class Execution(Protocol):
    """Started by an executor. One that hands the retry to the fleet instead of running it
    (jobs/webhook.py) also says `handed_off` (how) or `postponed` (not taken: due again later)."""

    def wait(self, timeout: timedelta, cancel: threading.Event) -> ExecutionResult:
        """Waits for the scraper; gives up after `timeout` (wall time) or when `cancel` is set."""

    def abandon(self) -> None:
        """Ends what was started without waiting for an outcome (its claim could not be kept)."""


class Executor(Protocol):
    def start(self, run: Run) -> Execution:
        """Starts the scraper for `run` and returns at once; raises `StartFailed` when it cannot."""


class InProcess:
    """Base for executors that run in this process (tests, the demo): starting them is free,
    the work happens in `execute` while the execution is waited for."""

    def start(self, run: Run) -> Execution:
        return _Deferred(self, run)

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> ExecutionResult:
        raise NotImplementedError


@dataclass
class _Deferred:
    executor: InProcess
    run: Run

    def wait(self, timeout: timedelta, cancel: threading.Event) -> ExecutionResult:
        return self.executor.execute(self.run, timeout, cancel)

    def abandon(self) -> None:
        pass


def run_environment(run: Run) -> dict[str, str]:
    """The run's fields as `SCRAPE_RUN_*` variables (JSON for structured inputs)."""
    fields: dict[str, Any] = {
        "id": run.id,
        "retry_count": run.retry_count,
        "max_retries": run.max_retries,
        "original_run_id": run.chain_id,
        **run.inputs,
    }
    env = {}
    for name, value in fields.items():
        if value is None:
            text = ""
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        env[f"SCRAPE_RUN_{name.upper()}"] = text
    env["SCRAPE_RUN_INPUTS"] = json.dumps(dict(run.inputs), default=str)
    return env


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:ERROR_LINE_CHARS] if lines else ""


class CommandExecutor:
    def __init__(self, argv_template: tuple[str, ...], environment: Mapping[str, str] | None = None) -> None:
        self.argv_template = argv_template
        self.environment = dict(environment or {})  # `.env`'s values: the real environment wins over them

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

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> ExecutionResult:
        """Starts and waits: one attempt from end to end."""
        return self.start(run).wait(timeout, cancel)


@dataclass
class CommandExecution:
    process: subprocess.Popen
    stderr: Any  # a temporary file holding everything the scraper wrote on stderr

    def wait(self, timeout: timedelta, cancel: threading.Event) -> ExecutionResult:
        process = self.process
        with self.stderr as stderr:
            stopped = _wait(_exited(process), timeout, cancel)
            _end_group(process.pid, lambda: process.poll() is not None)
            stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - STDERR_TAIL_BYTES))
            tail = stderr.read().decode("utf-8", "replace")
        if stopped is not None:
            return ExecutionResult(ok=False, detail=tail, timed_out=stopped == "timeout", cancelled=stopped == "cancel")
        if process.returncode == 0:
            return ExecutionResult(ok=True, detail=tail)
        code = process.returncode
        fallback = f"Command exited with code {code}" if code > 0 else f"Command killed by signal {-code}"
        return ExecutionResult(
            ok=False, error=last_line(tail) or fallback, detail=tail, retry_after=parse_retry_after(tail)
        )

    def abandon(self) -> None:
        with self.stderr:
            _end_group(self.process.pid, lambda: self.process.poll() is not None)


def _wait(finished: Callable[[float], bool], timeout: timedelta, cancel: threading.Event) -> str | None:
    """Waits until `finished(seconds)` (which blocks up to `seconds`) says done.

    Returns None when it finished, 'timeout' or 'cancel' when waiting had to stop. The cancel
    flag is looked at every POLL_SECONDS; a finished child is noticed at once.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    while not finished(max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))):
        if cancel.is_set():
            return "cancel"
        if time.monotonic() >= deadline:
            return "timeout"
    return None


def _exited(process: subprocess.Popen) -> Callable[[float], bool]:
    def finished(seconds: float) -> bool:
        try:
            process.wait(seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    return finished


def _end_group(pgid: int, reaped: Callable[[], bool]) -> None:
    """Ends what is left of the scraper's process group once its attempt is over.

    SIGTERM, then SIGKILL after the grace to whatever still runs. It waits for the whole group,
    not only the leader: a browser outliving its scraper would keep the memory and the site's
    session, and a retry would then run beside it. `reaped` reaps the leader and says whether
    it has exited.
    """
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, KILL_GRACE_SECONDS)):
        if reaped() and not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except PermissionError:
            return  # what is left runs as another user (setuid): not ours to signal
        except ProcessLookupError:
            if reaped():
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pgid, sig)  # a spawned callable that has not made its group yet
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if reaped() and not _group_alive(pgid):
                return
            time.sleep(GROUP_POLL_SECONDS)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an orphan's zombie waits
    for PID 1 to reap it, which a container's init may never do."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a member runs as another user; /proc still tells whether one is alive
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except FileNotFoundError:
        return True  # no /proc: the signal probe is all there is
    for entry in entries:
        try:
            state, _parent, group = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # exited while we looked
        if int(group) == pgid and state != "Z":
            return True
    return False


def _call_in_child(path: str, run: Run, channel: Any, environment: Mapping[str, str]) -> None:
    """Runs in the spawned process: calls the function, reports success or the traceback."""
    os.setsid()  # its own process group, so whatever the scraper starts ends with it
    for name, value in environment.items():  # `.env`'s values, under the environment it inherited
        os.environ.setdefault(name, value)
    try:
        resolve_callable(path)(run)
    except BaseException as exc:  # noqa: BLE001 - everything the scraper raises is a failed attempt
        retry_after = getattr(exc, "retry_after", None)
        seconds = retry_after.total_seconds() if isinstance(retry_after, timedelta) else retry_after
        channel.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), seconds))
    else:
        channel.send(("ok", None, None, None))


def resolve_callable(path: str) -> Callable[[Run], object]:
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ExecutorMisconfigured(f"SCRAPE_RUN_CALLABLE={path!r} cannot be imported ({exc}): check the module path") from None
    if not callable(target):
        raise ExecutorMisconfigured(f"SCRAPE_RUN_CALLABLE={path!r} is not callable")
    return target


class CallableExecutor:
    def __init__(self, path: str, environment: Mapping[str, str] | None = None) -> None:
        resolve_callable(path)  # fail at start-up, not at the first retry
        self.path = path
        self.environment = dict(environment or {})  # `.env`'s values, for the child
        self._context = multiprocessing.get_context("spawn")

    def start(self, run: Run) -> CallableExecution:
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_call_in_child, args=(self.path, run, sender, self.environment), daemon=True
        )
        try:
            process.start()
        except OSError as exc:
            receiver.close()
            raise StartFailed(
                f"SCRAPE_RUN_CALLABLE={self.path!r}: its process could not start: {exc.strerror}"
            ) from None
        finally:
            sender.close()
        return CallableExecution(process, receiver)

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> ExecutionResult:
        """Starts and waits: one attempt from end to end."""
        return self.start(run).wait(timeout, cancel)


@dataclass
class CallableExecution:
    process: Any  # a spawned multiprocessing.Process
    receiver: Any  # the end of the pipe the child reports on

    def wait(self, timeout: timedelta, cancel: threading.Event) -> ExecutionResult:
        process, receiver = self.process, self.receiver
        try:
            stopped = _wait(lambda seconds: receiver.poll(seconds) or not process.is_alive(), timeout, cancel)
            if stopped is not None:
                _end_group(process.pid, lambda: not process.is_alive())
                return ExecutionResult(ok=False, timed_out=stopped == "timeout", cancelled=stopped == "cancel")
            try:
                kind, error, detail, retry_after = receiver.recv()
            except EOFError:
                process.join()
                return ExecutionResult(ok=False, error=f"Scraper process died (exit code {process.exitcode})")
            process.join()
            _end_group(process.pid, lambda: not process.is_alive())
        finally:
            receiver.close()
        if kind == "ok":
            return ExecutionResult(ok=True)
        after = bounded_retry_after(retry_after) if retry_after else parse_retry_after(detail)
        return ExecutionResult(ok=False, error=str(error)[:ERROR_LINE_CHARS], detail=detail, retry_after=after)

    def abandon(self) -> None:
        try:
            _end_group(self.process.pid, lambda: not self.process.is_alive())
        finally:
            self.receiver.close()


def build_executor(settings: Settings) -> Executor:
    """The executor the settings ask for; `ConfigError` when none is configured."""
    if settings.command:
        program = settings.command[0]
        if shutil.which(program) is None:
            raise ExecutorMisconfigured(f"SCRAPE_RUN_COMMAND: {program!r} is not found or not executable: check PATH")
        return CommandExecutor(settings.command, settings.dotenv)
    if settings.callable_path:
        return CallableExecutor(settings.callable_path, settings.dotenv)
    if settings.webhook:
        from jobs.webhook import WebhookExecutor  # httpx only where retries are delivered

        return WebhookExecutor(settings.webhook, settings.webhook_secret, settings.webhook_timeout)
    if settings.handoff:
        return QueueHandoff(settings.handoff)
    raise ConfigError(
        "no executor configured: set SCRAPE_RUN_COMMAND (e.g. 'python -m scraper --run-id {run_id}'), "
        "SCRAPE_RUN_CALLABLE (package.module:function), SCRAPE_RUN_WEBHOOK (a URL) or SCRAPE_RUN_HANDOFF (queued)"
    )


@dataclass(frozen=True)
class QueueHandoff:
    """SCRAPE_RUN_HANDOFF: due retries are flipped to the scraper's queued value for its own workers
    (jobs/retries.py hands them over in sets); nothing is started here."""

    state: str

    def start(self, run: Run) -> Execution:
        raise StartFailed("SCRAPE_RUN_HANDOFF: retries are handed to the fleet's workers, not started here")
