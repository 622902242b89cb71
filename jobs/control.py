"""Operators stopping work: cancel a chain's pending retry, pause and resume every retry.

A pause stops every process from starting retries (the claim statements read it), until it is
resumed or its time is up; sweeps go on and retries stay scheduled, so nothing is lost by one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from loguru import logger
from sqlalchemy.engine import Connection

from db.engine import database_errors
from db.errors import CancelRefused
from db.messages import CANCELLED_BY_OPERATOR
from db.queries.retries import matching_count
from jobs.cancelling import request_running_cancel
from jobs.delivery import being_delivered
from jobs.events import PauseBegan, PauseEnded
from jobs.manual import RetryCriteria, beyond_limit, chain_history, criteria_params
from jobs.model import Run, RunId
from jobs.rules import format_time
from jobs.runtime import Runtime


@dataclass(frozen=True)
class CancelledRetry:
    retry_id: RunId
    label: str
    attempt: int
    budget: int
    cancelled: bool  # False in a dry run, or when it stopped being pending meanwhile
    # A running retry's (SPEC §16): `requested` (its executing process or engine stops it within
    # DISPATCH_POLL), `cancelled` at once, `row_only` (a hand-off the fleet is not told of); None: pending.
    running: str | None = None
    note: str | None = None  # what happened to a running one, said in full

    @property
    def message(self) -> str:
        if self.note:
            return self.note
        done = "cancelled" if self.cancelled else "would be cancelled"
        return f"Retry {self.attempt}/{self.budget} {done}"


@dataclass(frozen=True)
class SkippedCancel:
    retry_id: RunId
    label: str
    reason: str


@dataclass(frozen=True)
class BulkCancelResult:
    cancelled: tuple[CancelledRetry, ...]  # cancelled, or in a dry run those that would be
    dry_run: bool = False
    matched: int = 0  # pending retries the filters match, the limit aside
    limit: int | None = None  # how many of them this took (soonest due first)
    skipped: tuple[SkippedCancel, ...] = ()  # taken but not cancelled, each with its reason
    running: bool = False  # running retries were taken too (`--running`)

    @property
    def message(self) -> str:
        """What the CLI prints first and the API answers."""
        verb = "Would cancel" if self.dry_run else "Cancelled"
        which = "pending or running" if self.running else "pending"
        return (
            f"{verb} {len(self.cancelled)} of {self.matched} matching {which} retry(ies); {len(self.skipped)} skipped"
        )

    @property
    def beyond_limit(self) -> str | None:
        """How to act on every match, when the limit left some out."""
        return beyond_limit(self.matched, self.limit, self.dry_run)


@dataclass(frozen=True)
class PauseState:
    paused_at: datetime
    until: datetime | None  # None: until resumed
    paused_by: str

    @property
    def message(self) -> str:
        until = f"until {format_time(self.until)}" if self.until else "until resumed"
        return f"Retries paused {until} (by {self.paused_by}, at {format_time(self.paused_at)})"


def cancel_run(rt: Runtime, run_id: RunId, *, dry_run: bool = False, via: str = "cli") -> CancelledRetry:
    """Cancels the pending retry of `run_id`'s chain (`Cancelled by operator`), or its running
    retry (SPEC §16: jobs/cancelling.py); `CancelRefused` when nothing of the chain is pending or
    running as a retry stuck-runs started."""
    chain = chain_history(rt, run_id)
    pending = [a for a in chain.attempts if a.status == "pending_retry"]
    if not pending:
        latest = chain.attempts[-1]
        if latest.status in ("running", "queued"):
            return cancel_running(rt, latest, dry_run=dry_run, via=via)
        if delivery := being_delivered(latest, rt.clock.now()):
            raise CancelRefused(delivery[0], details={"runId": str(latest.id)}, retry_after=delivery[1])
        raise CancelRefused(
            f"run {run_id} has no pending retry to cancel: its chain's latest attempt {latest.id} is {latest.status}",
            details={"runId": str(latest.id), "currentStatus": latest.status, "requestedRunId": str(run_id)},
        )
    done = _cancel(rt, pending, dry_run)[0]  # one pending retry per chain (its next retry number)
    if not done.cancelled and not dry_run:
        raise CancelRefused(f"retry {done.retry_id} stopped being pending meanwhile; see `stuck-runs history {run_id}`")
    return done


def cancel_running(rt: Runtime, run: Run, *, dry_run: bool = False, via: str = "cli") -> CancelledRetry:
    """Cancels running retry `run` (SPEC §16), as `request_running_cancel` decides."""
    done = request_running_cancel(rt, run, via=via, dry_run=dry_run)
    note = done.message(run, rt.settings.dispatch_poll.total_seconds())
    return CancelledRetry(
        run.id, run.label, run.retry_count, run.max_retries, done.how != "would_request", done.how, note
    )


def cancel_matching(
    rt: Runtime, criteria: RetryCriteria, *, dry_run: bool = False, running: bool = False, via: str = "cli"
) -> BulkCancelResult:
    """Cancels every pending retry matching `criteria` (at most its limit): the inputs, and the
    error and end of the attempt each retries. With `running`, the running retries stuck-runs
    started that match too (SPEC §16), each as `cancel RUN_ID` would."""
    columns_like, params = criteria_params(rt, criteria)
    states = ("pending_retry", "running") if running else ("pending_retry",)
    found: dict[str, list[Run]] = {}
    matched = 0
    with database_errors(rt.engine, "finding retries to cancel"), rt.engine.connect() as conn, conn.begin():
        for state in states:
            statement = rt.queries.pending_candidates(
                error_like=criteria.error_like is not None,
                columns_like=columns_like,
                since=criteria.since is not None,
                state=state,
            )
            found[state] = [Run.from_row(r, rt.runs.input_names) for r in conn.execute(statement, params).mappings()]
            matched += conn.execute(matching_count(statement), params).scalar_one()
    results = _cancel(rt, found["pending_retry"], dry_run)
    skipped = [
        SkippedCancel(item.retry_id, item.label, "it stopped being pending meanwhile (started, or cancelled)")
        for item in results
        if not (item.cancelled or dry_run)
    ]
    results = [item for item in results if item.cancelled or dry_run]
    for run in found.get("running", []):
        try:
            results.append(cancel_running(rt, run, dry_run=dry_run, via=via))
        except CancelRefused as refused:
            skipped.append(SkippedCancel(run.id, run.label, str(refused)))
    return BulkCancelResult(tuple(results), dry_run, matched, criteria.limit, tuple(skipped), running)


def _cancel(rt: Runtime, pending: list[Run], dry_run: bool) -> list[CancelledRetry]:
    done: set = set()
    if pending and not dry_run:
        params = {
            "sr_ids": [run.id for run in pending],
            "sr_messages": [CANCELLED_BY_OPERATOR] * len(pending),
            "sr_now": rt.clock.now(),
        }
        with database_errors(rt.engine, "cancelling retries"), rt.engine.begin() as conn:
            done = set(conn.execute(rt.queries.cancel_pending, params).scalars())
    results = [CancelledRetry(r.id, r.label, r.retry_count, r.max_retries, r.id in done) for r in pending]
    for item in results:
        if item.cancelled:
            logger.bind(run_id=str(item.retry_id), event="cancelled").info("{}: cancelled by operator", item.label)
    return results


def _by(via: str) -> str:
    return f"{via} on {socket.gethostname()} pid {os.getpid()}"


def pause_retries(rt: Runtime, duration: timedelta | None = None, *, via: str = "cli") -> PauseState:
    now = rt.clock.now()
    records = rt.queries.pauses
    with database_errors(rt.engine, "pausing retries"), rt.engine.begin() as conn:
        row = conn.execute(records.pause(now, now + duration if duration else None, _by(via))).mappings().one()
    state = PauseState(row["paused_at"], row["until"], row["paused_by"])
    logger.bind(event="paused").warning("{}", state.message)
    rt.events.publish(PauseBegan(state))
    return state


def resume_retries(rt: Runtime) -> PauseState | None:
    """Ends the pause; returns it, or None when none was standing."""
    with database_errors(rt.engine, "resuming retries"), rt.engine.begin() as conn:
        row = conn.execute(rt.queries.pauses.resume(rt.clock.now())).mappings().first()
    if row is None or not row["standing"]:
        return None
    logger.bind(event="resumed").info("retries resumed")
    state = PauseState(row["paused_at"], row["until"], row["paused_by"])
    rt.events.publish(PauseEnded(state))
    return state


def read_pause(rt: Runtime, conn: Connection | None = None) -> PauseState | None:
    statement = rt.queries.pauses.current(rt.clock.now())
    if conn is not None:
        row = conn.execute(statement).mappings().first()
    else:
        with database_errors(rt.engine, "reading the pause"), rt.engine.connect() as own:
            row = own.execute(statement).mappings().first()
    return PauseState(row["paused_at"], row["until"], row["paused_by"]) if row else None
