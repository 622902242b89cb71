"""Operator actions on one chain: a manual retry, and the chain's history."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from loguru import logger

from db.dead_letters import mark_requeued
from db.engine import database_errors
from jobs.errors import RetryRefused, RunNotFound, UsageError
from jobs.model import Run
from jobs.rules import RetryPolicy, chain_budget, format_hours
from jobs.runtime import Runtime


def parse_run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(text).strip())
    except ValueError:
        raise UsageError(f"{text!r} is not a run id: give the UUID from scrape_runs.id") from None


@dataclass(frozen=True)
class ChainHistory:
    root_id: uuid.UUID
    attempts: tuple[Run, ...]

    @property
    def final_status(self) -> str:
        if any(a.status == "completed" for a in self.attempts):
            return "success"
        return self.attempts[-1].status


@dataclass(frozen=True)
class ManualRetry:
    failed_run_id: uuid.UUID  # the attempt being retried (the chain's latest)
    retry_id: uuid.UUID
    attempt: int  # the new attempt's retry number
    budget: int
    due: datetime

    @property
    def message(self) -> str:
        return f"Run scheduled for retry (attempt {self.attempt}/{self.budget})"


def chain_history(rt: Runtime, run_id: uuid.UUID) -> ChainHistory:
    """Every attempt of the chain `run_id` belongs to, oldest first."""
    with database_errors(rt.engine, "reading the chain"), rt.engine.connect() as conn:
        row = conn.execute(rt.queries.get, {"sr_run_id": run_id}).mappings().first()
        if row is None:
            raise RunNotFound(f"run {run_id} not found in {rt.runs.qualified_name}")
        root = row["original_run_id"] or row["id"]
        rows = conn.execute(rt.queries.chain(), {"sr_root": root}).mappings().all()
    return ChainHistory(root, tuple(Run.from_row(r, rt.runs.input_columns) for r in rows))


def retry_run(
    rt: Runtime,
    run_id: uuid.UUID,
    *,
    policy: RetryPolicy | None = None,
    reset_budget: bool = False,
    due: datetime | None = None,
) -> ManualRetry:
    """Schedules a retry of a failed run, or raises `RetryRefused` saying why it cannot.

    A run that is not its chain's latest attempt retries the chain's latest failed attempt.
    `reset_budget` grants the chain a fresh budget of `policy.max_retries` more retries.
    """
    policy = policy or rt.settings.policy
    history = chain_history(rt, run_id)
    given = next(a for a in history.attempts if a.id == run_id)
    _refuse_status(given, rt)
    completed = next((a for a in history.attempts if a.status == "completed"), None)
    if completed:
        raise RetryRefused(f"run {run_id} cannot be retried: its chain completed with run {completed.id}")
    latest = history.attempts[-1]
    if latest.id != given.id:
        _refuse_status(latest, rt, of_chain=True)
    budget = chain_budget(latest.is_retry, latest.max_retries, policy)
    if latest.retry_count >= budget and not reset_budget:
        raise RetryRefused(
            f"run {latest.id} has spent its retry budget ({latest.retry_count} of {budget} retries, "
            f"{latest.retry_count + 1} attempts); last error: {latest.error_message or '(none)'}; "
            f"failure pattern: {rt.classifier.classify(latest.error_message) if latest.error_message else 'unknown'}. "
            "Use --reset-budget to retry it anyway"
        )
    if reset_budget:
        budget = latest.retry_count + policy.max_retries
    now = rt.clock.now()
    due = due or now
    params = {"sr_run_id": latest.id, "sr_due_at": due, "sr_new_budget": budget, "sr_now": now}
    with database_errors(rt.engine, "scheduling the retry"), rt.engine.begin() as conn:
        created = conn.execute(rt.queries.schedule_manual, params).mappings().first()
        if created is None:
            raise RetryRefused(
                f"run {latest.id} changed while scheduling its retry; look at `stuck-runs history {run_id}`"
            )
        conn.execute(
            mark_requeued(rt.queries.dead_letters),
            {"sr_failed_run_id": latest.id, "sr_now": now, "sr_retry_id": created["id"]},
        )
    result = ManualRetry(latest.id, created["id"], created["retry_count"], budget, due)
    logger.bind(run_id=str(latest.id), retry_id=str(result.retry_id), event="manual_retry").info(result.message)
    return result


def _refuse_status(run: Run, rt: Runtime, *, of_chain: bool = False) -> None:
    """Refusals that mirror a retry API: each says why and what would help."""
    subject = f"the chain's latest attempt {run.id}" if of_chain else f"run {run.id}"
    if run.status == "failed":
        return
    if run.status == "completed":
        raise RetryRefused(f"{subject} completed: there is nothing to retry")
    if run.status == "running":
        since = f" for {format_hours(rt.clock.now() - run.started_at)}" if run.started_at else ""
        raise RetryRefused(f"{subject} is running{since}: wait for it to finish, or for the stuck checker to fail it")
    if run.status == "pending_retry":
        when = run.next_retry_at.isoformat(timespec="minutes") if run.next_retry_at else "soon"
        raise RetryRefused(
            f"{subject} is already scheduled for retry at {when} (attempt {run.retry_count}/{run.max_retries})"
        )
    if run.status == "cancelled":
        raise RetryRefused(f"{subject} was cancelled ({run.error_message or 'no reason given'}): its chain is over")
    raise RetryRefused(f"{subject} has status {run.status!r}; only failed runs can be retried")
