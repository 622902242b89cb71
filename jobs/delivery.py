"""The hand-over of a retry to the fleet (SPEC §12, amended), for an executor that delivers it
(`Delivers`, jobs/executors/base.py: a webhook's `deliver(run, stop)` POSTs, reports the answer).

1. Mark: in one short transaction under the cap's lock (one round trip), the retry is committed
   `running` (`started_at` now, `handed_off` set), marked as being delivered by this delivery with
   a lease (the delivery's own bound plus a margin); from then a fleet may write its outcome. Lanes
   wanting a retry at once are marked for in one such transaction (a set: `mark_batch`), waiting
   holding no session; in a pass (`drain`) a set takes all the room, for the next lanes (`ready`).
2. Deliver, with no database session held (a process delivering 256 at once holds its small pool).
3. Confirm (the mark ends, whatever the fleet wrote stands; in sets: `end_marks`), or put it back
   to `pending_retry` when the fleet could not take it (only over `running`), or fail the attempt
   the webhook refused: each conditional on the mark still being this delivery's.

A process that dies anywhere in between leaves a marked `running` row: once its lease runs out
another process marks it anew and delivers it again with the same Idempotency-Key (the only way
a receiver sees one retry twice). Two processes never deliver it at once: a lane sends only while
the lease still covers a whole delivery (also after asking the engine whether it has the job).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta

from loguru import logger
from sqlalchemy.exc import OperationalError

from db.engine import PRECEDED_BY, database_errors
from jobs.batching import Batches, Combined
from jobs.events import RetryEnded
from jobs.executors.base import Delivers, ExecutorMisconfigured, KnowsItsJobs
from jobs.executors.outcome import DeliveryOutcome, HandedOver, Misconfigured, Released, clean
from jobs.model import RunId
from jobs.outcomes import Marked, RetryOutcome, confirmed, record_outcome
from jobs.outcomes import being_delivered as being_delivered  # where the other modules import it
from jobs.rules import RetryPolicy, known_priority
from jobs.runtime import Runtime

# Beyond the delivery's own bound: the answer's confirm must commit within it, and two hosts'
# clocks may each be off by doctor's CLOCK_SKEW_LIMIT (5 s) the other way: 30 s leaves room for
# both and a slow commit, so a live delivery's lease never looks run out to another host.
LEASE_MARGIN = timedelta(seconds=30)


def lanes_for(executor: Delivers, cap: int) -> int:
    """How many deliveries a pass runs at once: the cap, or fewer where the engine takes a retry in a
    few ms (`lanes`: Celery's send_task; more threads would contend for the interpreter)."""
    return max(1, min(cap, executor.lanes or cap))


STOP_POLL_SECONDS = 0.1  # how soon a lane waiting for room sees a stop
NO_ROOM = object()  # the cap is reached: nothing was marked
LEASE_TOO_SHORT = "its lease would end before a delivery could: it waited too long for a lane or for the cap's lock"
ASKED_TOO_LONG = "its lease would end before a delivery could: asking the fleet whether it had the job took too long"
DEADLOCK, DEADLOCK_ATTEMPTS = "40P01", 3  # a set of confirms PostgreSQL ended to break a deadlock: tried again


class Deliveries:
    """Marks, delivers and confirms (or puts back) due retries, as many at once as the cap allows
    (the dispatch strategy of an executor that delivers to the fleet)."""

    def __init__(
        self,
        rt: Runtime,
        executor: Delivers,
        policy: RetryPolicy,
    ) -> None:
        self.rt, self.executor, self.policy = rt, executor, policy
        self.process = f"{socket.gethostname()} pid {os.getpid()}"
        self.lease = executor.bound + LEASE_MARGIN
        self.misconfigured: str | None = None  # the configuration error the fleet answered last
        self.said: str | None = None  # the one a daemon's slot said
        self.lock = threading.Lock()
        # Retries marked beyond the lanes asking (`drain`'s `ahead`), in start order, for the next lanes.
        self.ready: deque[Marked] = deque()
        self.ahead = 0
        # One lane at a time marks the next set while the others deliver those ready, until a set
        # finds nothing more due (`mark_before_running_dry`).
        self.marking_ahead, self.due_left = threading.Lock(), True
        # This process's deliveries marked and not yet settled, and how many have settled: a lane
        # finding no room waits for a settle while some are unsettled (`room_may_come`).
        self.settled = threading.Condition(threading.Lock())
        self.unsettled, self.settles, self.broken = 0, 0, False  # broken: a lane of the pass raised
        self.batches: Batches[None, Marked | object | None] = Batches(
            lambda asking: self.mark_batch(asking, self.ahead)
        )
        self.confirms: Batches[Marked, str | None] = Batches(self.end_marks)
        self.later: Combined[tuple[Marked, HandedOver, float]] = Combined(self.write_confirms)
        self.confirmed: list[RetryOutcome] = []  # a pass's, written by whichever lane wrote their set

    def drain(self, stop: threading.Event) -> list[RetryOutcome]:
        """Delivers due retries until none is due, the cap is reached or `stop` is set; as many at
        once as MAX_CONCURRENT_RETRIES (threads, not sessions: none is held while delivering)."""
        cap = self.rt.settings.max_concurrent_retries
        lanes = lanes_for(self.executor, cap)
        # A set marks as many as the cap leaves room for, not only the lanes asking: fewer sets, so
        # fewer turns of the cap's lock. Only here: a pass's lanes take the rest, or put it back.
        self.ahead, self.broken, self.unsettled, outcomes = (cap - 1 if lanes > 1 else 0), False, 0, []  # anew
        try:
            if lanes == 1:
                outcomes = self.deliver_in_turn(stop)
            else:
                with ThreadPoolExecutor(lanes, thread_name_prefix="delivery") as pool:
                    lanes_done = pool.map(lambda _: self.lane_of_a_pass(stop), range(lanes))
                    outcomes = [o for done in lanes_done for o in done]
        finally:
            self.ahead, self.due_left = 0, True  # what follows (run_now, a slot) marks and confirms one by one
            # Also when a lane raised (a database error): none marked ahead is left marked.
            outcomes += [self.release(marked) for marked in self.take_ready(all_of_them=True)]
        with self.lock:
            outcomes += self.confirmed
            self.confirmed = []
        if self.misconfigured and not any(o.status == "handed_off" for o in outcomes):
            raise ExecutorMisconfigured(self.misconfigured)  # a pass (`process`) ends on it: exit 2
        return outcomes

    def work_slot(self, slot: int, stop: threading.Event) -> list[RetryOutcome]:
        """A slot's lane (the daemon runs one per slot): a delivery holds no slot (nor session),
        the row's mark counts it."""
        outcomes = self.deliver_in_turn(stop)
        self.say_misconfigured()
        return outcomes

    def lane_of_a_pass(self, stop: threading.Event) -> list[RetryOutcome]:
        try:
            return self.deliver_in_turn(stop)
        except BaseException:  # the others wait for no settle of its: the pass ends once they are done
            self.count_settled(broke=True)
            raise

    def deliver_in_turn(self, stop: threading.Event) -> list[RetryOutcome]:
        """One lane: delivers due retries one after another."""
        outcomes: list[RetryOutcome] = []
        asking = True  # for new marks; once the fleet is busy, only those marked already
        while not stop.is_set():
            marked = (asking and self.mark_before_running_dry()) or next(self.take_ready(), None)
            marked = marked or (self.mark() if asking else None)
            if marked is NO_ROOM and self.ahead and self.room_may_come(stop):
                continue
            if marked is None or marked is NO_ROOM:
                # A set served meanwhile may have marked ahead (for this lane too): taken first.
                marked = next(self.take_ready(), None)
                if marked is None:
                    break
            if marked.lease_until - self.rt.clock.now() < self.executor.bound:  # type: ignore[union-attr]
                # Its lease might end before its delivery could (another process could deliver it
                # too): back to pending, due as it was.
                outcomes.append(self.release(marked, LEASE_TOO_SHORT))  # type: ignore[arg-type]
                continue
            outcome = self.deliver(marked, stop)  # type: ignore[arg-type]
            if outcome is None:  # handed over: confirmed in a set
                continue
            outcomes.append(outcome)
            if outcome.status in ("released", "postponed"):  # a refused configuration is released too
                # Stopping; or the fleet is busy: the next poll tries again. Those marked already
                # are still tried (each is put back as the fleet answers it), never left marked.
                asking = False
        return outcomes

    def mark_before_running_dry(self) -> Marked | None:
        """In a pass, once a quarter of what a set marks ahead is taken: one lane marks the next set
        while the others deliver those ready (a set under the lock takes longer than delivering half
        of one). None otherwise, or when it marked none: the lanes take those ready."""
        if not (self.ahead and self.due_left and self.ready) or len(self.ready) * 4 > self.ahead * 3:
            return None
        if not self.marking_ahead.acquire(blocking=False):
            return None  # another lane is marking it
        try:
            marked = self.mark()
        finally:
            self.marking_ahead.release()
        self.due_left = marked is not None
        return marked if isinstance(marked, Marked) else None

    def room_may_come(self, stop: threading.Event) -> bool:
        """The cap is reached while this pass has deliveries of its own unsettled (marked ahead):
        waits for one to settle (freeing a slot) and says to ask again; False once none is unsettled
        or a lane raised, so a pass still ends when the cap is taken by what is running."""
        with self.settled:
            if self.unsettled <= 0 or self.broken:
                return False
            seen = self.settles
            while self.settles == seen and not stop.is_set() and not self.broken:
                self.settled.wait(STOP_POLL_SECONDS)
            return True

    def count_settled(self, marked: int = 0, settled: int = 0, broke: bool = False) -> None:
        with self.settled:
            self.unsettled += marked - settled
            self.settles += settled
            self.broken |= broke  # a lane of this pass raised: what it had may never settle
            if settled or broke:
                self.settled.notify_all()

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
        """Step 1 for a lane: a retry marked for it (with `run_id`: pending retry `run_id`, due or
        not, alone). None: nothing to deliver; NO_ROOM: the cap is reached. Lanes asking at once are
        marked for in one transaction (`mark_batch`), waiting holding no session."""
        if run_id is not None:
            return self.mark_batch([run_id])[0]
        return self.batches.ask(None)

    def take_ready(self, *, all_of_them: bool = False):
        """The retries marked ahead, first marked first: the next one (or, ending a pass, all)."""
        while True:
            try:
                yield self.ready.popleft()
            except IndexError:
                return
            if not all_of_them:
                return

    def release(self, marked: Marked, why: str | None = None) -> RetryOutcome:
        """A marked retry no lane delivered: pending, due as it was; `why` in its log line (None: a signal)."""
        outcome = self.settle(marked, Released(detail=why))
        self.count_settled(settled=1)
        self.rt.events.publish(RetryEnded(outcome))
        return outcome

    def mark_batch(self, asking: Sequence[RunId | None], ahead: int = 0) -> list[Marked | object | None]:
        """Marks, under the cap's lock, one retry for each of `asking` (all None: `mark_set`; or one
        run id: `mark_run`); lanes left without one get None (none due) or NO_ROOM (the cap is reached).
        With `ahead`, up to that many more, as the room allows, for the next lanes (`ready`): their
        leases start now (a lane takes one only while it covers a delivery: `deliver_in_turn`)."""
        wanted, run_id = len(asking), asking[0]
        with database_errors(self.rt.engine, "marking a retry as being delivered"):
            lapsed, due, verdict, params, now = (
                self.mark_set(wanted, ahead) if run_id is None else self.mark_run(run_id)
            )
        marked = [self.marked(row, params, now, again=True) for row in lapsed]
        marked += [self.marked(row, params, now) for row in sorted(due, key=self.start_order)]
        self.count_settled(marked=len(marked))
        self.ready.extend(marked[wanted:])
        return marked[:wanted] + [verdict] * (wanted - len(marked))

    def params(self, now: datetime, run_id: RunId | None = None) -> dict:  # a mark's, for one set
        by, lease = f"{self.process} delivery {uuid.uuid4().hex[:12]}", now + self.lease
        return {"sr_now": now, "sr_run_id": run_id, "sr_mode": self.executor.mode, "sr_by": by, "sr_lease_until": lease}

    def mark_set(self, wanted: int, ahead: int) -> tuple[list, list, object | None, dict, datetime]:
        """Retries whose lease ran out first (they count already; an executor that never sends twice
        leaves them to the stuck checker, SPEC §12), then the due ones the room allows, in start
        order. Each is the cap's lock then the statement (PRECEDED_BY), in autocommit: one round trip."""
        q, locked = self.rt.queries, {PRECEDED_BY: self.rt.queries.handoff_lock_ahead}
        cap = {"sr_max": self.rt.settings.max_concurrent_retries}
        with self.rt.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            # Read before the lock is waited for: that wait shortens the lease, and a lane delivers
            # a retry only while its lease still covers a whole delivery (`deliver_in_turn`).
            now = self.rt.clock.now()
            params, lapsed = {**self.params(now), "sr_limit": wanted}, []
            if self.executor.sends_again:
                lapsed = conn.execute(q.mark_expired, params, execution_options=locked).mappings().all()
            short, due, verdict = wanted - len(lapsed), [], None
            if short > 0:
                marking = {**params, **cap, "sr_limit": short + ahead}
                rows = conn.execute(q.mark_in_room, marking, execution_options=locked).mappings().all()
                # The room as the marking statement counted it; none marked: one row saying only that.
                room, due = rows[0]["_sr_room"], [row for row in rows if row["_sr_locked"] is not None]
                verdict = NO_ROOM if room <= 0 or len(due) >= min(short + ahead, room) else None
        return lapsed, due, verdict, params, now

    def mark_run(self, run_id: RunId) -> tuple[list, list, object | None, dict, datetime]:
        """Pending retry `run_id`, due or not, in a transaction under the cap's lock."""
        q = self.rt.queries
        with self.rt.engine.begin() as conn:
            conn.execute(q.handoff_lock)
            now = self.rt.clock.now()  # once the lock is held: its wait does not shorten the lease
            params = {**self.params(now, run_id), "sr_limit": 1}
            room = conn.execute(q.room, {"sr_max": self.rt.settings.max_concurrent_retries}).scalar_one()
            due = conn.execute(q.mark_one, params).mappings().all() if room > 0 else []
        return [], due, (NO_ROOM if room <= 0 or due else None), params, now

    def start_order(self, row) -> tuple:
        """SPEC §16's order within a set marked at once, as `mark_due` chose them: the highest
        priority first (none last: NULL, NaN, ±Infinity), then the longest overdue."""
        priority = known_priority(row[self.rt.runs.priority]) if self.rt.runs.priority else None
        return (priority is None, -(priority or 0), row["_sr_was_due"])

    def marked(self, row, params: dict, now: datetime, *, again: bool = False) -> Marked:
        marked = Marked.from_row(row, self.rt.runs.input_names, params["sr_by"], params["sr_lease_until"], now, again)
        if again:
            logger.bind(run_id=str(marked.run.id), event="redelivering").warning(
                "{}: its delivery's lease ran out (the delivering process died): delivered again", marked.run.label
            )
        return marked

    def deliver(self, marked: Marked, stop: threading.Event) -> RetryOutcome | None:
        """Steps 2 and 3: the delivery (no session held), then its answer written; in a pass, one the
        fleet took is confirmed in the next set of confirms (`write_confirms`), unwaited: None."""
        started, delivered = time.monotonic(), None
        try:
            if (marked.again or marked.postponements) and isinstance(self.executor, KnowsItsJobs):
                # Its delivering process died after the mark, or an earlier delivery went unanswered:
                # the engine may have the job already, and takes a repeated id as a second job (SPEC §16).
                delivered = self.executor.has_job(marked.run, stop)  # within a `bound`
                if delivered is None and marked.lease_until - self.rt.clock.now() < self.executor.bound:
                    delivered = Released(detail=ASKED_TOO_LONG)  # another process may deliver it now
            if delivered is None:
                delivered = self.executor.deliver(marked.run, stop)
        except Exception as exc:  # noqa: BLE001 - an executor's bug: its retry is put back, not left marked
            delivered = Released(detail=f"its delivery raised {type(exc).__name__}: {clean(str(exc))[:200]}")
        if isinstance(delivered, HandedOver) and self.ahead:  # a pass's: confirmed in sets, unwaited
            with self.lock:
                self.misconfigured = self.said = None
            self.later.add((marked, delivered, started))
            return None
        try:
            outcome = replace(self.settle(marked, delivered), seconds=time.monotonic() - started)
        finally:
            self.count_settled(settled=1)
        if isinstance(delivered, Misconfigured):  # nothing became of the retry: no end to publish
            self.said_misconfigured(delivered.error)
            return outcome
        if isinstance(delivered, HandedOver):
            with self.lock:  # fixed: a configuration error coming back is said again
                self.misconfigured = self.said = None
        self.rt.events.publish(RetryEnded(outcome))
        return outcome

    def said_misconfigured(self, error: str) -> None:
        """The configuration the fleet refused: `drain` ends on it (exit 2), a slot says it once."""
        with self.lock:
            self.misconfigured = error

    def say_misconfigured(self) -> None:
        with self.lock:
            error, said = self.misconfigured, self.said
            self.said = error
        if error and error != said:
            logger.bind(event="misconfigured").error(
                "{}: due retries stay pending, untouched, until the configuration is fixed", error
            )

    def settle(self, marked: Marked, delivered: DeliveryOutcome) -> RetryOutcome:
        """Step 3: confirms the delivery, puts the retry back or fails the refused attempt, each
        conditional on the mark still being this delivery's (jobs/outcomes.py)."""
        if isinstance(delivered, HandedOver):  # the common case: confirmed in sets (`end_marks`)
            return self.confirm(marked, delivered)
        return record_outcome(self.rt, self.policy, marked.run, delivered, delivery=marked)

    def confirm(self, marked: Marked, delivered: HandedOver) -> RetryOutcome:
        """The fleet took the retry: its mark ends, with those of the lanes confirming at once."""
        return confirmed(marked, delivered, self.confirms.ask(marked))

    def write_confirms(self, handed: Sequence[tuple[Marked, HandedOver, float]]) -> None:
        """A pass's deliveries the fleet took: marks ended in one statement, each published, for `drain`."""
        ended = self.end_marks([marked for marked, _, _ in handed])
        now = time.monotonic()
        outcomes = [
            replace(confirmed(marked, delivered, status), seconds=now - started)
            for (marked, delivered, started), status in zip(handed, ended)
        ]
        self.count_settled(settled=len(outcomes))
        for outcome in outcomes:
            self.rt.events.publish(RetryEnded(outcome))
        with self.lock:
            self.confirmed += outcomes

    def end_marks(self, marks: Sequence[Marked]) -> list[str | None]:
        """Ends the marks of `marks` still their deliveries', in one statement; each one's status
        then, or None where the lease ran out and another process took the retry over."""
        ids = [m.run.id for m in marks]
        which = f"run {ids[0]}" if len(ids) == 1 else f"{len(ids)} runs ({ids[0]}, ...)"
        params = {"sr_ids": ids, "sr_bys": [m.by for m in marks]}
        with database_errors(self.rt.engine, f"writing the delivery of {which}"):
            for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
                try:
                    # One statement, its own transaction: one round trip (no BEGIN, no COMMIT).
                    with self.rt.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                        rows = conn.execute(self.rt.queries.end_deliveries, {**params, "sr_now": self.rt.clock.now()})
                        ended = {(run_id, by): status for run_id, by, status in rows}
                    break
                except OperationalError as exc:
                    # A set locks its rows one after another: a fleet writing several of them in one
                    # statement may lock them in another order. PostgreSQL then ends one of the two;
                    # if ours, nothing was written and the same conditional writes are tried again.
                    if getattr(exc.orig, "pgcode", None) != DEADLOCK or attempt == DEADLOCK_ATTEMPTS:
                        raise
        return [ended.get((m.run.id, m.by)) for m in marks]
