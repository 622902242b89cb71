"""The stuck-run sweep: fail runs that stopped making progress and schedule their retries.

Per batch, in one transaction: select up to BATCH_SIZE stuck runs `FOR UPDATE SKIP LOCKED`, let
the rules decide each one's fate, and apply all of them with one statement that fails the
attempts (only if still `running`), inserts their retries and dead letters. A scraper that
completes a run during the sweep either wins the row lock first (the run is no longer stuck)
or waits for the batch to commit; a completion is never turned into a failure.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from loguru import logger

from db import locks
from db.engine import database_errors
from db.queries import fail_params
from jobs.model import as_utc
from jobs.rules import FailureOutcome, RetryPolicy, decide_stuck, run_label
from jobs.runtime import Runtime

PREVIEW_LIMIT = 100_000  # rows a dry run lists at most
SWEEP_LOCK_WAIT = timedelta(seconds=10)


@dataclass(frozen=True)
class FailedAttempt:
    """One attempt the tool failed, and what became of its chain."""

    run_id: uuid.UUID
    label: str
    message: str
    pattern: str
    chain_id: uuid.UUID
    attempt: int  # the failed attempt's retry number
    retry_id: uuid.UUID | None
    retry_due: datetime | None
    dead_lettered: bool = False

    @property
    def retried(self) -> bool:
        return self.retry_due is not None


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did (or, with `dry_run`, would do)."""

    attempts: tuple[FailedAttempt, ...] = ()
    batches: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    skipped: str | None = None  # why nothing was done (another sweep holds the lock)

    @property
    def failed(self) -> int:
        return len(self.attempts)

    @property
    def retries_scheduled(self) -> int:
        return sum(1 for a in self.attempts if a.retried)

    @property
    def permanently_failed(self) -> int:
        return self.failed - self.retries_scheduled


def sweep_stuck_runs(
    rt: Runtime,
    policy: RetryPolicy | None = None,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    use_lock: bool = True,
    lock_wait: timedelta = SWEEP_LOCK_WAIT,
) -> SweepResult:
    """Fails every run stuck longer than `policy.stuck_after`, batch by batch.

    Runs being executed by a live stuck-runs process are not stuck. With `stop` set the sweep
    finishes its current batch and returns. Another sweep holding the sweep lock for longer than
    `lock_wait` makes this one a no-op (`skipped`). `use_lock=False` skips the lock, which only
    saves work: correctness rests on the row locks and conditional updates.
    """
    policy = policy or rt.settings.policy
    started = time.monotonic()
    now = rt.clock.now()
    params = {"sr_cutoff": now - policy.stuck_after, "sr_now": now}
    if dry_run:
        return _preview(rt, policy, params, started)
    attempts: list[FailedAttempt] = []
    batches = 0
    sweep_ns = locks.namespace(rt.runs.qualified_name, locks.SWEEP)
    with database_errors(rt.engine, "sweeping stuck runs"), rt.engine.connect() as conn:
        if use_lock and not locks.lock_within(conn, sweep_ns, 0, int(lock_wait.total_seconds() * 1000)):
            holder = locks.holder(conn, sweep_ns, 0) or "another process"
            conn.rollback()
            return SweepResult(seconds=time.monotonic() - started, skipped=f"another sweep is running ({holder})")
        try:
            while not (stop and stop.is_set()):
                with conn.begin():
                    batch = _fail_batch(rt, conn, policy, params)
                batches += 1
                attempts.extend(batch.attempts)
                if batch.candidates < rt.settings.batch_size:
                    break
        finally:
            if use_lock:
                locks.unlock(conn, sweep_ns, 0)
                conn.commit()
    return SweepResult(tuple(attempts), batches, time.monotonic() - started)


@dataclass(frozen=True)
class _Batch:
    candidates: int
    attempts: tuple[FailedAttempt, ...]


def _fail_batch(rt: Runtime, conn, policy: RetryPolicy, params: dict) -> _Batch:
    q = rt.queries
    rows = conn.execute(q.stuck_batch, {**params, "sr_limit": rt.settings.batch_size}).mappings().all()
    if not rows:
        return _Batch(0, ())
    decisions = [(row["id"], _decide(rt, policy, row, params["sr_now"]), None) for row in rows]
    applied = conn.execute(q.fail_running, {**params, **fail_params(decisions)}).mappings().all()
    attempts = tuple(
        FailedAttempt(
            run_id=row["id"],
            label=run_label(row["search_query"], row["location_query"], row["retry_count"], row["max_retries"]),
            message=row["error_message"],
            pattern=row["pattern"],
            chain_id=row["chain_id"],
            attempt=row["retry_count"],
            retry_id=row["retry_id"],
            retry_due=row["next_retry_at"],
            dead_lettered=row["dead_letter_run_id"] is not None,
        )
        for row in applied
    )
    for attempt in attempts:
        logger.bind(
            run_id=str(attempt.run_id),
            chain=str(attempt.chain_id),
            attempt=attempt.attempt,
            event="stuck",
            retry_id=str(attempt.retry_id or ""),
        ).warning("{}: {}", attempt.label, attempt.message)
    return _Batch(len(rows), attempts)


def _decide(rt: Runtime, policy: RetryPolicy, row, now: datetime) -> FailureOutcome:
    return decide_stuck(
        since=as_utc(row["since"]),
        now=now,
        retry_count=row["retry_count"],
        is_retry=row["is_retry"],
        row_max_retries=row["max_retries"],
        policy=policy,
        rng=rt.rng,
    )


def _preview(rt: Runtime, policy: RetryPolicy, params: dict, started: float) -> SweepResult:
    with database_errors(rt.engine, "looking for stuck runs"), rt.engine.connect() as conn:
        rows = conn.execute(rt.queries.stuck_preview, {**params, "sr_limit": PREVIEW_LIMIT}).mappings().all()
    attempts = []
    for row in rows:
        outcome = _decide(rt, policy, row, params["sr_now"])
        attempts.append(
            FailedAttempt(
                run_id=row["id"],
                label=run_label(row["search_query"], row["location_query"], row["retry_count"], row["max_retries"]),
                message=outcome.message,
                pattern=outcome.pattern,
                chain_id=row["original_run_id"] or row["id"],
                attempt=row["retry_count"],
                retry_id=None,
                retry_due=outcome.retry_due,
            )
        )
    return SweepResult(tuple(attempts), 0, time.monotonic() - started, dry_run=True)
