"""An operator making a chain's pending retry due now (`retry RUN_ID --now`, `POST
/api/runs/{id}/due-now`, the chain page's button), instead of waiting for its backoff.

The retry stays `pending_retry`: the next process with a free slot starts it (a daemon's
dispatcher polls for due retries), as it would any due retry; its budget is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from loguru import logger

from db.engine import database_errors
from db.errors import DueNowRefused
from jobs.manual import chain_history
from jobs.model import RunId
from jobs.rules import format_time
from jobs.runtime import Runtime


@dataclass(frozen=True)
class DueNow:
    retry_id: RunId
    label: str  # the run's label, without the [RETRY n/N] prefix
    attempt: int
    budget: int
    due: datetime  # now, or when it was already due
    changed: bool  # False when it was already due: nothing was written

    @property
    def message(self) -> str:
        if self.changed:
            return f"Retry {self.attempt}/{self.budget} of {self.label} is due now"
        return f"Retry {self.attempt}/{self.budget} of {self.label} was already due (since {format_time(self.due)})"


def make_due_now(rt: Runtime, run_id: RunId) -> DueNow:
    """Makes the pending retry of `run_id`'s chain (`run_id` itself, or the retry of the failed
    attempt given) due now, with one conditional UPDATE; `DueNowRefused` when nothing of the chain
    is pending (it ran, completed, was cancelled...) or the chain completed (its pending retry is
    superseded, never run), `RunNotFound` for an unknown id."""
    chain = chain_history(rt, run_id)
    latest = chain.attempts[-1]
    given = next(a for a in chain.attempts if a.id == run_id)
    pending = given if given.status == "pending_retry" else latest
    if pending.status != "pending_retry":
        subject = f"run {run_id}" if pending.id == run_id else f"the chain's latest attempt {pending.id}"
        raise DueNowRefused(
            f"run {run_id} has no pending retry to make due now: {subject} is {pending.status}",
            details={"runId": str(pending.id), "currentStatus": pending.status, "requestedRunId": str(run_id)},
        )
    completed = next((a for a in chain.attempts if a.status == "completed"), None)
    if completed is not None:  # the processor supersedes it; run, it would repeat work already done
        raise DueNowRefused(
            f"retry {pending.id} is not made due: its chain completed with run {completed.id}, so it will be superseded",
            details={"runId": str(pending.id), "currentStatus": pending.status, "completedRunId": str(completed.id)},
        )
    now = rt.clock.now()
    with database_errors(rt.engine, "making a retry due now"), rt.engine.begin() as conn:
        row = conn.execute(rt.queries.make_due_now(), {"sr_run_id": pending.id, "sr_now": now}).first()
    what = pending.what or "(no label)"
    if row is None:  # already due, or no longer pending: read which
        again = next(a for a in chain_history(rt, pending.id).attempts if a.id == pending.id)
        if again.status != "pending_retry":
            raise DueNowRefused(
                f"retry {pending.id} stopped being pending meanwhile ({again.status}); see `stuck-runs history {run_id}`",
                details={"runId": str(pending.id), "currentStatus": again.status, "requestedRunId": str(run_id)},
            )
        return DueNow(pending.id, what, pending.retry_count, pending.max_retries, again.next_retry_at or now, False)
    logger.bind(run_id=str(pending.id), chain=str(pending.chain_id), attempt=pending.retry_count, event="due_now").info(
        "{}: made due now by an operator (was due {})", pending.label, format_time(pending.next_retry_at or now)
    )
    return DueNow(pending.id, what, pending.retry_count, pending.max_retries, row.next_retry_at, True)
