"""SCRAPE_RUN_CALLABLE: `package.module:function` called with the run, in a spawned process
leading its own group, so it too can be killed (run here: jobs/executors/base.py)."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from jobs.executors.base import ExecutorMisconfigured, StartFailed, Strategies, T, grace_of
from jobs.executors.outcome import Completed, Failed, RanHere, Released, TimedOut
from jobs.executors.processes import ERROR_LINE_CHARS, end_group, wait_until
from jobs.model import Run
from jobs.patterns import bounded_retry_after, parse_retry_after


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
        raise ExecutorMisconfigured(
            f"SCRAPE_RUN_CALLABLE={path!r} cannot be imported ({exc}): check the module path"
        ) from None
    if not callable(target):
        raise ExecutorMisconfigured(f"SCRAPE_RUN_CALLABLE={path!r} is not callable")
    return target


class CallableExecutor:
    def __init__(self, path: str, environment: Mapping[str, str] | None = None) -> None:
        resolve_callable(path)  # fail at start-up, not at the first retry
        self.path = path
        self.environment = dict(environment or {})  # `.env`'s values, for the child
        self._context = multiprocessing.get_context("spawn")

    def dispatch_with(self, strategies: Strategies[T]) -> T:
        return strategies.run_here(self)

    def close(self) -> None:
        pass

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

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> RanHere:
        """Starts and waits: one attempt from end to end."""
        return self.start(run).wait(timeout, cancel)


@dataclass
class CallableExecution:
    process: Any  # a spawned multiprocessing.Process
    receiver: Any  # the end of the pipe the child reports on

    def wait(self, timeout: timedelta, cancel: threading.Event) -> RanHere:
        process, receiver = self.process, self.receiver
        try:
            stopped = wait_until(lambda seconds: receiver.poll(seconds) or not process.is_alive(), timeout, cancel)
            if stopped is not None:
                end_group(process.pid, lambda: not process.is_alive(), grace_of(cancel))
                return TimedOut() if stopped == "timeout" else Released()
            try:
                kind, error, detail, retry_after = receiver.recv()
            except EOFError:
                process.join()
                return Failed(error=f"Scraper process died (exit code {process.exitcode})")
            process.join()
            end_group(process.pid, lambda: not process.is_alive())
        finally:
            receiver.close()
        if kind == "ok":
            return Completed()
        after = bounded_retry_after(retry_after) if retry_after else parse_retry_after(detail)
        return Failed(error=str(error)[:ERROR_LINE_CHARS], detail=detail, retry_after=after)
