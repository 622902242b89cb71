"""What became of one retry attempt, written into its row: completed, failed (with the next retry
or the end of its chain), put back by a signal, handed to the fleet or put back for later, or
whatever the scraper wrote itself, which stands.

One `match` over the executors' closed set of outcomes (jobs/executors/outcome.py) in
`record_outcome`, shared by the retries run here (jobs/running.py) and the deliveries to the
fleet (jobs/delivery.py); and the fleet's own failures, whose chains go on like any execution's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from loguru import logger

from db.engine import database_errors
from db.messages import CANCELLED_BY_OPERATOR, TIMEOUT_PATTERN
from jobs.executors.base import KnowsItsJobs
from jobs.executors.outcome import (
    Cancelled,
    Completed,
    Failed,
    HandedOver,
    Misconfigured,
    Outcome,
    OutcomeUnknown,
    Postponed,
    Released,
    TimedOut,
)
from jobs.limits import applied_to_run, execution_timeout
from jobs.model import Run, RunId
from jobs.patterns import parse_retry_after
from jobs.rules import FailureOutcome, RetryPolicy, chain_budget, decide_failure, format_time, timeout_error
from jobs.runtime import Runtime

# Postponements without a Retry-After back off on their own scale: 1 min, doubling.
FIRST_POSTPONEMENT = timedelta(minutes=1)
MAX_POSTPONEMENT_DOUBLINGS = 20


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
    # A delivery to the fleet (SPEC §12), not an execution here: handed over, postponed, put back
    # by a signal, or refused by the webhook (`failed`: a failed attempt, but nothing ran here).
    delivered: bool = False
    # A failure the fleet wrote on a retry it was handed, whose chain stuck-runs continued: neither
    # an execution here nor a delivery.
    failed_at_fleet: bool = False


@dataclass(frozen=True)
class Marked:
    """A retry committed `running` and marked as being delivered by this delivery (`by`)."""

    run: Run
    by: str
    was_due: datetime  # a signal puts it back due as it was
    postponements: int
    lease_until: datetime  # nobody delivers it again before: an abandoned POST may live until then
    started_at: object  # as the mark wrote it, raw: the put-back leaves a start the fleet wrote
    again: bool = False  # marked anew after its delivering process died (its lease ran out)

    @classmethod
    def from_row(cls, row, inputs, by: str, lease_until: datetime, now: datetime, again: bool = False) -> Marked:
        """A retry as its mark returned it (a row through `RunsTable.keyed()`, with `_sr_was_due`)."""
        was_due, postponements = row["_sr_was_due"] or now, row["postponements"] or 0
        return cls(Run.from_row(row, inputs), by, was_due, postponements, lease_until, row["started_at"], again)


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
            decided.append((run, _decide(rt, policy, run, error, now, retry_after=parse_retry_after(error))))
        params = {"sr_now": now, **fail_params([(run.id, outcome, None) for run, outcome in decided])}
        failed = {row[0]: row for row in conn.execute(q.fail_reported, params)}
    return _failed_at_fleet(decided, failed)


def follow_the_fleet(rt: Runtime, policy: RetryPolicy | None = None) -> list[RetryOutcome]:
    """What a pass does for the retries handed to the fleet: the failures it wrote continue their
    chains, and the jobs its engine reports ended without a status written are failed attempts."""
    return continue_fleet_failures(rt, policy) + fail_ended_jobs(rt, policy)


def fail_ended_jobs(rt: Runtime, policy: RetryPolicy | None = None) -> list[RetryOutcome]:
    """Retries handed to an engine that knows its jobs (Scrapyd, SPEC §16), still `running`, whose
    job the engine reports finished or no longer knows: a failed attempt each, chains continued.
    Set-based: the rows read at once, the engine asked once (no session held meanwhile), the
    failures written in one statement, each conditional on the row still `running`. Rows read
    before the engine is asked: a retry handed over after the question is never judged by it."""
    executor = rt.executor
    if not isinstance(executor, KnowsItsJobs):
        return []
    policy = policy or rt.settings.policy
    q = rt.queries
    params = {"sr_mode": executor.mode, "sr_limit": rt.settings.batch_size}
    with database_errors(rt.engine, "reading the retries handed over"), rt.engine.connect() as conn:
        runs = [Run.from_row(row, rt.runs.input_names) for row in conn.execute(q.handed_running, params).mappings()]
    ended = executor.ended_jobs(runs) if runs else None
    if not ended:
        return []
    now = rt.clock.now()
    decided = [(run, _decide(rt, policy, run, ended[run.id], now)) for run in runs if run.id in ended]
    with database_errors(rt.engine, "failing the jobs that ended"), rt.engine.begin() as conn:
        params = {"sr_now": now, **fail_params([(run.id, outcome, None) for run, outcome in decided])}
        failed = {row[0]: row for row in conn.execute(q.fail_running, params)}
    # The fleet's failure, as those it writes itself: neither an execution here nor a delivery.
    return _failed_at_fleet(decided, failed)


def _failed_at_fleet(decided: list[tuple[Run, FailureOutcome]], failed: dict) -> list[RetryOutcome]:
    """The attempts the fleet failed (`decided`) whose failure was written (`failed`, by run id)."""
    return [
        replace(
            _failed(
                logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count), run, outcome, row
            ),
            failed_at_fleet=True,
        )
        for run, outcome in decided
        if (row := failed.get(run.id)) is not None
    ]


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


def record_outcome(
    rt: Runtime, policy: RetryPolicy, run: Run, outcome: Outcome, *, delivery: Marked | None = None
) -> RetryOutcome:
    """Writes what an attempt did, never over a status someone else wrote.

    A retry run here: `Completed` → `completed`; `Failed` or `TimedOut` → `failed` with the next
    retry or the end of the chain; `Released` (a shutdown) → back to `pending_retry`, due now, no
    budget spent. If the row is no longer `running` the scraper wrote its own status:
    `completed` and others stand, and a `failed` it wrote continues the chain like any failure.

    A retry delivered to the fleet (`delivery`: its mark, jobs/delivery.py) — each write
    conditional on the mark still being this delivery's (else its lease ran out and another
    process took the retry over: nothing is written): `HandedOver` confirms the delivery;
    `Failed` (refused) ends the mark and fails the attempt as above; `Postponed` puts it back
    due later, `Released` due as it was, both with no budget spent, `OutcomeUnknown` likewise
    but never due before its lease ends (the POST may still reach the receiver). A put-back
    leaves standing whatever the fleet wrote meanwhile.
    """
    q, now = rt.queries, rt.clock.now()
    log = logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count)
    delivered = delivery is not None
    # What a failure the scraper wrote itself is decided with (below), as the outcome said it.
    error = pattern = retry_after = detail = None
    # A database error names what was written: a delivery's confirm or put-back, or an attempt's
    # outcome (a refused delivery is a failed attempt like any other).
    doing = "writing the delivery" if delivered and not isinstance(outcome, Failed) else "recording the outcome"
    with database_errors(rt.engine, f"{doing} of run {run.id}"), rt.engine.begin() as conn:
        if delivery is None:  # a cancel asked for as it ended is over with it, whatever stands
            conn.execute(q.forget_cancel, {"sr_run_key": str(run.id)})
        match outcome:
            case Completed(detail=detail) if delivery is None:
                if conn.execute(q.complete, {"sr_now": now, "sr_run_id": run.id}).first():
                    log.bind(event="completed").success("{}: completed", run.label)
                    return RetryOutcome(run.id, run.label, "completed")
            case Failed(error=error, pattern=pattern, retry_after=retry_after, detail=detail):
                if delivery is not None and not _end_mark(conn, q, delivery, now):
                    return taken_over(log, run)  # a refusal, but the retry is another delivery's now
                failure = _decide(rt, policy, run, error or "Run failed", now, pattern, detail, retry_after)
                if row := conn.execute(q.fail_running, _fail_one(now, run, failure, detail)).first():
                    return _failed(log, run, failure, row, delivered)
            case TimedOut(detail=detail, error=error) if delivery is None:
                pattern = TIMEOUT_PATTERN
                said = error or timeout_error(execution_timeout(rt.settings, applied_to_run(rt, run)))
                failure = _decide(rt, policy, run, said, now, pattern, detail)
                if row := conn.execute(q.fail_running, _fail_one(now, run, failure, detail)).first():
                    return _failed(log, run, failure, row)
            case Released(detail=detail) if delivery is None:
                if conn.execute(q.release, {"sr_now": now, "sr_ids": [run.id]}).first():
                    log.bind(event="released").info(
                        "{}: put back to pending_retry (stopped by a signal, no budget spent)", run.label
                    )
                    return RetryOutcome(run.id, run.label, "released")
            case Cancelled(by=by) if delivery is None:
                params = {"sr_now": now, "sr_ids": [run.id], "sr_message": CANCELLED_BY_OPERATOR}
                if conn.execute(q.cancel_running, params).first():
                    log.bind(event="cancelled").warning(
                        "{}: cancelled by operator ({}): its processes stopped, no budget spent, no retry",
                        run.label,
                        by,
                    )
                    return RetryOutcome(run.id, run.label, "cancelled", message=CANCELLED_BY_OPERATOR)
            case HandedOver(how) if delivery is not None:
                if not _end_mark(conn, q, delivery, now):
                    return taken_over(log, run)
                return handed_to_fleet(log, run, how)
            case Released(detail=why) if delivery is not None:  # stopping (or not sending) before anything was sent
                return _put_back(conn, rt, log, run, delivery, now, delivery.was_due, released=why)
            case Misconfigured(error=error) if delivery is not None:  # untouched: due as it was
                return _put_back(conn, rt, log, run, delivery, now, delivery.was_due, refused=error)
            case OutcomeUnknown(stopping=True) if delivery is not None:
                return _put_back(conn, rt, log, run, delivery, now, max(delivery.was_due, delivery.lease_until))
            case Postponed(error=error, retry_after=retry_after) if delivery is not None:
                due = now + postponement(retry_after, policy, delivery.postponements)
                return _put_back(conn, rt, log, run, delivery, now, due, postponed=error)
            case OutcomeUnknown(error=error) if delivery is not None:
                due = now + postponement(None, policy, delivery.postponements)
                return _put_back(conn, rt, log, run, delivery, now, max(due, delivery.lease_until), postponed=error)
            case _:
                raise TypeError(f"{outcome!r} cannot end a {'delivery' if delivered else 'retry run here'}")
        current = conn.execute(q.get, {"sr_run_id": run.id}).mappings().one()
        if current["status"] == "failed" and current["next_retry_at"] is None:
            failure = _decide(
                rt, policy, run, current["error_message"] or error or "Run failed", now, pattern, detail, retry_after
            )
            if row := conn.execute(q.fail_reported, _fail_one(now, run, failure, detail)).first():
                return _failed(log, run, failure, row, delivered)
    log.bind(event="kept").info("{}: the scraper wrote {}; it stands", run.label, current["status"])
    return RetryOutcome(run.id, run.label, current["status"], message=current["error_message"], delivered=delivered)


def _fail_one(now: datetime, run: Run, failure: FailureOutcome, detail: str | None) -> dict[str, object]:
    return {"sr_now": now, **fail_params([(run.id, failure, detail)])}


def handed_to_fleet(log, run: Run, how: str) -> RetryOutcome:
    """A delivery confirmed (its mark ended): said and counted alike whether it was confirmed
    alone (`record_outcome`) or in a set (jobs/delivery.py)."""
    log.bind(event="handed_off").info("{}: handed to the fleet ({})", run.label, how)
    return RetryOutcome(run.id, run.label, "handed_off", delivered=True)


def confirmed(marked: Marked, delivered: HandedOver, status: str | None) -> RetryOutcome:
    """A delivery the fleet took, its mark ended (`status`: the row's then), or None: its lease ran
    out first and another process has the retry (jobs/delivery.py confirms in sets)."""
    run = marked.run
    log = logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count)
    return taken_over(log, run) if status is None else handed_to_fleet(log, run, delivered.how)


def _end_mark(conn, q, delivery: Marked, now: datetime) -> str | None:
    """Ends the mark of `delivery` if it is still this delivery's; the row's status, else None."""
    ended = conn.execute(q.end_delivery, {"sr_run_id": delivery.run.id, "sr_by": delivery.by, "sr_now": now}).first()
    return None if ended is None else ended[0]


def _put_back(
    conn,
    rt: Runtime,
    log,
    run: Run,
    delivery: Marked,
    now: datetime,
    due: datetime,
    *,
    postponed: str | None = None,
    refused: str | None = None,
    released: str | None = None,
) -> RetryOutcome:
    """A delivery the fleet did not take back to `pending_retry`, due `due`, no budget spent; a
    postponement (`postponed`: why) counts towards the next one's backoff, a release does not (but
    one of a retry marked anew after its process died does: it may be at the fleet),
    nor a configuration the fleet refused (`refused`: said once, by jobs/delivery.py); a release says
    `released` as its reason, else that a signal stopped it."""
    params = {
        "sr_run_id": run.id,
        "sr_by": delivery.by,
        "sr_now": now,
        "sr_marked_started": delivery.started_at,
        "sr_due": due,
        # A retry marked anew after its delivering process died may be at the fleet already: put back
        # unsent, it counts a postponement all the same, so its next delivery asks the fleet first.
        "sr_postponed": 0 if postponed is None and not delivery.again else 1,
    }
    if conn.execute(rt.queries.put_back, params).first() is None:  # the fleet wrote a status after all
        ended = _end_mark(conn, rt.queries, delivery, now)
        if ended is None:
            return taken_over(log, run)
        log.bind(event="kept").info("{}: the fleet wrote {}; it stands", run.label, ended)
        return RetryOutcome(run.id, run.label, ended, delivered=True)
    if refused is not None:
        return RetryOutcome(run.id, run.label, "released", message=refused, delivered=True)
    if postponed is None:
        log.bind(event="released").info(
            "{}: left pending_retry ({}, no budget spent)", run.label, released or "stopped by a signal"
        )
        return RetryOutcome(run.id, run.label, "released", delivered=True)
    log.bind(event="postponed").warning(
        "{}: {}; delivered again at {} (no budget spent)", run.label, postponed, format_time(due)
    )
    return RetryOutcome(run.id, run.label, "postponed", message=postponed, retry_due=due, delivered=True)


def postponement(retry_after: timedelta | None, policy: RetryPolicy, postponed_before: int) -> timedelta:
    """How long a retry the fleet could not take waits: its Retry-After, taken as said (the fleet
    knows when it has room); else 1 min doubling with each postponement of that retry, capped by
    the retry delay but never under a minute (a one-minute outage costs minutes, not hours)."""
    if retry_after is not None:
        return retry_after
    doubled = FIRST_POSTPONEMENT * 2 ** min(postponed_before, MAX_POSTPONEMENT_DOUBLINGS)
    return max(FIRST_POSTPONEMENT, min(doubled, policy.retry_delay))


def taken_over(log, run: Run) -> RetryOutcome:
    """A delivery whose lease ran out before its answer was written: another process has the
    retry now (and delivers it with the same Idempotency-Key); this one writes nothing."""
    message = "its delivery outlasted its lease: another process delivers it again"
    log.bind(event="taken_over").warning("{}: {}", run.label, message)
    return RetryOutcome(run.id, run.label, "taken_over", message=message, delivered=True)


def _decide(
    rt: Runtime,
    policy: RetryPolicy,
    run: Run,
    error: str,
    now: datetime,
    pattern: str | None = None,
    detail: str | None = None,
    retry_after: timedelta | None = None,
) -> FailureOutcome:
    """The failure's pattern (as the outcome said, else classified from its error, then its
    detail) and what follows it."""
    pattern = pattern or rt.classifier.classify(error)
    if pattern == "unknown" and detail:
        pattern = rt.classifier.classify(detail)
    return decide_failure(
        error=error,
        pattern=pattern,
        retry_count=run.retry_count,
        budget=chain_budget(run.is_retry, run.max_retries, policy),
        now=now,
        policy=policy,
        rng=rt.rng,
        retry_after=retry_after,
    )


def _failed(log, run: Run, outcome: FailureOutcome, row, delivered: bool = False) -> RetryOutcome:
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
    refused = "refused by the webhook: " if delivered else ""
    log.bind(event="failed", pattern=result.pattern).warning("{}: {}{}", run.label, refused, result.message)
    return replace(result, delivered=delivered)
