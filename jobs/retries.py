"""The retry processor: supersede, claim, execute, record.

- Pending retries whose chain completed late (the scraper finished the "stuck" run after all)
  are cancelled as superseded.
- Due retries are claimed under a global limit of MAX_CONCURRENT_RETRIES: a slot is a session
  advisory lock held by the executing process, so a slot held by a process that died is free
  at once. The claim also takes the run's own lock, which keeps the stuck checker off runs a
  live process is executing.
- The outcome is recorded with a conditional update: a terminal status the scraper wrote
  itself stands (its `failed` still continues the chain).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import ClassVar

from loguru import logger
from sqlalchemy.engine import Connection

from db import locks
from db.engine import database_errors
from jobs.executor import Execution, ExecutionResult
from jobs.handoff import has_room, queue_due_retries, take_slot
from jobs.model import Run, RunId
from jobs.patterns import parse_retry_after
from jobs.rules import (
    FailureOutcome,
    RetryPolicy,
    chain_budget,
    decide_failure,
    format_time,
    retry_delay,
    run_label,
    superseded_message,
    timeout_error,
)
from jobs.runtime import Runtime
from jobs.waiting import Waiting, read_waiting

PREVIEW_LIMIT = 10_000


@dataclass(frozen=True)
class SupersededRetry:
    run_id: RunId
    chain_id: RunId
    label: str
    completed_run_id: RunId
    message: str


@dataclass(frozen=True)
class RetryOutcome:
    """What became of one executed retry attempt."""

    run_id: RunId
    label: str
    # completed | failed | released (shutdown) | handed_off (to the fleet, SPEC §12) | postponed
    # (the fleet could not take it) | whatever the scraper wrote
    status: str
    message: str | None = None
    pattern: str | None = None
    retry_id: RunId | None = None
    retry_due: datetime | None = None
    dead_lettered: bool = False
    seconds: float = 0.0


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
    def succeeded(self) -> int:
        return sum(1 for o in self.executed if o.status == "completed")

    @property
    def failed(self) -> int:
        return sum(1 for o in self.executed if o.status == "failed")

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

    stuck_detected: ClassVar[int] = 0  # a processor pass finds no stuck run (the metrics read every result alike)

    @property
    def retries_scheduled(self) -> int:
        """Failed executions whose chain got its next retry."""
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
            "executed": len(self.executed) - self.handed_off - self.postponed,
            "completed": self.succeeded,
            "failed": self.failed,
        }
        fleet = {"handed_off": self.handed_off, "postponed": self.postponed}
        return {**counts, **{name: n for name, n in fleet.items() if n}}


def process_due_retries(
    rt: Runtime,
    policy: RetryPolicy | None = None,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    observe: Callable[[str, object], None] | None = None,
) -> ProcessResult:
    """Supersedes what completed late, then executes due retries until none is due.

    Executes up to MAX_CONCURRENT_RETRIES at once, counted across every process on the
    database; returns when nothing is due or every slot is taken by others. With `stop` set
    (a signal), no new retry is claimed and those executing go back to `pending_retry`, due
    now, budget unspent. `observe` is told ("started", run) and ("finished", outcome) as they
    happen.
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
    executed = continue_fleet_failures(rt, policy)
    executed += RetryDispatcher(rt, policy, observe).drain(stop or threading.Event())
    waiting = read_waiting(rt)  # what is still due once the pass is over, and why
    return ProcessResult(superseded, tuple(executed), seconds=time.monotonic() - started, waiting=waiting)


def continue_fleet_failures(rt: Runtime, policy: RetryPolicy | None = None) -> list[RetryOutcome]:
    """Continues the chains of handed-off retries the fleet failed (SPEC §12), as for any failed
    execution (§4): classified, then retried or ended with a dead letter. A batch a call."""
    policy = policy or rt.settings.policy
    q, now = rt.queries, rt.clock.now()
    with database_errors(rt.engine, "continuing the fleet's failed retries"), rt.engine.begin() as conn:
        rows = conn.execute(q.fleet_failures, {"sr_limit": rt.settings.batch_size}).mappings().all()
        if not rows:
            return []
        decided = []
        for row in rows:
            run = Run.from_row(row, rt.runs.input_names)
            error = run.error_message or "Run failed"
            result = ExecutionResult(ok=False, error=error, retry_after=parse_retry_after(error))
            decided.append((run, _decide(rt, policy, run, error, result, now)))
        params = {"sr_now": now, **fail_params([(run.id, outcome, None) for run, outcome in decided])}
        failed = {row[0]: row for row in conn.execute(q.fail_reported, params)}
    return [
        _failed(logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count), run, outcome, row)
        for run, outcome in decided
        if (row := failed.get(run.id)) is not None
    ]


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

    def __init__(self, rt: Runtime, policy: RetryPolicy, observe: Callable[[str, object], None] | None = None) -> None:
        self.rt = rt
        self.policy = policy
        self.slots_ns = locks.namespace(rt.runs.canonical_name, locks.SLOTS)
        # Told ("started", run) and ("finished", outcome) as they happen (the daemon's metrics).
        self.observe = observe or (lambda event, payload: None)

    def drain(self, stop: threading.Event) -> list[RetryOutcome]:
        """Executes due retries in every free slot until none is due (or `stop` is set)."""
        slots = range(self.rt.settings.max_concurrent_retries)
        if len(slots) == 1:
            return self.work_slot(0, stop)
        with ThreadPoolExecutor(len(slots), thread_name_prefix="retry-slot") as pool:
            return [o for outcomes in pool.map(lambda slot: self.work_slot(slot, stop), slots) for o in outcomes]

    def work_slot(self, slot: int, stop: threading.Event) -> list[RetryOutcome]:
        """Holds slot `slot` (if free) and executes due retries one after another in it."""
        if self.rt.settings.handoff:
            return self.hand_to_queue() if slot == 0 and not stop.is_set() else []
        outcomes: list[RetryOutcome] = []
        with self._slot(slot) as conn:
            while conn is not None and not stop.is_set() and has_room(self.rt, conn):
                outcome = self._claim_and_execute(conn, stop)
                if outcome is None:
                    break
                outcomes.append(outcome)
                if outcome.status in ("released", "postponed"):
                    break  # cancelled: stopping; postponed: the fleet is busy, the next poll tries again
        return outcomes

    def run_now(self, run_id: RunId, stop: threading.Event, wait: Callable[[], None]) -> RetryOutcome | None:
        """Executes pending retry `run_id` at once, in the first slot that is free.

        Calls `wait()` between attempts while every slot is taken. Returns None if the retry
        was no longer pending (another process took it).
        """
        if self.rt.settings.handoff:
            handed = self.hand_to_queue(run_id)
            return handed[0] if handed else None
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
            self.observe("finished", outcome)
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
        processing stops).

        A retry handed to the fleet (a webhook) is the other way round: the claim stays open,
        the row locked, until the receiver answers, and commits only a 2xx; a process killed
        meanwhile leaves it pending, delivered again with the same `Idempotency-Key`.
        Returns None when there is nothing to claim.
        """
        q = self.rt.queries
        params = {"sr_now": self.rt.clock.now(), "sr_limit": 1, "sr_run_id": run_id}
        statement = q.claim_due if run_id is None else q.claim_one
        transaction = conn.begin()
        execution = None
        try:
            row = conn.execute(statement, params).mappings().first()
            if row is None:
                transaction.rollback()
                return None
            run = Run.from_row(row, self.rt.runs.input_names)
            # An executor that waits for the fleet's answer gives up on a signal (jobs/webhook.py).
            start_until = getattr(self.rt.executor, "start_until", None)
            if start_until is None:
                transaction.commit()
                execution = self._start_claimed(run, row["_sr_was_due"])
            else:
                execution = start_until(run, stop or threading.Event())
            handed_off = getattr(execution, "handed_off", None)
            if getattr(execution, "postponed", False) and execution.result.cancelled:
                transaction.rollback()  # stopped by a signal: pending as it was, due
            elif getattr(execution, "postponed", False):
                # The fleet could not take it: pending again, due when it said, in this very
                # transaction: rolled back first, another process would deliver it at once.
                due = self.rt.clock.now() + postponement(execution.result, self.policy, run, self.rt.rng)
                conn.execute(q.unclaim, {"sr_run_id": run.id, "sr_due": due, "sr_now": self.rt.clock.now()})
                transaction.commit()
                execution.result = replace(execution.result, retry_after=due - self.rt.clock.now())
            elif handed_off:
                # Under the cap's lock, so no count misses it while it turns from a slot's retry into a hand-off.
                conn.execute(q.handoff_lock)
                conn.execute(q.hand_over, {"sr_now": self.rt.clock.now(), "sr_run_id": run.id, "sr_mode": handed_off})
                transaction.commit()
            elif transaction.is_active:
                transaction.commit()
        except BaseException:
            if transaction.is_active:
                transaction.rollback()
            raise  # the slot's session ends, and the run lock with it
        if not (handed_off or getattr(execution, "postponed", False)):
            logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count, event="started").info(
                "{}: started", run.label
            )
            self.observe("started", run)
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
        self.observe("finished", outcome)
        return outcome


def postponement(result: ExecutionResult, policy: RetryPolicy, run: Run, rng) -> timedelta:
    """How long a retry the fleet could not take waits: its Retry-After, taken as said (the fleet
    knows when it has room), else the retry's own delay."""
    if result.retry_after is not None:
        return result.retry_after
    return retry_delay(policy, max(run.retry_count, 1), rng)


def fail_params(items: list[tuple[object, FailureOutcome, str | None]]) -> dict[str, list]:
    """Bind values for `fail_running` / `fail_reported`: (run id, outcome, detail) per attempt."""
    return {
        "sr_ids": [run_id for run_id, _, _ in items],
        "sr_messages": [outcome.message for _, outcome, _ in items],
        "sr_budgets": [outcome.budget for _, outcome, _ in items],
        "sr_dues": [outcome.retry_due for _, outcome, _ in items],
        "sr_patterns": [outcome.pattern for _, outcome, _ in items],
        "sr_details": [detail for _, _, detail in items],
    }


def record_outcome(rt: Runtime, policy: RetryPolicy, run: Run, result: ExecutionResult) -> RetryOutcome:
    """Writes what an execution did, never over a status someone else wrote.

    Success → `completed`. Failure → `failed` with the next retry or the end of the chain.
    Cancelled by a shutdown → back to `pending_retry`, due now, no budget spent. If the row is
    no longer `running` the scraper wrote its own status: `completed` and others stand, and a
    `failed` it wrote continues the chain like any failure.
    """
    q = rt.queries
    now = rt.clock.now()
    log = logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count)
    with database_errors(rt.engine, f"recording the outcome of run {run.id}"), rt.engine.begin() as conn:
        if result.handed_off:
            log.bind(event="handed_off").info("{}: handed to the fleet ({})", run.label, result.handed_off)
            return RetryOutcome(run.id, run.label, "handed_off")
        if result.postponed and result.cancelled:
            # Stopped by a signal while the fleet had not answered: the claim rolled back, so the
            # retry is pending as it was, due (it was claimed), its budget unspent.
            log.bind(event="released").info("{}: left pending_retry (stopped by a signal, no budget spent)", run.label)
            return RetryOutcome(run.id, run.label, "released")
        if result.postponed:
            due = now + postponement(result, policy, run, rt.rng)  # written by the claim, in its transaction
            log.bind(event="postponed").warning(
                "{}: {}; delivered again at {} (no budget spent)", run.label, result.error, format_time(due)
            )
            return RetryOutcome(run.id, run.label, "postponed", message=result.error, retry_due=due)
        if result.cancelled:
            released = conn.execute(q.release, {"sr_now": now, "sr_ids": [run.id]}).first()
            if released:
                log.bind(event="released").info(
                    "{}: put back to pending_retry (stopped by a signal, no budget spent)", run.label
                )
                return RetryOutcome(run.id, run.label, "released")
        elif result.ok:
            if conn.execute(q.complete, {"sr_now": now, "sr_run_id": run.id}).first():
                log.bind(event="completed").success("{}: completed", run.label)
                return RetryOutcome(run.id, run.label, "completed")
        else:
            error = timeout_error(rt.settings.timeout) if result.timed_out else (result.error or "Run failed")
            outcome = _decide(rt, policy, run, error, result, now)
            params = {"sr_now": now, **fail_params([(run.id, outcome, result.detail)])}
            row = conn.execute(q.fail_running, params).first()
            if row:
                return _failed(log, run, outcome, row)
        current = conn.execute(q.get, {"sr_run_id": run.id}).mappings().one()
        if current["status"] == "failed" and current["next_retry_at"] is None:
            error = current["error_message"] or result.error or "Run failed"
            outcome = _decide(rt, policy, run, error, result, now)
            params = {"sr_now": now, **fail_params([(run.id, outcome, result.detail)])}
            row = conn.execute(q.fail_reported, params).first()
            if row:
                return _failed(log, run, outcome, row)
    log.bind(event="kept").info("{}: the scraper wrote {}; it stands", run.label, current["status"])
    return RetryOutcome(run.id, run.label, current["status"], message=current["error_message"])


def _decide(
    rt: Runtime, policy: RetryPolicy, run: Run, error: str, result: ExecutionResult, now: datetime
) -> FailureOutcome:
    pattern = "timeout" if result.timed_out else rt.classifier.classify(error)
    if pattern == "unknown" and result.detail:
        pattern = rt.classifier.classify(result.detail)
    return decide_failure(
        error=error,
        pattern=pattern,
        retry_count=run.retry_count,
        budget=chain_budget(run.is_retry, run.max_retries, policy),
        now=now,
        policy=policy,
        rng=rt.rng,
        retry_after=result.retry_after,
    )


def _failed(log, run: Run, outcome: FailureOutcome, row) -> RetryOutcome:
    """The outcome of an attempt the fail statement really failed (`row`: id, retry_id, dead)."""
    _, retry_id, dead = row
    result = RetryOutcome(
        run.id,
        run.label,
        "failed",
        message=outcome.message,
        pattern=outcome.pattern,
        retry_id=retry_id,
        retry_due=outcome.retry_due if retry_id else None,
        dead_lettered=dead is not None,
    )
    log.bind(event="failed", pattern=result.pattern).warning("{}: {}", run.label, result.message)
    return result
