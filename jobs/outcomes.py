"""What became of one retry attempt, written into its row: completed, failed (with the next retry
or the end of its chain), put back by a signal, or whatever the scraper wrote itself, which stands.

Shared by the retries executed here (jobs/retries.py), deliveries to the fleet (jobs/delivery.py)
and the fleet's own failures, whose chains go on like any execution's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from loguru import logger

from db.engine import database_errors
from jobs.executor import ExecutionResult
from jobs.model import Run, RunId
from jobs.patterns import parse_retry_after
from jobs.rules import FailureOutcome, RetryPolicy, chain_budget, decide_failure, timeout_error
from jobs.runtime import Runtime


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
        replace(
            _failed(logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count), run, outcome, row),
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
    rt: Runtime, policy: RetryPolicy, run: Run, result: ExecutionResult, *, delivery: str | None = None
) -> RetryOutcome:
    """Writes what an execution did, never over a status someone else wrote.

    With `delivery` (the mark of a delivery the webhook refused, jobs/delivery.py) the mark is
    ended in the same transaction, and nothing is written when it is no longer this delivery's
    (its lease ran out and another process took the retry over).

    Success → `completed`. Failure → `failed` with the next retry or the end of the chain.
    Cancelled by a shutdown → back to `pending_retry`, due now, no budget spent. If the row is
    no longer `running` the scraper wrote its own status: `completed` and others stand, and a
    `failed` it wrote continues the chain like any failure.
    """
    q = rt.queries
    now = rt.clock.now()
    log = logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count)
    delivered = delivery is not None
    with database_errors(rt.engine, f"recording the outcome of run {run.id}"), rt.engine.begin() as conn:
        if delivered and not conn.execute(q.end_delivery, {"sr_run_id": run.id, "sr_by": delivery, "sr_now": now}).first():
            return taken_over(log, run)
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
                return _failed(log, run, outcome, row, delivered)
        current = conn.execute(q.get, {"sr_run_id": run.id}).mappings().one()
        if current["status"] == "failed" and current["next_retry_at"] is None:
            error = current["error_message"] or result.error or "Run failed"
            outcome = _decide(rt, policy, run, error, result, now)
            params = {"sr_now": now, **fail_params([(run.id, outcome, result.detail)])}
            row = conn.execute(q.fail_reported, params).first()
            if row:
                return _failed(log, run, outcome, row, delivered)
    log.bind(event="kept").info("{}: the scraper wrote {}; it stands", run.label, current["status"])
    return RetryOutcome(run.id, run.label, current["status"], message=current["error_message"], delivered=delivered)


def taken_over(log, run: Run) -> RetryOutcome:
    """A delivery whose lease ran out before its answer was written: another process has the
    retry now (and delivers it with the same Idempotency-Key); this one writes nothing."""
    message = "its delivery outlasted its lease: another process delivers it again"
    log.bind(event="taken_over").warning("{}: {}", run.label, message)
    return RetryOutcome(run.id, run.label, "taken_over", message=message, delivered=True)


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
