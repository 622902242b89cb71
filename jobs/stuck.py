"""The stuck-run sweep: fail runs that stopped making progress and schedule their retries.

One statement per batch, in its own transaction: lock up to BATCH_SIZE stuck runs `FOR UPDATE
SKIP LOCKED`, fail them (only if still `running`) with the decision of the rules, insert their
retries and dead letters. A scraper that completes a run during the sweep either holds the row
first (the run is skipped) or waits for the batch to commit; a completion is never turned into a
failure. The decision is `decide_stuck` rendered in SQL (db/queries.py), so a sweep of 100,000
runs costs what the database spends on them, not a Python loop; dry runs use `decide_stuck`
itself, and a test holds the two to the same answers.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

from loguru import logger

from db import locks
from db.engine import database_errors
from db.queries import sweep_params
from jobs.model import as_utc
from jobs.rules import STUCK_PATTERN, RetryPolicy, decide_stuck, run_label
from jobs.runtime import Runtime

PREVIEW_LIMIT = 100_000  # rows a dry run lists at most
SWEEP_LOCK_WAIT = timedelta(seconds=10)
LOGGED_RUNS_PER_SWEEP = 100  # beyond this a mass event is one summary line, not a log storm


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
    """What one sweep did (or, with `dry_run`, would do).

    The per-run details are built on first use: the daemon needs the counts, the CLI the list.
    """

    failed: int = 0
    retries_scheduled: int = 0
    batches: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    skipped: str | None = None  # why nothing was done (another sweep holds the lock)
    rows: tuple = field(default=(), repr=False, compare=False)  # the sweep statement's rows
    planned: tuple[FailedAttempt, ...] = field(default=(), repr=False, compare=False)  # a dry run's

    @property
    def permanently_failed(self) -> int:
        return self.failed - self.retries_scheduled

    @cached_property
    def attempts(self) -> tuple[FailedAttempt, ...]:
        return self.planned or tuple(_attempt(row) for row in self.rows)


def _attempt(row: tuple) -> FailedAttempt:
    run_id, chain_id, search_query, location_query, retry_count, budget, message, due, retry_id, dead = row
    return FailedAttempt(
        run_id=uuid.UUID(run_id),
        label=run_label(search_query, location_query, retry_count, budget),
        message=message,
        pattern=STUCK_PATTERN,
        chain_id=uuid.UUID(chain_id),
        attempt=retry_count,
        retry_id=uuid.UUID(retry_id) if retry_id else None,
        retry_due=due if retry_id else None,
        dead_lettered=dead,
    )


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
    rows: list[tuple] = []
    batches = 0
    sweep_ns = locks.namespace(rt.runs.qualified_name, locks.SWEEP)
    statement_params = {**params, **sweep_params(policy), "sr_limit": rt.settings.batch_size}
    with database_errors(rt.engine, "sweeping stuck runs"), rt.engine.connect() as conn:
        if use_lock and not locks.lock_within(conn, sweep_ns, 0, int(lock_wait.total_seconds() * 1000)):
            holder = locks.holder(conn, sweep_ns, 0) or "another process"
            conn.rollback()
            return SweepResult(seconds=time.monotonic() - started, skipped=f"another sweep is running ({holder})")
        try:
            while not (stop and stop.is_set()):
                with conn.begin():
                    batch = conn.execute(rt.queries.sweep_batch, statement_params).all()
                batches += 1
                _log(batch, already=len(rows), now=now, table=rt.runs.qualified_name)
                rows.extend(batch)
                if len(batch) < rt.settings.batch_size:
                    break
        finally:
            if use_lock:
                locks.unlock(conn, sweep_ns, 0)
                conn.commit()
    retried = sum(1 for row in rows if row[8])
    return SweepResult(len(rows), retried, batches, time.monotonic() - started, rows=tuple(rows))


def _log(batch: list[tuple], *, already: int, now: datetime, table: str) -> None:
    """Each failed run by name, up to LOGGED_RUNS_PER_SWEEP a sweep; then a line saying where
    the rest are (journald would drop a storm of lines anyway)."""
    room = max(0, LOGGED_RUNS_PER_SWEEP - already)
    for attempt in (_attempt(row) for row in batch[:room]):
        logger.bind(
            run_id=str(attempt.run_id),
            chain=str(attempt.chain_id),
            attempt=attempt.attempt,
            event="stuck",
            retry_id=str(attempt.retry_id or ""),
        ).warning("{}: {}", attempt.label, attempt.message)
    if len(batch) > room:
        logger.bind(event="stuck", count=len(batch) - room).warning(
            "{} more stuck runs failed; list them with: SELECT id, search_query, location_query, error_message "
            "FROM {} WHERE failure_pattern = 'stuck' AND completed_at = '{}'",
            len(batch) - room,
            table,
            now.isoformat(),
        )


def _preview(rt: Runtime, policy: RetryPolicy, params: dict, started: float) -> SweepResult:
    with database_errors(rt.engine, "looking for stuck runs"), rt.engine.connect() as conn:
        rows = conn.execute(rt.queries.stuck_preview, {**params, "sr_limit": PREVIEW_LIMIT}).all()
    planned = []
    for row in rows:
        decision = decide_stuck(
            since=as_utc(row.since),
            now=params["sr_now"],
            retry_count=row.retry_count,
            is_retry=row.is_retry,
            row_max_retries=row.max_retries,
            policy=policy,
            rng=rt.rng,
        )
        planned.append(
            FailedAttempt(
                run_id=row.id,
                label=run_label(row.search_query, row.location_query, row.retry_count, decision.budget),
                message=decision.message,
                pattern=decision.pattern,
                chain_id=row.original_run_id or row.id,
                attempt=row.retry_count,
                retry_id=None,
                retry_due=decision.retry_due,
            )
        )
    retried = sum(1 for a in planned if a.retry_due)
    return SweepResult(len(planned), retried, 0, time.monotonic() - started, dry_run=True, planned=tuple(planned))
