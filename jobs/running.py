"""Retries run here (a command, a callable, an in-process scraper): claim, commit, start, wait,
record — in slots.

A slot is a session advisory lock held by the executing process, so a slot held by a process
that died is free at once; MAX_CONCURRENT_RETRIES counts them across every process, with the
retries handed to the fleet (jobs/slots.py). The claim also takes the run's own lock, which keeps
the stuck checker off runs a live process is executing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime

from loguru import logger
from sqlalchemy.engine import Connection

from db import locks
from db.engine import database_errors
from jobs.cancelling import CancelWatch
from jobs.events import RetryEnded, RetryStarted
from jobs.executors.base import Execution, RunsHere
from jobs.executors.outcome import Cancelled, Released, TimedOut
from jobs.limits import applied_to_run, current_limits, execution_timeout, stall_limit
from jobs.model import Run, RunId
from jobs.outcomes import RetryOutcome, record_outcome
from jobs.progress_watch import ProgressWatch
from jobs.rules import RetryPolicy, stalled_error, timeout_error
from jobs.runtime import Runtime
from jobs.slots import has_room, take_slot


@dataclass(frozen=True)
class Claim:
    """A retry this process claimed and started."""

    run: Run
    execution: Execution
    run_locked: bool  # whether its run lock was taken (another session may hold it)


class RunningHere:
    """Claims and executes due retries in the slots it can take (the dispatch strategy of an
    executor that runs here)."""

    def __init__(
        self,
        rt: Runtime,
        executor: RunsHere,
        policy: RetryPolicy,
    ) -> None:
        self.rt, self.executor, self.policy = rt, executor, policy
        self.slots_ns = locks.namespace(rt.runs.canonical_name, locks.SLOTS)
        self.cancels = CancelWatch(rt)  # an operator's cancel of a retry executing here (SPEC §16)
        # Told ("started", run) and ("finished", outcome) as they happen (the daemon's metrics).

    def drain(self, stop: threading.Event) -> list[RetryOutcome]:
        """Executes due retries in every free slot until none is due (or `stop` is set)."""
        slots = range(self.rt.settings.max_concurrent_retries)
        if len(slots) == 1:
            return self.work_slot(0, stop)
        with ThreadPoolExecutor(len(slots), thread_name_prefix="retry-slot") as pool:
            return [o for outcomes in pool.map(lambda slot: self.work_slot(slot, stop), slots) for o in outcomes]

    def work_slot(self, slot: int, stop: threading.Event) -> list[RetryOutcome]:
        """Holds slot `slot` (if free) and executes due retries one after another in it."""
        outcomes: list[RetryOutcome] = []
        with self._slot(slot) as conn:
            while conn is not None and not stop.is_set() and has_room(self.rt, conn):
                outcome = self._claim_and_execute(conn, stop)
                if outcome is None:
                    break
                outcomes.append(outcome)
                if outcome.status == "released":
                    break  # stopping
        return outcomes

    def run_now(self, run_id: RunId, stop: threading.Event, wait: Callable[[], None]) -> RetryOutcome | None:
        """Executes pending retry `run_id` at once, in the first slot that is free.

        Calls `wait()` between attempts while every slot is taken. Returns None if the retry
        was no longer pending (another process took it).
        """
        while not stop.is_set():
            for slot in range(self.rt.settings.max_concurrent_retries):
                with self._slot(slot) as conn:
                    if conn is not None:
                        return self._claim_and_execute(conn, stop, run_id)
            wait()
        return None

    @contextmanager
    def _slot(self, slot: int) -> Iterator[Connection | None]:
        """A connection whose session holds slot `slot`, or None when another session holds it.

        Whatever goes wrong, the session ends and every lock it held with it.
        """
        with database_errors(self.rt.engine, "executing retries"):
            conn = self.rt.engine.connect()
            try:
                if not take_slot(self.rt, conn, self.slots_ns, slot):
                    conn.rollback()
                    yield None
                    return
                conn.commit()
                yield conn
                locks.unlock(conn, self.slots_ns, slot)
                conn.commit()
            except BaseException:
                conn.invalidate()
                raise
            finally:
                conn.close()

    def _claim_and_execute(
        self, conn: Connection, stop: threading.Event, run_id: RunId | None = None
    ) -> RetryOutcome | None:
        claim = self.claim(conn, run_id, stop)
        if claim is None:
            return None
        try:
            return self.wait_and_record(claim.run, claim.execution, stop)
        finally:
            if claim.run_locked:
                locks.unlock_run(conn, self.rt.queries.runs_ns, claim.run.id)
                conn.commit()

    def claim(self, conn: Connection, run_id: RunId | None = None, stop: threading.Event | None = None) -> Claim | None:
        """Claims the most overdue retry (or pending retry `run_id`, due or not) and starts it.

        A retry run here is claimed (`running`, the run lock held in `conn`'s session) and
        committed before its scraper starts: a process killed at any moment leaves either a
        pending retry or a claimed one nobody else will start (the stuck checker fails it once
        the lock is gone), never a scraper started for a claim that then rolled back and is
        claimed again — a retry executed twice. A start that fails puts the retry back as it was
        (due when it was, its budget unspent) and raises `StartFailed` (a configuration problem:
        processing stops). Returns None when there is nothing to claim.
        """
        q = self.rt.queries
        params = {"sr_now": self.rt.clock.now(), "sr_limit": 1, "sr_run_id": run_id}
        statement = q.claim_due if run_id is None else q.claim_one
        with conn.begin():
            row = conn.execute(statement, params).mappings().first()
        if row is None:
            return None
        run = Run.from_row(row, self.rt.runs.input_names)
        execution = self._start_claimed(run, row["_sr_was_due"])
        logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count, event="started").info(
            "{}: started", run.label
        )
        self.rt.events.publish(RetryStarted(run))
        return Claim(run, execution, bool(row["_sr_locked"]))

    def _start_claimed(self, run: Run, was_due: datetime | None) -> Execution:
        """Starts the scraper of a committed claim; if it cannot start, the retry goes back to
        `pending_retry` as it was, due when it was, and the error is raised."""
        try:
            return self.executor.start(run)
        except BaseException:
            with database_errors(self.rt.engine, f"handing back run {run.id}"), self.rt.engine.begin() as back:
                back.execute(
                    self.rt.queries.unclaim, {"sr_run_id": run.id, "sr_due": was_due, "sr_now": self.rt.clock.now()}
                )
            raise

    def wait_and_record(self, run: Run, execution: Execution, stop: threading.Event) -> RetryOutcome:
        """Waits for the retry within its own limit (SPEC §14: EXECUTION_TIMEOUT, else the run's
        limit by the precedence), stopping it when its progress stands still, and records how it ended."""
        started = time.monotonic()
        limits = current_limits(self.rt)
        applied = applied_to_run(self.rt, run, limits)
        timeout = execution_timeout(self.rt.settings, applied)
        with (
            ProgressWatch(self.rt, run, stall_limit(limits, applied), stop) as watch,
            self.cancels.watching(run, watch.event) as interrupt,
        ):
            ended = execution.wait(self.rt.clock.real(timeout), interrupt)
        if isinstance(ended, TimedOut):
            ended = replace(ended, error=timeout_error(timeout))
        elif isinstance(ended, Released) and interrupt.cancelled_by is not None:
            ended = Cancelled(by=interrupt.cancelled_by)
        elif isinstance(ended, Released) and watch.stalled_for is not None and not stop.is_set():
            ended = TimedOut(detail=ended.detail, error=stalled_error(watch.stalled_for))
        outcome = replace(record_outcome(self.rt, self.policy, run, ended), seconds=time.monotonic() - started)
        self.rt.events.publish(RetryEnded(outcome))
        return outcome
