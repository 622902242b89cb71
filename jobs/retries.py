"""The retry processor: supersede, claim, execute, record.

- Pending retries whose chain completed late (the scraper finished the "stuck" run after all)
  are cancelled as superseded.
- Due retries are claimed under a global limit of MAX_CONCURRENT_RETRIES: a slot is a session
  advisory lock held by the executing process, so a slot held by a process that died is free
  at once. The claim also takes the run's own lock, which keeps the stuck checker off runs a
  live process is executing.
- The outcome is recorded with a conditional update: a terminal status the scraper wrote
  itself stands (its `failed` still continues the chain) (jobs/outcomes.py).
- A retry handed to the fleet takes no slot: a delivery (webhook) is marked in its row and
  counted from there (jobs/delivery.py); a queue hand-off is one statement (jobs/handoff.py).
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
from jobs.delivery import Deliveries
from jobs.events import ProcessorPassFinished, RetryEnded, RetryStarted
from jobs.executor import Execution
from jobs.handoff import has_room, queue_due_retries, take_slot
from jobs.model import Run, RunId
from jobs.outcomes import RetryOutcome, continue_fleet_failures, fail_params, record_outcome
from jobs.rules import RetryPolicy, run_label, superseded_message
from jobs.runtime import Runtime
from jobs.waiting import Waiting, read_waiting

__all__ = [
    "ProcessResult",
    "RetryDispatcher",
    "RetryOutcome",
    "continue_fleet_failures",
    "fail_params",
    "process_due_retries",
    "record_outcome",
    "supersede_completed_chains",
]

PREVIEW_LIMIT = 10_000


@dataclass(frozen=True)
class SupersededRetry:
    run_id: RunId
    chain_id: RunId
    label: str
    completed_run_id: RunId
    message: str


@dataclass(frozen=True)
class DueRetry:
    run_id: RunId
    label: str
    due: datetime


@dataclass(frozen=True)
class Claim:
    """A retry this process claimed and started."""

    run: Run
    execution: Execution
    run_locked: bool  # whether its run lock was taken (another session may hold it)


@dataclass(frozen=True)
class ProcessResult:
    superseded: tuple[SupersededRetry, ...] = ()
    executed: tuple[RetryOutcome, ...] = ()
    due: tuple[DueRetry, ...] = ()  # dry run: what would be executed
    dry_run: bool = False
    seconds: float = 0.0
    waiting: Waiting | None = None  # why due retries did not start (paused, every slot taken)

    @property
    def ran_here(self) -> int:
        """Retries executed here (a command, a callable), put back by a signal or not; a delivery
        to the fleet is never one, whatever the webhook answered."""
        return sum(1 for o in self.executed if not (o.delivered or o.failed_at_fleet) and o.status != "handed_off")

    @property
    def succeeded(self) -> int:
        return sum(1 for o in self.executed if o.status == "completed" and not o.delivered)

    @property
    def failed(self) -> int:
        """Executions here that failed (a delivery the webhook refused is `refused`)."""
        return sum(1 for o in self.executed if o.status == "failed" and not (o.delivered or o.failed_at_fleet))

    @property
    def failed_at_fleet(self) -> int:
        """Handed-off retries the fleet failed, whose chains this pass continued (nothing ran here)."""
        return sum(1 for o in self.executed if o.failed_at_fleet)

    @property
    def refused(self) -> int:
        """Deliveries the webhook refused (404, 500, an off-host redirect...): failed attempts."""
        return sum(1 for o in self.executed if o.status == "failed" and o.delivered)

    @property
    def handed_off(self) -> int:
        """Retries handed to the fleet (webhook or queue): their outcome is the scraper's to write."""
        return sum(1 for o in self.executed if o.status == "handed_off")

    @property
    def postponed(self) -> int:
        """Deliveries the fleet could not take (429, 503, unreachable): due again later, budget unspent."""
        return sum(1 for o in self.executed if o.status == "postponed")

    @property
    def released(self) -> int:
        """Executions stopped by a signal and put back to `pending_retry` (no budget spent)."""
        return sum(1 for o in self.executed if o.status == "released")

    @property
    def retries_scheduled(self) -> int:
        """Failed attempts (executed or refused deliveries) whose chain got its next retry."""
        return sum(1 for o in self.executed if o.status == "failed" and o.retry_due is not None)

    @property
    def dead_lettered(self) -> int:
        """Failed executions that ended their chain with a dead letter."""
        return sum(1 for o in self.executed if o.status == "failed" and o.dead_lettered)

    @property
    def superseded_count(self) -> int:
        return len(self.superseded)

    def counts(self) -> dict[str, int]:
        """The counts the pass is recorded and logged with."""
        counts = {
            "superseded": self.superseded_count,
            "executed": self.ran_here,
            "completed": self.succeeded,
            "failed": self.failed,
        }
        fleet = {
            "handed_off": self.handed_off,
            "postponed": self.postponed,
            "refused": self.refused,
            "failed_at_fleet": self.failed_at_fleet,
        }
        return {**counts, **{name: n for name, n in fleet.items() if n}}


def process_due_retries(
    rt: Runtime,
    policy: RetryPolicy | None = None,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    dispatch: Callable[[threading.Event], list[RetryOutcome]] | None = None,
) -> ProcessResult:
    """Supersedes what completed late, then executes due retries until none is due.

    Executes up to MAX_CONCURRENT_RETRIES at once, counted across every process on the
    database; returns when nothing is due or every slot is taken by others. With `stop` set
    (a signal), no new retry is claimed and those executing go back to `pending_retry`, due
    now, budget unspent. `dispatch` executes the due retries instead, and gives what it finished:
    the daemon's slots, which run beside its scheduler. Each retry's start and end is published as
    it happens, and the pass once it is over (`ProcessorPassFinished`; a dry run's is not).
    """
    policy = policy or rt.settings.policy
    started = time.monotonic()
    if not dry_run:
        _ = rt.executor  # no executor, no claim: refused before anything changes
    superseded = supersede_completed_chains(rt, dry_run=dry_run)
    if dry_run:
        due = preview_due(rt)
        return ProcessResult(
            superseded, due=due, dry_run=True, seconds=time.monotonic() - started, waiting=read_waiting(rt)
        )
    if dispatch is not None:
        executed = dispatch(stop or threading.Event())
    else:
        executed = continue_fleet_failures(rt, policy)
        for outcome in executed:  # told like any attempt that ended: each line names its run
            rt.events.publish(RetryEnded(outcome))
        executed += RetryDispatcher(rt, policy).drain(stop or threading.Event())
    waiting = read_waiting(rt)  # what is still due once the pass is over, and why
    result = ProcessResult(superseded, tuple(executed), seconds=time.monotonic() - started, waiting=waiting)
    rt.events.publish(ProcessorPassFinished(result))
    return result


def supersede_completed_chains(rt: Runtime, *, dry_run: bool = False) -> tuple[SupersededRetry, ...]:
    """Cancels pending retries whose chain has a completed run: `Superseded: run <id> completed`.

    In the same transaction the completed runs of those chains lose the `next_retry_at` their
    failure as stuck gave them, so the monitoring SQL shows no retry due for a completed run, and
    the error stuck-runs wrote on them (a message the scraper wrote since stays).
    """
    q = rt.queries
    now = rt.clock.now()
    with database_errors(rt.engine, "superseding retries"), rt.engine.connect() as conn:
        with conn.begin():
            rows = conn.execute(q.superseded_preview if dry_run else q.superseded_batch).mappings().all()
            found = [
                SupersededRetry(
                    run_id=row["id"],
                    chain_id=row["original_run_id"],
                    label=run_label(row["what"], row["retry_count"], row["max_retries"]),
                    completed_run_id=row["completed_id"],
                    message=superseded_message(row["completed_id"]),
                )
                for row in rows
            ]
            if dry_run or not found:
                return tuple(found)
            params = {"sr_now": now, "sr_ids": [s.run_id for s in found], "sr_messages": [s.message for s in found]}
            cancelled = set(conn.execute(q.cancel_pending, params).scalars())
            done = tuple(s for s in found if s.run_id in cancelled)
            if done:
                conn.execute(q.clear_completed_due(), {"sr_now": now, "sr_chains": list({s.chain_id for s in done})})
    for s in done:
        logger.bind(run_id=str(s.run_id), chain=str(s.chain_id), event="superseded").info("{}: {}", s.label, s.message)
    return done


def preview_due(rt: Runtime) -> tuple[DueRetry, ...]:
    with database_errors(rt.engine, "listing due retries"), rt.engine.connect() as conn:
        rows = conn.execute(rt.queries.due_preview, {"sr_now": rt.clock.now(), "sr_limit": PREVIEW_LIMIT}).mappings()
        return tuple(
            DueRetry(
                row["id"],
                run_label(row["what"], row["retry_count"], row["max_retries"]),
                row["next_retry_at"],
            )
            for row in rows
        )


class RetryDispatcher:
    """Claims and executes due retries in the slots it can take."""

    def __init__(self, rt: Runtime, policy: RetryPolicy) -> None:
        self.rt = rt
        self.policy = policy
        self.slots_ns = locks.namespace(rt.runs.canonical_name, locks.SLOTS)

    @property
    def deliveries(self) -> Deliveries | None:
        """The hand-over, when the executor delivers to the fleet (a webhook) instead of running here."""
        if getattr(self.rt.executor, "start_until", None) is None:
            return None
        return Deliveries(self.rt, self.policy)

    def drain(self, stop: threading.Event) -> list[RetryOutcome]:
        """Executes due retries in every free slot until none is due (or `stop` is set)."""
        deliveries = self.deliveries
        if deliveries is not None and not self.rt.settings.handoff:
            return deliveries.drain(stop)
        slots = range(self.rt.settings.max_concurrent_retries)
        if len(slots) == 1:
            return self.work_slot(0, stop)
        with ThreadPoolExecutor(len(slots), thread_name_prefix="retry-slot") as pool:
            return [o for outcomes in pool.map(lambda slot: self.work_slot(slot, stop), slots) for o in outcomes]

    def work_slot(self, slot: int, stop: threading.Event) -> list[RetryOutcome]:
        """Holds slot `slot` (if free) and executes due retries one after another in it."""
        if self.rt.settings.handoff:
            return self.hand_to_queue() if slot == 0 and not stop.is_set() else []
        deliveries = self.deliveries
        if deliveries is not None:  # a delivery holds no slot (nor session): the row's mark counts it
            return deliveries.deliver_in_turn(stop)
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
        if self.rt.settings.handoff:
            handed = self.hand_to_queue(run_id)
            return handed[0] if handed else None
        deliveries = self.deliveries
        if deliveries is not None:
            return deliveries.run_now(run_id, stop, wait)
        while not stop.is_set():
            for slot in range(self.rt.settings.max_concurrent_retries):
                with self._slot(slot) as conn:
                    if conn is not None:
                        return self._claim_and_execute(conn, stop, run_id)
            wait()
        return None

    def hand_to_queue(self, run_id: RunId | None = None) -> list[RetryOutcome]:
        """SCRAPE_RUN_HANDOFF: hands due retries (or pending retry `run_id`) to the fleet's queue."""
        outcomes = []
        for run in queue_due_retries(self.rt, run_id):
            logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count, event="handed_off").info(
                "{}: handed to the fleet's workers ({})", run.label, self.rt.runs.layout.written("queued")
            )
            outcome = RetryOutcome(run.id, run.label, "handed_off")
            self.rt.events.publish(RetryEnded(outcome))
            outcomes.append(outcome)
        return outcomes

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
            return self.rt.executor.start(run)
        except BaseException:
            with database_errors(self.rt.engine, f"handing back run {run.id}"), self.rt.engine.begin() as back:
                back.execute(
                    self.rt.queries.unclaim, {"sr_run_id": run.id, "sr_due": was_due, "sr_now": self.rt.clock.now()}
                )
            raise

    def wait_and_record(self, run: Run, execution: Execution, stop: threading.Event) -> RetryOutcome:
        started = time.monotonic()
        timeout = self.rt.clock.real(self.rt.settings.timeout)
        result = execution.wait(timeout, stop)
        outcome = replace(record_outcome(self.rt, self.policy, run, result), seconds=time.monotonic() - started)
        self.rt.events.publish(RetryEnded(outcome))
        return outcome


