"""The retry processor: supersede, then dispatch due retries, then say what happened.

- Pending retries whose chain completed late (the scraper finished the "stuck" run after all)
  are cancelled as superseded.
- Due retries are dispatched under a global limit of MAX_CONCURRENT_RETRIES by the strategy the
  executor names (jobs/executors/base.py): run here in slots (jobs/running.py), delivered to the
  fleet one by one, each marked in its row and counted from there (jobs/delivery.py), or handed
  to the fleet's queue in one statement (jobs/queueing.py).
- The outcome is recorded with a conditional update: a terminal status the scraper wrote
  itself stands (its `failed` still continues the chain) (jobs/outcomes.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from loguru import logger

from db.engine import database_errors
from jobs.cancelling import engine_cancels
from jobs.delivery import Deliveries
from jobs.events import ProcessorPassFinished, RetryEnded
from jobs.executors.base import Delivers, Queues, RunsHere
from jobs.model import RunId
from jobs.outcomes import RetryOutcome, continue_fleet_failures, fail_params, follow_the_fleet, record_outcome
from jobs.queueing import Queueing
from jobs.rules import RetryPolicy, run_label, superseded_message
from jobs.running import RunningHere
from jobs.runtime import Runtime
from jobs.waiting import Waiting, read_waiting

__all__ = [
    "ProcessResult",
    "RetryDispatcher",
    "RetryOutcome",
    "continue_fleet_failures",
    "fail_params",
    "follow_the_fleet",
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
        engine_cancels(rt)  # operators' cancels of retries handed to an engine (SPEC §16)
        executed = follow_the_fleet(rt, policy)
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


class Dispatch(Protocol):
    """A dispatch strategy: how due retries get to the scraper (jobs/running.py, jobs/delivery.py,
    jobs/queueing.py). Each publishes a retry's start and end (`RetryStarted`, `RetryEnded`) as they happen."""

    def drain(self, stop: threading.Event) -> list[RetryOutcome]:
        """Dispatches due retries until none is due, the cap is reached or `stop` is set."""

    def work_slot(self, slot: int, stop: threading.Event) -> list[RetryOutcome]:
        """What one of the daemon's slot threads does in a poll (`scheduler/dispatch.py`)."""

    def run_now(self, run_id: RunId, stop: threading.Event, wait: Callable[[], None]) -> RetryOutcome | None:
        """Dispatches pending retry `run_id` at once, due or not, once the cap leaves room (calling
        `wait()` meanwhile); None when it was no longer pending."""


@dataclass(frozen=True)
class _Strategies:
    """The dispatch strategies, one of which an executor picks (`Executor.dispatch_with`)."""

    rt: Runtime
    policy: RetryPolicy

    def run_here(self, executor: RunsHere) -> Dispatch:
        return RunningHere(self.rt, executor, self.policy)

    def deliver(self, executor: Delivers) -> Dispatch:
        return Deliveries(self.rt, executor, self.policy)

    def queue(self, executor: Queues) -> Dispatch:
        return Queueing(self.rt, executor)


class RetryDispatcher:
    """Dispatches due retries the way the runtime's executor asks for, chosen once here."""

    def __init__(self, rt: Runtime, policy: RetryPolicy) -> None:
        self.strategy: Dispatch = rt.executor.dispatch_with(_Strategies(rt, policy))

    def drain(self, stop: threading.Event) -> list[RetryOutcome]:
        """Dispatches due retries until none is due (or `stop` is set)."""
        return self.strategy.drain(stop)

    def work_slot(self, slot: int, stop: threading.Event) -> list[RetryOutcome]:
        """One poll of slot `slot`'s thread: executes due retries in it, or delivers them."""
        return self.strategy.work_slot(slot, stop)

    def run_now(self, run_id: RunId, stop: threading.Event, wait: Callable[[], None]) -> RetryOutcome | None:
        """Dispatches pending retry `run_id` at once, in the first slot that is free.

        Calls `wait()` between attempts while every slot is taken. Returns None if the retry
        was no longer pending (another process took it).
        """
        return self.strategy.run_now(run_id, stop, wait)
