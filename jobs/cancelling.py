"""Cancelling a running retry (SPEC §16): the request goes through the database to whichever
process executes the retry, on any host.

- Asked (`request_running_cancel`, for `cancel RUN_ID`, the API and the page): the request is a
  row of `stuck_runs_cancels`. A retry run here whose run lock nobody holds (its process is gone)
  is cancelled at once; one handed to a webhook or a queue is cancelled in the row only (the
  fleet is not told, and the answer says so); one delivered at this instant is refused with when
  to try again (SPEC §12).
- Run here (`CancelWatch`): the executing process reads the requests of the retries it executes
  every DISPATCH_POLL (one statement a poll for the whole process); the scraper's process group
  gets SIGTERM, SIGKILL after CANCEL_TIMEOUT, and the outcome is recorded `Cancelled`
  (jobs/outcomes.py).
- Handed to an engine that can stop it (`Cancels`: Scrapyd, Celery): a dispatcher pass claims the
  request, ends the row and asks the engine (`cancel(kill=False)`); the pass that finds the request
  CANCEL_TIMEOUT later stops it forcefully if the engine still runs it (`act_on_cancels`).

The row becomes `cancelled` (`Cancelled by operator`) only from `running` (or a hand-off's
`queued`): a completion that wins the race stands. No budget is spent and no retry scheduled.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from loguru import logger

from db.engine import database_errors
from db.errors import CancelRefused
from db.messages import CANCELLED_BY_OPERATOR
from jobs.delivery import being_delivered
from jobs.executors.base import Cancels, Interrupt
from jobs.model import Run
from jobs.runtime import Runtime

STOP_POLL_SECONDS = 0.1  # how often a watched wait learns of a shutdown
ROW_ONLY = {"webhook": "the webhook's receiver", "queue": "the scraper's workers"}


@dataclass(frozen=True)
class RunningCancel:
    """What became of a request to cancel a running retry."""

    how: str  # requested | cancelled (at once: nobody executes it) | row_only | would_request

    def message(self, run: Run, poll_seconds: float) -> str:
        attempt = f"retry {run.retry_count}/{run.max_retries} ({run.id})"
        match self.how:
            case "requested":
                if run.handed_off:  # the engine is told by a stuck-runs process configured for it
                    return (
                        f"Cancel of running {attempt} requested: the daemon tells the engine it was handed to "
                        f"within DISPATCH_POLL ({poll_seconds:g}s); with no daemon running, the next `process` does"
                    )
                return (
                    f"Cancel of running {attempt} requested: the process executing it stops it within "
                    f"DISPATCH_POLL ({poll_seconds:g}s)"
                )
            case "cancelled":
                return f"Running {attempt} cancelled: no process was executing it any more"
            case "row_only":
                fleet = ROW_ONLY.get(run.handed_off or "", f"the fleet ({run.handed_off})")
                return (
                    f"Running {attempt} cancelled in the row only: it was handed to {fleet}, which is not told; "
                    "stop it there if it still runs"
                )
        return f"Would cancel running {attempt}"


def requester(via: str) -> str:
    return f"{via} on {socket.gethostname()} pid {os.getpid()}"


def request_running_cancel(rt: Runtime, run: Run, *, via: str = "cli", dry_run: bool = False) -> RunningCancel:
    """Asks for running (or queued) retry `run` to be cancelled; `CancelRefused` when it cannot be."""
    if not run.is_retry:
        raise CancelRefused(
            f"run {run.id} is running but is not a retry stuck-runs started: stop it in the scraper itself",
            details={"runId": str(run.id), "currentStatus": run.status},
        )
    if delivery := being_delivered(run, rt.clock.now()):
        raise CancelRefused(delivery[0], details={"runId": str(run.id)}, retry_after=delivery[1])
    if dry_run:
        return RunningCancel("would_request")
    q, now, key = rt.queries, rt.clock.now(), str(run.id)
    # An engine's run (Celery, Scrapyd) is requested whatever this process is configured with: the
    # dispatcher pass of a process that sends to that engine tells it (a CLI needs no broker).
    tells_engine = run.handed_off is not None and run.handed_off not in ROW_ONLY
    with database_errors(rt.engine, "cancelling a running retry"), rt.engine.begin() as conn:
        if run.handed_off is not None and not tells_engine:
            statement = q.cancel_queued if run.status == "queued" else q.cancel_running
            how = "row_only"
        elif run.handed_off is None and conn.execute(q.nobody_executes, {"sr_run_key": key}).scalar_one():
            statement, how = q.cancel_running, "cancelled"
        else:
            conn.execute(q.request_cancel, {"sr_run_key": key, "sr_now": now, "sr_by": requester(via)})
            statement, how = None, "requested"
        if statement is not None:
            params = {"sr_ids": [run.id], "sr_now": now, "sr_message": CANCELLED_BY_OPERATOR}
            if conn.execute(statement, params).first() is None:
                raise CancelRefused(
                    f"retry {run.id} stopped running, or another process started delivering it, meanwhile; "
                    f"see `stuck-runs history {run.id}`"
                )
    logger.bind(run_id=key, event="cancel_requested" if how == "requested" else "cancelled").info(
        "{}: {}", run.label, RunningCancel(how).message(run, rt.settings.dispatch_poll.total_seconds())
    )
    return RunningCancel(how)


class CancelWatch:
    """One thread per process that, while retries execute here, reads their cancel requests every
    DISPATCH_POLL (one statement for all of them) and interrupts the waits asked about; it also
    passes a shutdown on to each wait. It ends when nothing is watched."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._watched: dict[str, tuple[Interrupt, threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, run: Run, stop: threading.Event) -> Iterator[Interrupt]:
        """An `Interrupt` set when `stop` is set (a shutdown) or an operator cancels `run`."""
        interrupt = Interrupt()
        with self._lock:
            self._watched[str(run.id)] = (interrupt, stop)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="cancel-watch", daemon=True)
                self._thread.start()
        try:
            yield interrupt
        finally:
            with self._lock:
                self._watched.pop(str(run.id), None)

    def _loop(self) -> None:
        poll = self.rt.clock.real(self.rt.settings.dispatch_poll).total_seconds()
        grace = self.rt.clock.real(self.rt.settings.cancel_timeout)
        next_read, failing = time.monotonic() + poll, False
        while True:
            with self._lock:
                watched = dict(self._watched)
                if not watched:
                    self._thread = None
                    return
            for interrupt, stop in watched.values():
                if stop.is_set() and not interrupt.is_set():
                    interrupt.set()
            if time.monotonic() >= next_read:
                next_read = time.monotonic() + poll
                try:
                    requested = self._requested(list(watched))
                except Exception as exc:  # noqa: BLE001 - an outage must not end the watch; the next poll tries again
                    if not failing:
                        logger.bind(event="cancel_watch_error").error("cannot read cancel requests: {}", exc)
                    failing = True
                    continue
                failing = False
                for key, by in requested:
                    interrupt = watched[key][0]
                    if not interrupt.is_set():
                        interrupt.cancel(by, grace)
            time.sleep(STOP_POLL_SECONDS)

    def _requested(self, keys: list[str]) -> list[tuple[str, str]]:
        with self.rt.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.execute(self.rt.queries.requested_among, {"sr_keys": keys})]


def engine_cancels(rt: Runtime) -> int:
    """`act_on_cancels` when the configured executor hands retries to an engine that can stop them
    (a `Cancels` with a `mode`); 0 otherwise (run here: the executing process's watch acts)."""
    mode = rt.settings.hands_off
    if mode is None or not isinstance(rt.executor, Cancels):
        return 0
    return act_on_cancels(rt, rt.executor, mode)


def act_on_cancels(rt: Runtime, executor: Cancels, mode: str) -> int:
    """A dispatcher pass over the requests for retries handed to engine `executor` (`handed_off`
    `mode`): each new one ends its row `cancelled` and asks the engine to stop the job; each asked
    about CANCEL_TIMEOUT ago is stopped forcefully if the engine still runs it. Returns how many
    rows this pass cancelled. Requests for rows no longer running are dropped."""
    q, now = rt.queries, rt.clock.now()
    message = {"sr_now": now, "sr_message": CANCELLED_BY_OPERATOR}
    with database_errors(rt.engine, "cancelling retries handed to the engine"), rt.engine.begin() as conn:
        requests = dict(conn.execute(q.unsignalled_cancels, {"sr_limit": rt.settings.batch_size}).all())
        running = [run for run in _runs(rt, conn, requests) if run.status == "running"]
        targets = [run for run in running if run.handed_off == mode and being_delivered(run, now) is None]
        cancelled = set()
        if targets:
            cancelled = set(conn.execute(q.cancel_running, {**message, "sr_ids": [r.id for r in targets]}).scalars())
        asked = [run for run in targets if run.id in cancelled]
        conn.execute(q.signal_cancels, {"sr_now": now, "sr_keys": [str(run.id) for run in asked]})
        # Kept: delivered at this instant (or marked anew since read: the conditional write left it
        # to that delivery), the next pass; run here, the executing process's own watch; handed to
        # another engine, a process of that engine's (the same table may feed both). A row that
        # ended meanwhile is no longer running at the next pass, which drops its request then.
        waiting = {str(run.id) for run in running if run.id not in cancelled}
        dropped = [key for key in requests if key not in waiting and key not in {str(r.id) for r in asked}]
        conn.execute(q.drop_cancels, {"sr_keys": dropped})
    for run in asked:
        answer = _tell(executor, run, kill=False)[1]
        logger.bind(run_id=str(run.id), event="cancelled").warning(
            "{}: cancelled by operator ({}); the engine answered: {}", run.label, requests[str(run.id)], answer
        )
    _kill_overdue(rt, executor, mode)
    return len(asked)


def _kill_overdue(rt: Runtime, executor: Cancels, mode: str) -> None:
    """Stops forcefully the jobs the engine still runs CANCEL_TIMEOUT after their cancel: one
    question to the engine for them all. A request the engine did not answer about (it cannot
    tell, or the kill was not told) is given back for the next pass; the others are dropped."""
    q, now = rt.queries, rt.clock.now()
    before = now - rt.settings.cancel_timeout
    with database_errors(rt.engine, "stopping cancelled retries"), rt.engine.begin() as conn:
        keys = list(conn.execute(q.claim_overdue, {"sr_now": now, "sr_before": before}).scalars())
        claimed = _runs(rt, conn, keys)
    if not keys:
        return
    # Another engine's job is stopped by a process of that engine's, never through this one.
    runs = [run for run in claimed if run.handed_off == mode]
    unanswered = [str(run.id) for run in claimed if run.handed_off != mode]
    if runs:
        running = executor.still_running(runs)
        if running is None:
            unanswered = [str(run.id) for run in runs]
            logger.bind(event="cancel_kill_postponed").warning(
                "the {} engine did not answer whether the cancelled retries still run ({} due for a forceful "
                "stop): asked again at the next pass",
                mode,
                len(runs),
            )
        for run in running or ():
            told, answer = _tell(executor, run, kill=True)
            if not told:
                unanswered.append(str(run.id))
            logger.bind(run_id=str(run.id), event="cancel_killed" if told else "cancel_kill_postponed").warning(
                "{}: still running {} after its cancel: {}; the engine answered: {}",
                run.label,
                rt.settings.cancel_timeout,
                "stopped forcefully" if told else "the forceful stop is tried again at the next pass",
                answer,
            )
    with database_errors(rt.engine, "stopping cancelled retries"), rt.engine.begin() as conn:
        conn.execute(q.unclaim_cancels, {"sr_now": now, "sr_before": before, "sr_keys": unanswered})
        conn.execute(q.drop_cancels, {"sr_keys": [key for key in keys if key not in unanswered]})


def _runs(rt: Runtime, conn, keys) -> list[Run]:
    """The rows of the requests' run keys (a key the table's id type cannot hold is no row of it)."""
    ids = []
    for key in keys:
        try:
            ids.append(rt.runs.parse_id(key))
        except Exception:  # noqa: BLE001 - not an id of this table
            continue
    if not ids:
        return []
    return [
        Run.from_row(row, rt.runs.input_names)
        for row in conn.execute(rt.queries.runs_by_ids, {"sr_ids": ids}).mappings()
    ]


def _tell(executor: Cancels, run: Run, *, kill: bool) -> tuple[bool, str]:
    """Whether the engine was told to stop the run's job, and its answer for the log."""
    try:
        return True, executor.cancel(run, kill=kill)
    except Exception as exc:  # noqa: BLE001 - an engine that fails to answer: said in the log, the row stays cancelled
        return False, f"no answer ({type(exc).__name__}: {exc})"
