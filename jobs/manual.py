"""Operator actions on chains: manual and bulk retries, and a chain's history.

One scheduling path serves a single retry, a bulk retry and a dead-letter requeue: each
retries the latest failed attempt of a chain with one set-based statement.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from loguru import logger

from db.dead_letters import mark_requeued
from db.engine import database_errors
from db.errors import RetryRefused, RunNotFound, UsageError
from db.queries.retries import matching_count
from jobs.delivery import being_delivered
from jobs.model import Run, RunId
from jobs.retries import RetryDispatcher, RetryOutcome
from jobs.rules import RetryPolicy, attempts_text, chain_budget, count_attempts, format_duration, format_time
from jobs.runtime import Runtime

RETRY_KINDS = ("failed", "permanent", "scraper")


def parse_run_id(rt: Runtime, text: str) -> object:
    """A run id as typed, checked against the table's id type (UUID, integer or text)."""
    return rt.runs.parse_id(text)


# Why a bulk retry skips a chain whose retry was cancelled (`retry RUN_ID` refuses it alike).
CANCELLED_CHAIN = "its retry was cancelled: the chain is over"


@dataclass(frozen=True)
class ChainHistory:
    root_id: RunId
    attempts: tuple[Run, ...]

    @property
    def final_status(self) -> str:
        if any(a.status == "completed" for a in self.attempts):
            return "success"
        return self.attempts[-1].status

    @property
    def attempts_made(self) -> int:
        """The rows that ran; a retry pending or cancelled before it ran is not an attempt."""
        return count_attempts(a.status for a in self.attempts)

    @property
    def summary(self) -> str:
        return f"Total attempts: {self.attempts_made} · final status: {self.final_status}"


@dataclass(frozen=True)
class ScheduledRetry:
    failed_run_id: RunId  # the attempt being retried (its chain's latest)
    label: str
    retry_id: RunId | None  # None in a dry run
    attempt: int  # the new attempt's retry number
    budget: int
    due: datetime

    @property
    def message(self) -> str:
        return f"Run scheduled for retry (attempt {self.attempt}/{self.budget})"


@dataclass(frozen=True)
class SkippedRetry:
    run_id: RunId
    label: str
    reason: str


@dataclass(frozen=True)
class BulkRetryResult:
    scheduled: tuple[ScheduledRetry, ...]
    skipped: tuple[SkippedRetry, ...]  # each with its reason: a spent budget, a cancelled chain
    dry_run: bool = False
    matched: int = 0  # failed chains the filters match, the limit aside
    limit: int | None = None  # how many of them this took (newest first)
    cancelled_matched: int = 0  # chains over (their retry cancelled) the filters match, the limit aside

    @property
    def message(self) -> str:
        """What the CLI prints first and the API answers: how many of how many, and what was skipped
        (chains whose retry was cancelled are listed up to the limit: how many more there are)."""
        verb = "Would retry" if self.dry_run else "Retried"
        said = f"{verb} {len(self.scheduled)} of {self.matched} matching failed chain(s); {len(self.skipped)} skipped"
        listed = sum(1 for s in self.skipped if s.reason == CANCELLED_CHAIN)
        if self.cancelled_matched > listed:
            said += (
                f"; {self.cancelled_matched} matching chain(s) are over, their retry cancelled "
                f"(the first {listed} listed: --limit {self.cancelled_matched} lists them all)"
            )
        return said

    @property
    def beyond_limit(self) -> str | None:
        """How to act on every match, when the limit left some out."""
        return beyond_limit(self.matched, self.limit, self.dry_run)


def beyond_limit(matched: int, limit: int | None, dry_run: bool) -> str | None:
    """What a bulk action says when its limit took only the first of the matches: how to act on all."""
    if limit is None or matched <= limit:
        return None
    again = "" if dry_run else f", or run it again for the next {limit}"
    return (
        f"Only the first {limit} of {matched} matches were taken (limit {limit}): "
        f"a limit of {matched} (--limit {matched}) takes them all{again}"
    )


@dataclass(frozen=True)
class RetryCriteria:
    """Which failed chains a bulk retry takes; patterns use SQL LIKE syntax, case-insensitive."""

    error_like: str | None = None
    search_query: str | None = None
    location_query: str | None = None
    since: timedelta | None = None
    kind: str = "failed"  # failed | permanent (dead-lettered) | scraper (failed by the scraper)
    limit: int = 100

    def columns_like(self) -> dict[str, str | None]:
        """The input columns the criteria filter on, with their patterns."""
        return {"search_query": self.search_query, "location_query": self.location_query}

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.error_like, self.search_query, self.location_query, self.since)) or (
            self.kind != "failed"
        )


def chain_history(rt: Runtime, run_id: RunId) -> ChainHistory:
    """Every attempt of the chain `run_id` belongs to, oldest first."""
    with database_errors(rt.engine, "reading the chain"), rt.engine.connect() as conn:
        row = conn.execute(rt.queries.get, {"sr_run_id": run_id}).mappings().first()
        if row is None:
            raise RunNotFound(f"run {run_id} not found in {rt.runs.qualified_name}")
        root = row["original_run_id"] or row["id"]
        rows = conn.execute(rt.queries.chain(), {"sr_root": root}).mappings().all()
    return ChainHistory(root, tuple(Run.from_row(r, rt.runs.input_names) for r in rows))


def retry_run(
    rt: Runtime,
    run_id: RunId,
    *,
    policy: RetryPolicy | None = None,
    reset_budget: bool = False,
    due: datetime | None = None,
    dry_run: bool = False,
) -> ScheduledRetry:
    """Schedules a retry of a failed run, or raises `RetryRefused` saying why it cannot.

    A run that is not its chain's latest attempt retries the chain's latest failed attempt.
    `reset_budget` grants the chain `policy.max_retries` more retries. With `dry_run` the
    checks run and nothing changes (the result has no `retry_id`).
    """
    policy = policy or rt.settings.policy
    latest = _latest_retryable(rt, run_id, policy, reset_budget)
    due = due or rt.clock.now()
    if dry_run:
        return _planned(latest, policy, reset_budget, due, None)
    [scheduled] = _schedule(rt, [latest], policy, reset_budget, [due])
    if scheduled.retry_id is None:
        raise RetryRefused(f"run {latest.id} changed while scheduling its retry; look at `stuck-runs history {run_id}`")
    return scheduled


def _latest_retryable(rt: Runtime, run_id: RunId, policy: RetryPolicy, reset_budget: bool) -> Run:
    """The chain's latest attempt if a retry of it may be scheduled; else `RetryRefused`.

    Which attempt that is, is the bulk retry's rule (`retry_candidates`) asked of this one chain;
    the chain's history only says why, when there is none."""
    history = chain_history(rt, run_id)
    given = next(a for a in history.attempts if a.id == run_id)
    _refuse_status(given, rt)
    statement = rt.queries.retry_candidates(root=True)
    with database_errors(rt.engine, "reading the chain"), rt.engine.connect() as conn:
        row = conn.execute(statement, {"sr_root": history.root_id, "sr_limit": 1}).mappings().first()
    if row is None:
        completed = next((a for a in history.attempts if a.status == "completed"), None)
        if completed:
            raise RetryRefused(
                f"run {run_id} cannot be retried: its chain completed with run {completed.id}",
                details={"runId": str(run_id), "currentStatus": given.status, "completedRunId": str(completed.id)},
            )
        latest = history.attempts[-1]
        _refuse_status(latest, rt, of_chain=latest.id != given.id)
        raise RetryRefused(f"run {run_id} changed while scheduling its retry; look at `stuck-runs history {run_id}`")
    latest = Run.from_row(row, rt.runs.input_names)
    refusal = _budget_refusal(rt, latest, policy, reset_budget)
    if refusal:
        details = {
            "runId": str(latest.id),
            "currentRetries": latest.retry_count,
            "maxRetries": _budget(latest, policy, reset_budget),
            "lastError": latest.error_message,
            "failurePattern": _pattern(rt, latest),
        }
        raise RetryRefused(refusal, budget_spent=True, details=details)
    return latest


def criteria_params(rt: Runtime, criteria: RetryCriteria) -> tuple[tuple[str, ...], dict[str, object]]:
    """The input columns `criteria` filters on and the statement's parameters (`:sr_limit`,
    `:sr_error_like`, `:sr_<column>_like`, `:sr_since`); `UsageError` for a column the table lacks."""
    like = {name: value for name, value in criteria.columns_like().items() if value is not None}
    for name in like:
        if name not in rt.runs.input_columns:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag}: {rt.runs.qualified_name} has no {name} column; filter with --error-like or --since"
            )
    params = {
        "sr_limit": criteria.limit,
        "sr_error_like": criteria.error_like,
        **{f"sr_{name}_like": value for name, value in like.items()},
        "sr_since": rt.clock.now() - criteria.since if criteria.since else None,
    }
    return tuple(like), params


def retry_matching(
    rt: Runtime,
    criteria: RetryCriteria,
    *,
    policy: RetryPolicy | None = None,
    reset_budget: bool = False,
    spread: timedelta | None = None,
    dry_run: bool = False,
) -> BulkRetryResult:
    """Retries the latest failed attempt of every chain matching `criteria` (at most its limit).

    With `spread`, the retries fall due evenly over that window instead of all at once, so a
    scraped site is not hit by a burst. Chains whose budget is spent are skipped unless
    `reset_budget`.
    """
    policy = policy or rt.settings.policy
    now = rt.clock.now()
    columns_like, params = criteria_params(rt, criteria)
    statement = rt.queries.retry_candidates(
        error_like=criteria.error_like is not None,
        columns_like=columns_like,
        since=criteria.since is not None,
        kind=criteria.kind,
    )
    over = rt.queries.retry_candidates(
        error_like=criteria.error_like is not None,
        columns_like=columns_like,
        since=criteria.since is not None,
        kind=criteria.kind,
        cancelled=True,
    )
    with database_errors(rt.engine, "finding runs to retry"), rt.engine.connect() as conn, conn.begin():
        found = [Run.from_row(r, rt.runs.input_names) for r in conn.execute(statement, params).mappings()]
        matched = conn.execute(matching_count(statement), params).scalar_one()
        cancelled = [Run.from_row(r, rt.runs.input_names) for r in conn.execute(over, params).mappings()]
        cancelled_matched = conn.execute(matching_count(over), params).scalar_one()
    skipped = [SkippedRetry(run.id, run.label, CANCELLED_CHAIN) for run in cancelled]
    chosen = []
    for run in found:
        refusal = _budget_refusal(rt, run, policy, reset_budget)
        (skipped.append(SkippedRetry(run.id, run.label, refusal)) if refusal else chosen.append(run))
    step = spread / len(chosen) if spread and chosen else timedelta(0)
    dues = [now + step * i for i in range(len(chosen))]
    if dry_run:
        scheduled = [_planned(run, policy, reset_budget, due, None) for run, due in zip(chosen, dues, strict=True)]
    else:
        scheduled = _schedule(rt, chosen, policy, reset_budget, dues)
    return BulkRetryResult(tuple(scheduled), tuple(skipped), dry_run, matched, criteria.limit, cancelled_matched)


def run_retry_now(
    rt: Runtime, retry_id: RunId, wait: Callable[[], None], stop: threading.Event | None = None
) -> RetryOutcome | None:
    """Executes a pending retry in this process at once (in a free slot) and returns its outcome.

    With `stop` set (a signal) it is put back to `pending_retry`, due now, budget unspent."""
    return RetryDispatcher(rt, rt.settings.policy).run_now(retry_id, stop or threading.Event(), wait)


def _budget(run: Run, policy: RetryPolicy, reset_budget: bool) -> int:
    if reset_budget:
        return run.retry_count + policy.max_retries
    return chain_budget(run.is_retry, run.max_retries, policy, handled=run.failure_pattern is not None)


def _budget_refusal(rt: Runtime, run: Run, policy: RetryPolicy, reset_budget: bool) -> str | None:
    budget = _budget(run, policy, reset_budget)
    if run.retry_count < budget:
        return None
    pattern = _pattern(rt, run)
    return (
        # Every row before the chain's latest failed attempt ran: each retry follows a failure.
        f"run {run.id} has spent its retry budget ({run.retry_count} of {budget} retries spent; "
        f"{attempts_text(run.retry_count + 1)}, the original run included); last error: {run.error_message or '(none)'}; "
        f"failure pattern: {pattern}. Use --reset-budget to retry it anyway"
    )


def _pattern(rt: Runtime, run: Run) -> str:
    return run.failure_pattern or (rt.classifier.classify(run.error_message) if run.error_message else "unknown")


def _planned(run: Run, policy: RetryPolicy, reset_budget: bool, due: datetime, retry_id) -> ScheduledRetry:
    budget = _budget(run, policy, reset_budget)
    return ScheduledRetry(run.id, run.label, retry_id, run.retry_count + 1, budget, due)


def _schedule(
    rt: Runtime, runs: list[Run], policy: RetryPolicy, reset_budget: bool, dues: list[datetime]
) -> list[ScheduledRetry]:
    """Schedules one retry per failed attempt in one statement; marks their dead letters requeued."""
    if not runs:
        return []
    plans = [_planned(run, policy, reset_budget, due, None) for run, due in zip(runs, dues, strict=True)]
    params = {
        "sr_ids": [p.failed_run_id for p in plans],
        "sr_dues": [p.due for p in plans],
        "sr_budgets": [p.budget for p in plans],
        "sr_now": rt.clock.now(),
    }
    with database_errors(rt.engine, "scheduling retries"), rt.engine.begin() as conn:
        created = {row["failed_id"]: row["retry_id"] for row in conn.execute(rt.queries.schedule, params).mappings()}
        conn.execute(
            mark_requeued(rt.queries.dead_letters),
            {"sr_failed_ids": list(created), "sr_retry_ids": list(created.values()), "sr_now": params["sr_now"]},
        )
    done = [_planned(run, policy, reset_budget, due, created.get(run.id)) for run, due in zip(runs, dues, strict=True)]
    by_id = {run.id: run for run in runs}
    for item in done:
        if item.retry_id:
            run = by_id[item.failed_run_id]
            logger.bind(
                run_id=str(item.failed_run_id),
                chain=str(run.chain_id),
                attempt=run.retry_count,
                retry_id=str(item.retry_id),
                event="manual_retry",
            ).info("{}: {}", item.label, item.message)
    return done


def _refuse_status(run: Run, rt: Runtime, *, of_chain: bool = False) -> None:
    """Refusals that mirror a retry API: each says why and what would help."""
    if run.status == "failed":
        return
    if delivery := being_delivered(run, rt.clock.now()):  # SPEC §12: a conflict for the delivery's lease
        raise RetryRefused(delivery[0], details={"runId": str(run.id)}, retry_after=delivery[1])
    raise RetryRefused(_status_reason(run, rt, of_chain), details={"runId": str(run.id), "currentStatus": run.status})


def _status_reason(run: Run, rt: Runtime, of_chain: bool) -> str:
    subject = f"the chain's latest attempt {run.id}" if of_chain else f"run {run.id}"
    if run.status == "completed":
        return f"{subject} completed: there is nothing to retry"
    if run.status == "running":
        since = f" for {format_duration(rt.clock.now() - run.started_at)}" if run.started_at else ""
        return f"{subject} is running{since}: wait for it to finish, or for the stuck checker to fail it"
    if run.status == "pending_retry":
        when = format_time(run.next_retry_at) if run.next_retry_at else "soon"
        return f"{subject} is already scheduled for retry at {when} (attempt {run.retry_count}/{run.max_retries})"
    if run.status == "cancelled":
        return f"{subject} was cancelled ({run.error_message or 'no reason given'}): its chain is over"
    return f"{subject} has status {run.status!r}; only failed runs can be retried"
