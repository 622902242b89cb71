"""The stuck-run sweep: fail runs that stopped making progress and schedule their retries.

One statement per batch, in its own transaction: lock up to BATCH_SIZE stuck runs `FOR UPDATE
SKIP LOCKED`, fail them (only if still `running`) with the decision of the rules, insert their
retries and dead letters. A scraper that completes a run during the sweep either holds the row
first (the run is skipped) or waits for the batch to commit; a completion is never turned into a
failure. The decision (budget, message, due time) is written once, in SQL (db/queries/sweep.py), from
the rules' message templates, so a sweep of 100,000 runs costs what the database spends on them,
not a Python loop; a dry run reads the same expressions without writing them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from functools import cached_property

from loguru import logger

from db import locks
from db.engine import database_errors
from db.prepared import DEALLOCATE_ALL
from db.queries.sweep import FLUSH_COMMITS
from jobs.events import SweepFinished
from jobs.limits import Limits, current_limits, runtime_judging_params
from jobs.model import RunId, as_utc
from jobs.rules import STUCK_PATTERN, RetryPolicy, run_label
from jobs.runtime import Runtime

PREVIEW_LIMIT = 100_000  # rows a dry run lists at most
ALL_ROWS = 2**31 - 1  # a LIMIT that keeps every row
EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc)  # where a sweep's first batch starts
SWEEP_LOCK_WAIT = timedelta(seconds=10)
LOGGED_RUNS_PER_SWEEP = 100  # beyond this a mass event is one summary line, not a log storm
KEPT_RUNS = 200  # rows a sweep's result keeps for the screen and the logs; counts cover every run


@dataclass(frozen=True)
class FailedAttempt:
    """One attempt the tool failed, and what became of its chain."""

    run_id: RunId
    label: str
    message: str
    pattern: str
    chain_id: RunId
    attempt: int  # the failed attempt's retry number
    retry_id: RunId | None
    retry_due: datetime | None
    dead_lettered: bool = False
    reason: str | None = None  # the limit that judged it, and why (SPEC §14)
    limit_source: str | None = None  # run, configured, learned or default

    @property
    def retried(self) -> bool:
        return self.retry_due is not None


@dataclass(frozen=True)
class SweepResult:
    """What one sweep did (or, with `dry_run`, would do).

    Counts cover every run failed; `rows` holds the statement's rows (by name) of the first
    ones only — as many as the caller kept — since a mass event of 100,000 runs needs its counts,
    not 100,000 objects. `attempts` builds the kept rows into values on first use.
    """

    failed: int = 0
    retries_scheduled: int = 0
    dead_lettered: int = 0
    batches: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    skipped: str | None = None  # why nothing was done (another sweep holds the lock)
    rows: tuple = field(default=(), repr=False, compare=False)  # the first failed (or stuck) runs' rows
    listing_sql: str | None = field(default=None, compare=False)  # lists every run this sweep failed
    # The table's ids came back as text: this makes them ids again (UUIDs, ints or text).
    parse_id: Callable[[str | None], object] = field(default=lambda text: _uuid(text), compare=False, repr=False)

    @property
    def permanently_failed(self) -> int:
        """Chains this sweep ended: each got its dead letter (a retry that already existed is not one)."""
        return self.dead_lettered

    def counts(self) -> dict[str, int | str]:
        """The counts the sweep is recorded and logged with (`skipped` only when it was)."""
        counts: dict[str, int | str] = {
            "failed": self.failed,
            "retries_scheduled": self.retries_scheduled,
            "permanently_failed": self.permanently_failed,
            "batches": self.batches,
        }
        return {**counts, "skipped": self.skipped} if self.skipped else counts

    @cached_property
    def attempts(self) -> tuple[FailedAttempt, ...]:
        return tuple(_attempt(self.parse_id, row) for row in self.rows)

    @property
    def unlisted(self) -> int:
        """Runs failed (or planned) that `attempts` does not hold."""
        return self.failed - len(self.rows)

    def document(self) -> dict:
        """The result for `--json`: counts, and each kept run as plain values straight from its
        row (no objects per run: a mass event's JSON costs little beside what the database spent)."""
        counts = {
            **self.counts(),
            "seconds": self.seconds,
            "dry_run": self.dry_run,
            "skipped": self.skipped,
            "unlisted": self.unlisted,
            "listing_sql": self.listing_sql,
        }
        return {**counts, "attempts": [_row_document(row) for row in self.rows]}


def _uuid(text: str | None) -> RunId | None:
    return None if text is None else uuid.UUID(text)


def _attempt(parse_id: Callable[[str | None], object], row) -> FailedAttempt:
    return FailedAttempt(
        run_id=parse_id(row["run_id"]),
        label=run_label(row["what"], row["retry_count"], row["budget"]),
        message=row["message"],
        pattern=STUCK_PATTERN,
        chain_id=parse_id(row["chain_id"]),
        attempt=row["retry_count"],
        retry_id=parse_id(row["retry_id"]),
        retry_due=as_utc(row["next_retry_at"]) if row["retried"] else None,
        dead_lettered=row["dead_lettered"],
        reason=row["limit_reason"],
        limit_source=row["limit_source"],
    )


def _row_document(row) -> dict:
    retried = row["retried"]
    return {
        "run_id": row["run_id"],
        "chain_id": row["chain_id"],
        "label": run_label(row["what"], row["retry_count"], row["budget"]),
        "message": row["message"],
        "pattern": STUCK_PATTERN,
        "attempt": row["retry_count"],
        "retry_id": row["retry_id"],
        "retry_due": as_utc(row["next_retry_at"]).isoformat() if retried else None,
        "retried": retried,
        "dead_lettered": row["dead_lettered"],
        "limit_reason": row["limit_reason"],
    }


def sweep_params(policy: RetryPolicy) -> dict[str, object]:
    """The policy as the sweep statement's parameters (`sr_now` and `sr_cutoff` come with them)."""
    return {
        "sr_policy_max": policy.max_retries,
        "sr_delay_s": policy.retry_delay.total_seconds(),
        "sr_cap_s": policy.max_delay.total_seconds(),
        "sr_jitter": policy.jitter,
        "sr_exponential": policy.backoff == "exponential",
    }


def sweep_stuck_runs(
    rt: Runtime,
    policy: RetryPolicy | None = None,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    use_lock: bool = True,
    lock_wait: timedelta = SWEEP_LOCK_WAIT,
    keep: int | None = KEPT_RUNS,
    limits: Limits | None = None,
) -> SweepResult:
    """Fails every run stuck past its limit (SPEC §14: `limits`, by default those in force with
    `policy.stuck_after` as the default) or whose progress stalled, batch by batch.

    Runs being executed by a live stuck-runs process are not stuck. With `stop` set the sweep
    finishes its current batch and returns. Another sweep holding the sweep lock for longer than
    `lock_wait` makes this one a no-op (`skipped`). `use_lock=False` skips the lock, which only
    saves work: correctness rests on the row locks and conditional updates. The result keeps the
    rows of the first `keep` runs failed (None: all of them, for `--json`). Its result is
    published (`SweepFinished`), a dry run's and a skipped sweep's too.
    """
    policy = policy or rt.settings.policy
    # STUCK_AFTER, --stuck-after and the script's max_duration_hours set the default, nothing else.
    limits = limits if limits is not None else replace(current_limits(rt), default=policy.stuck_after)
    result = _sweep(rt, policy, limits, dry_run, stop, use_lock, lock_wait, keep)
    rt.events.publish(SweepFinished(result))
    return result


def _sweep(
    rt: Runtime,
    policy: RetryPolicy,
    limits: Limits,
    dry_run: bool,
    stop: threading.Event | None,
    use_lock: bool,
    lock_wait: timedelta,
    keep: int | None,
) -> SweepResult:
    started = time.monotonic()
    now = rt.clock.now()
    params = {**runtime_judging_params(rt, limits, now), "sr_cutoff": now - policy.stuck_after}
    if dry_run:
        return _preview(rt, policy, params, started, keep)
    rows: list = []
    failed = retried = dead = batches = 0
    sweep_ns = locks.namespace(rt.runs.canonical_name, locks.SWEEP)
    statement_params = {**params, **sweep_params(policy), "sr_limit": rt.settings.batch_size}
    prepared = False  # whether this sweep prepared statements on its session (ended with it)
    # Each batch commits asynchronously (db.queries.sweep.ASYNC_COMMIT: its COMMIT does not wait
    # for the WAL to reach the disk, a hundred waits in a mass event), and the sweep makes them
    # all durable at once before it returns, logs or publishes anything (FLUSH_COMMITS). Why
    # nothing is lost or doubled:
    # - a crash of the server before the flush loses whole batches only, each one transaction:
    #   its runs are `running` again, their retries and dead letters gone with them, and the next
    #   sweep fails them again (one retry each, as the first would have made);
    # - another session that acts on a batch's rows (a hand-over marks a retry, an executor
    #   claims one) does so in a transaction that writes, and its synchronous commit flushes the
    #   WAL up to its own commit record, past the batch's: nothing leaves on a batch a crash could
    #   undo. A reader that only reads (a page, `status`) may show a failure a crash then undoes,
    #   as it may show a state that changes a moment later anyway;
    # - this sweep's own word (the log lines of failed runs, its result, SweepFinished and the
    #   alerts on it, the job record written after it) comes after the flush. If the flush cannot
    #   run (the connection broke), the batches' runs are not logged: they may be lost.
    unflushed = False  # a batch committed asynchronously that no flush has covered yet
    with database_errors(rt.engine, "sweeping stuck runs"), rt.engine.connect() as conn:
        if use_lock and not locks.lock_within(conn, sweep_ns, 0, int(lock_wait.total_seconds() * 1000)):
            holder = locks.holder(conn, sweep_ns, 0) or "another process"
            conn.rollback()
            return SweepResult(seconds=time.monotonic() - started, skipped=f"another sweep is running ({holder})")
        try:
            if rt.queries.progress_upkeep is not None:
                with conn.begin():  # SPEC §14: the progress each running run shows now, and since when
                    conn.execute(rt.queries.progress_upkeep, params)
            for prepare in _sweep_statements(rt, "batch"):
                # Prepared with its first batch, executed for the next (db.prepared): a mass
                # event's hundred batches are parsed and planned once, not each.
                resume_from, executing = EARLIEST, None
                while not (stop and stop.is_set()):
                    room = ALL_ROWS if keep is None else max(0, keep - len(rows))
                    with conn.begin():
                        if executing is None:
                            prepared = True
                            batch_params = {**statement_params, "p1": resume_from, "p2": room}
                            batch = conn.execute(prepare, batch_params).mappings().all()
                            executing = prepare.execute()
                        else:
                            batch = conn.execute(executing, {"p1": resume_from, "p2": room}).mappings().all()
                    batches += 1
                    rows.extend(batch[:room])
                    if batch:
                        unflushed = unflushed or batch[0]["batch_failed"] > 0
                        failed += batch[0]["batch_failed"]
                        retried += batch[0]["batch_retried"]
                        dead += batch[0]["batch_dead_lettered"]
                    if not batch or batch[0]["batch_failed"] < rt.settings.batch_size:
                        break
                    resume_from = batch[0]["batch_until"]
        finally:
            try:
                if unflushed and not conn.invalidated:
                    with conn.begin():
                        conn.execute(FLUSH_COMMITS)
                    unflushed = False
                if not unflushed:
                    _log(rt.runs.id_from_text, rows)
            finally:
                if prepared and not conn.invalidated:  # the pool's next user may prepare them again
                    conn.execute(DEALLOCATE_ALL)
                    conn.commit()
                if use_lock:
                    locks.unlock(conn, sweep_ns, 0)
                    conn.commit()
    listing = rt.queries.listing_sql(now)
    logged = min(len(rows), LOGGED_RUNS_PER_SWEEP)
    if failed > logged:
        logger.bind(event="stuck", count=failed - logged).warning(
            "{} more stuck runs failed ({} in all); list them with: {}", failed - logged, failed, listing
        )
    seconds = time.monotonic() - started
    return SweepResult(
        failed, retried, dead, batches, seconds, rows=tuple(rows), listing_sql=listing, parse_id=rt.runs.id_from_text
    )


def _sweep_statements(rt: Runtime, kind: str) -> list:
    """The sweep's statements of `kind` (batch, preview, preview_counts): runs stuck in `running`,
    and, where the table maps a `queued` value (SPEC §12's hand-off), retries handed to the
    fleet's queue that no worker started."""
    q = rt.queries
    statements = [
        {"batch": q.sweep_batch_prepared, "preview": q.stuck_preview, "preview_counts": q.stuck_preview_counts}[kind]
    ]
    if "queued" in rt.runs.layout.statuses:
        statements.append(
            {
                "batch": q.not_started_batch_prepared,
                "preview": q.not_started_preview,
                "preview_counts": q.not_started_preview_counts,
            }[kind]
        )
    return statements


def _log(parse_id: Callable[[str | None], object], rows) -> None:
    """Each failed run by name, up to LOGGED_RUNS_PER_SWEEP a sweep; the sweep then says in one
    line how many more there were and how to list them (journald would drop a storm anyway)."""
    for attempt in (_attempt(parse_id, row) for row in rows[:LOGGED_RUNS_PER_SWEEP]):
        logger.bind(
            run_id=str(attempt.run_id),
            chain=str(attempt.chain_id),
            attempt=attempt.attempt,
            event="stuck",
            retry_id=str(attempt.retry_id or ""),
            limit=attempt.reason or "",
        ).warning("{}: {}{}", attempt.label, attempt.message, _said_limit(attempt))


def _said_limit(attempt: FailedAttempt) -> str:
    """The limit beside the message when it is not the default (whose line reads as before SPEC
    §14); every line's JSON carries it as `limit` whatever it is."""
    if attempt.reason is None or attempt.limit_source in (None, "default"):
        return ""
    return f" ({attempt.reason})"


def _preview(rt: Runtime, policy: RetryPolicy, params: dict, started: float, keep: int | None) -> SweepResult:
    """A dry run: the sweep's own decision expressions, read, not written (db/queries/sweep.py)."""
    limit = PREVIEW_LIMIT if keep is None else min(PREVIEW_LIMIT, keep)
    with database_errors(rt.engine, "looking for stuck runs"), rt.engine.connect() as conn:
        statement_params = {**params, **sweep_params(policy), "sr_limit": limit}
        rows = [row for q in _sweep_statements(rt, "preview") for row in conn.execute(q, statement_params).mappings()]
        every = {**statement_params, "sr_limit": ALL_ROWS}
        counts = [conn.execute(q, every).one() for q in _sweep_statements(rt, "preview_counts")]
        stuck, retried = sum(c[0] for c in counts), sum(c[1] for c in counts)
        rows = rows[:limit]
    # A chain the sweep would end gets its dead letter: the dry run counts it as such.
    seconds = time.monotonic() - started
    return SweepResult(
        stuck, retried, stuck - retried, 0, seconds, dry_run=True, rows=tuple(rows), parse_id=rt.runs.id_from_text
    )
