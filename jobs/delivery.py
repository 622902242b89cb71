"""The hand-over of a retry to the fleet (SPEC §12, amended), for an executor that delivers it
(a webhook: `start_until(run, stop)` POSTs and returns the receiver's verdict).

1. Mark: in one short transaction, under the cap's lock, the retry is committed `running`
   (`started_at` now, `handed_off` set) and marked as being delivered by this delivery, with a
   lease: the delivery's own bound plus a margin. From this commit on a fleet may write its
   outcome (conditionally on `running`) the moment it has the retry.
2. Deliver, with no database session held: a process delivering 256 retries at once still
   holds only its small pool, and an operator's action on the row waits for nothing.
3. Confirm (the mark ends, whatever the fleet wrote stands), or put it back to `pending_retry`
   when the fleet could not take it (only over `running`), or fail the attempt the webhook
   refused: each conditional on the mark still being this delivery's.

A process that dies anywhere in between leaves a marked `running` row: once its lease runs out
another process marks it anew and delivers it again with the same Idempotency-Key (the only
way a receiver sees one retry twice). Two processes never deliver it at once: a lease stands
until the delivery it covers has surely ended.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from loguru import logger

from db.engine import database_errors
from jobs.events import RetryEnded
from jobs.executor import ExecutionResult
from jobs.model import Run, RunId
from jobs.outcomes import RetryOutcome, record_outcome, taken_over
from jobs.rules import RetryPolicy, format_time
from jobs.runtime import Runtime

# Beyond the delivery's own bound: the answer's confirm must commit within it, and two hosts'
# clocks may each be off by doctor's CLOCK_SKEW_LIMIT (5 s) the other way: 30 s leaves room for
# both and a slow commit, so a live delivery's lease never looks run out to another host.
LEASE_MARGIN = timedelta(seconds=30)
# Postponements without a Retry-After back off on their own scale: 1 min, doubling.
FIRST_POSTPONEMENT = timedelta(minutes=1)
MAX_DOUBLINGS = 20


def postponement(result: ExecutionResult, policy: RetryPolicy, postponed_before: int) -> timedelta:
    """How long a retry the fleet could not take waits: its Retry-After, taken as said (the fleet
    knows when it has room); else 1 min doubling with each postponement of that retry, capped by
    the retry delay but never under a minute (a one-minute outage costs minutes, not hours)."""
    if result.retry_after is not None:
        return result.retry_after
    doubled = FIRST_POSTPONEMENT * 2 ** min(postponed_before, MAX_DOUBLINGS)
    return max(FIRST_POSTPONEMENT, min(doubled, policy.retry_delay))


def being_delivered(run: Run, now: datetime) -> tuple[str, int] | None:
    """Why an operator's action on `run` must wait, and for how many seconds: its delivery to the
    fleet is in flight (SPEC §12). None when it is not being delivered."""
    if run.status != "running" or run.delivering_until is None or run.delivering_until <= now:
        return None
    seconds = max(1, math.ceil((run.delivering_until - now).total_seconds()))
    by = run.delivering_by.split(" delivery ")[0] if run.delivering_by else "another process"
    return (
        f"retry {run.id} is being delivered to the fleet (by {by}): try again in {seconds}s, once the fleet "
        "has it or it is pending again",
        seconds,
    )


@dataclass(frozen=True)
class Marked:
    """A retry committed `running` and marked as being delivered by this delivery (`by`)."""

    run: Run
    by: str
    was_due: datetime  # a signal puts it back due as it was
    postponements: int
    lease_until: datetime  # nobody delivers it again before: an abandoned POST may live until then
    started_at: object  # as the mark wrote it, raw: the put-back leaves a start the fleet wrote


NO_ROOM = object()  # the cap is reached: nothing was marked


class Deliveries:
    """Marks, delivers and confirms (or puts back) due retries, as many at once as the cap allows."""

    def __init__(self, rt: Runtime, policy: RetryPolicy) -> None:
        self.rt, self.policy = rt, policy
        self.process = f"{socket.gethostname()} pid {os.getpid()}"
        bound = getattr(rt.executor, "delivery_bound", timedelta(0))
        self.lease = bound + LEASE_MARGIN

    def drain(self, stop: threading.Event) -> list[RetryOutcome]:
        """Delivers due retries until none is due, the cap is reached or `stop` is set; as many at
        once as MAX_CONCURRENT_RETRIES (threads, not sessions: none is held while delivering)."""
        lanes = self.rt.settings.max_concurrent_retries
        if lanes == 1:
            return self.deliver_in_turn(stop)
        with ThreadPoolExecutor(lanes, thread_name_prefix="delivery") as pool:
            return [o for done in pool.map(lambda _: self.deliver_in_turn(stop), range(lanes)) for o in done]

    def deliver_in_turn(self, stop: threading.Event) -> list[RetryOutcome]:
        """One lane: delivers due retries one after another."""
        outcomes: list[RetryOutcome] = []
        while not stop.is_set():
            marked = self.mark()
            if marked is None or marked is NO_ROOM:
                break
            outcome = self.deliver(marked, stop)
            outcomes.append(outcome)
            if outcome.status in ("released", "postponed"):
                break  # stopping; or the fleet is busy: the next poll tries again
        return outcomes

    def run_now(self, run_id: RunId, stop: threading.Event, wait: Callable[[], None]) -> RetryOutcome | None:
        """Delivers pending retry `run_id` at once, due or not, once the cap leaves room (calling
        `wait()` meanwhile); None when it was no longer pending."""
        while not stop.is_set():
            marked = self.mark(run_id)
            if marked is None:
                return None
            if marked is not NO_ROOM:
                return self.deliver(marked, stop)
            wait()
        return None

    def mark(self, run_id: RunId | None = None) -> Marked | object | None:
        """Step 1: a retry whose lease ran out (redelivered first: it counts already), else the
        most overdue due retry (or pending retry `run_id`) if the cap leaves room; under the cap's
        lock, so no count misses a mark. None: nothing to deliver; NO_ROOM: the cap is reached."""
        q = self.rt.queries
        with database_errors(self.rt.engine, "marking a retry as being delivered"), self.rt.engine.begin() as conn:
            conn.execute(q.handoff_lock)
            # Time read once the lock is held: a wait for a pooled connection or for the lock must
            # not shorten the lease of a POST that only starts after this commits.
            now = self.rt.clock.now()
            params = {
                "sr_now": now,
                "sr_limit": 1,
                "sr_run_id": run_id,
                "sr_mode": "webhook",
                "sr_by": f"{self.process} delivery {uuid.uuid4().hex[:12]}",
                "sr_lease_until": now + self.lease,
            }
            row = None if run_id is not None else conn.execute(q.mark_expired, params).mappings().first()
            again = row is not None
            if row is None:
                if conn.execute(q.room, {"sr_max": self.rt.settings.max_concurrent_retries}).scalar_one() <= 0:
                    return NO_ROOM
                row = conn.execute(q.mark_due if run_id is None else q.mark_one, params).mappings().first()
            if row is None:
                return None
        run = Run.from_row(row, self.rt.runs.input_names)
        if again:
            logger.bind(run_id=str(run.id), event="redelivering").warning(
                "{}: its delivery's lease ran out (the delivering process died): delivered again", run.label
            )
        return Marked(
            run,
            params["sr_by"],
            row["_sr_was_due"] or now,
            row["postponements"] or 0,
            params["sr_lease_until"],
            row["started_at"],
        )

    def deliver(self, marked: Marked, stop: threading.Event) -> RetryOutcome:
        """Steps 2 and 3: the POST (no session held), then its answer written."""
        started = time.monotonic()
        delivered = self.rt.executor.start_until(marked.run, stop)
        outcome = self.settle(marked, delivered.result, abandoned=delivered.abandoned)
        outcome = replace(outcome, seconds=time.monotonic() - started)
        self.rt.events.publish(RetryEnded(outcome))
        return outcome

    def settle(self, marked: Marked, result: ExecutionResult, *, abandoned: bool = False) -> RetryOutcome:
        """Step 3. `abandoned`: the POST was given up on while in flight (a signal, the delivery's
        bound): the retry is not due before its lease ends, so nobody POSTs it while that request
        may still reach the receiver."""
        run, q, now = marked.run, self.rt.queries, self.rt.clock.now()
        log = logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count)
        mine = {"sr_run_id": run.id, "sr_by": marked.by, "sr_now": now}
        back_params = {**mine, "sr_marked_started": marked.started_at}
        not_before = marked.lease_until if abandoned else None
        if not (result.handed_off or result.postponed):
            return record_outcome(self.rt, self.policy, run, result, delivery=marked.by)  # refused
        with database_errors(self.rt.engine, f"writing the delivery of run {run.id}"), self.rt.engine.begin() as conn:
            if result.handed_off:
                if not conn.execute(q.end_delivery, mine).first():
                    return taken_over(log, run)
                log.bind(event="handed_off").info("{}: handed to the fleet ({})", run.label, result.handed_off)
                return RetryOutcome(run.id, run.label, "handed_off", delivered=True)
            if result.cancelled:  # a signal: pending as it was, due, unspent, not a postponement
                due = max(marked.was_due, not_before or marked.was_due)
                back = conn.execute(q.put_back, {**back_params, "sr_due": due, "sr_postponed": 0}).first()
            else:
                due = now + postponement(result, self.policy, marked.postponements)
                due = max(due, not_before or due)
                back = conn.execute(q.put_back, {**back_params, "sr_due": due, "sr_postponed": 1}).first()
            if back is None:  # the fleet wrote a status after all: it stands; the mark ends
                ended = conn.execute(q.end_delivery, mine).first()
                if ended is None:
                    return taken_over(log, run)
                log.bind(event="kept").info("{}: the fleet wrote {}; it stands", run.label, ended[0])
                return RetryOutcome(run.id, run.label, ended[0], delivered=True)
        if result.cancelled:
            log.bind(event="released").info("{}: left pending_retry (stopped by a signal, no budget spent)", run.label)
            return RetryOutcome(run.id, run.label, "released", delivered=True)
        log.bind(event="postponed").warning(
            "{}: {}; delivered again at {} (no budget spent)", run.label, result.error, format_time(due)
        )
        return RetryOutcome(run.id, run.label, "postponed", message=result.error, retry_due=due, delivered=True)
