"""The API's retry routes: retry, cancel and make due one run's chain, or every chain filters match."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from db.errors import UsageError
from jobs.control import cancel_matching, cancel_run
from jobs.due_now import make_due_now
from jobs.listing import MAX_SEARCH
from jobs.manual import RETRY_KINDS, RetryCriteria, chain_history, retry_matching, retry_run
from jobs.runtime import Runtime
from jobs.settings import parse_duration
from scheduler.documents import plain
from scheduler.web.answers import ApiError, answering
from scheduler.web.security import Access, Flag, on, read_body


class BulkRetry(BaseModel):
    """The CLI's `retry` filters. Nothing changes unless `dry_run` is JSON `false`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    error_like: str | None = Field(None, max_length=MAX_SEARCH, description="SQL LIKE pattern on the error, any case")
    search_query: str | None = Field(None, max_length=MAX_SEARCH)
    location_query: str | None = Field(None, max_length=MAX_SEARCH)
    since: str | None = Field(None, max_length=20, description="failed within this long (90s, 30m, 4h, 1d)")
    status: str = Field("failed", description="failed | permanent (dead-lettered) | scraper")
    limit: int = Field(100, ge=1, le=10_000)
    spread: str | None = Field(None, max_length=20, description="spread the retries' due times over this long")
    reset_budget: bool = False
    dry_run: bool = True


class BulkCancel(BaseModel):
    """The CLI's `cancel` filters. Nothing changes unless `dry_run` is JSON `false`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    error_like: str | None = Field(
        None, max_length=MAX_SEARCH, description="SQL LIKE pattern on the retried attempt's error, any case"
    )
    search_query: str | None = Field(None, max_length=MAX_SEARCH)
    location_query: str | None = Field(None, max_length=MAX_SEARCH)
    since: str | None = Field(None, max_length=20, description="the retried attempt ended within this long")
    limit: int = Field(100, ge=1, le=10_000)
    running: bool = Field(False, description="cancel the matching running retries too (SPEC §16)")
    dry_run: bool = True


def add_routes(api: APIRouter, rt: Runtime, access: Access) -> None:
    admin = access.admin

    @api.post(
        "/runs/retry",
        dependencies=admin,
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": BulkRetry.model_json_schema()}}}},
    )
    async def bulk_retry(request: Request) -> dict:
        """Retries the latest failed attempt of every chain the filters match, as `stuck-runs retry --error-like ...`."""
        filters = await read_body(request, BulkRetry)
        return await run_in_threadpool(_bulk_retry, filters)

    def _bulk_retry(filters: BulkRetry) -> dict:
        if filters.status not in RETRY_KINDS:
            raise ApiError(400, f"Unknown status: {filters.status}", {"accepted": ", ".join(RETRY_KINDS)})
        with answering("Failed to retry runs"):
            criteria = RetryCriteria(
                error_like=filters.error_like,
                search_query=filters.search_query,
                location_query=filters.location_query,
                since=parse_duration(filters.since, "since") if filters.since else None,
                kind=filters.status,
                limit=filters.limit,
            )
            spread = parse_duration(filters.spread, "spread") if filters.spread else None
            result = retry_matching(
                rt, criteria, reset_budget=filters.reset_budget, spread=spread, dry_run=filters.dry_run
            )
        return {"success": True, "data": plain(result), "message": result.message}

    @api.post(
        "/runs/cancel",
        dependencies=admin,
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": BulkCancel.model_json_schema()}}}},
    )
    async def bulk_cancel(request: Request) -> dict:
        """Cancels every pending retry the filters match, as `stuck-runs cancel --error-like ...`."""
        filters = await read_body(request, BulkCancel)
        return await run_in_threadpool(_bulk_cancel, filters)

    def _bulk_cancel(filters: BulkCancel) -> dict:
        with answering("Failed to cancel retries"):
            criteria = RetryCriteria(
                error_like=filters.error_like,
                search_query=filters.search_query,
                location_query=filters.location_query,
                since=parse_duration(filters.since, "since") if filters.since else None,
                limit=filters.limit,
            )
            if not criteria.given:
                raise UsageError("give filters for a bulk cancel (error_like, search_query, location_query, since)")
            result = cancel_matching(rt, criteria, dry_run=filters.dry_run, running=filters.running, via="api")
        return {"success": True, "data": plain(result), "message": result.message}

    @api.post("/runs/{run_id}/retry", dependencies=admin)
    def retry(run_id: str, reset_budget: Flag = "false", dry_run: Flag = "false") -> dict:
        """A manual retry of a failed run (its chain's latest failed attempt), as `stuck-runs retry RUN_ID`;
        with `dry_run=true`, what would be scheduled, nothing changed."""
        if on(dry_run):
            with answering("Failed to retry run"):
                plan = retry_run(rt, rt.runs.parse_id(run_id), reset_budget=on(reset_budget), dry_run=True)
            message = f"Would schedule a retry (attempt {plan.attempt}/{plan.budget})"
            return {"success": True, "data": plain(plan), "dry_run": True, "message": message}
        with answering("Failed to retry run"):
            scheduled = retry_run(rt, rt.runs.parse_id(run_id), reset_budget=on(reset_budget))
            chain = chain_history(rt, scheduled.retry_id)
        new = next(a for a in chain.attempts if a.id == scheduled.retry_id)
        logger.bind(event="api_retry", run_id=str(scheduled.failed_run_id), retry_id=str(new.id)).info(
            "retry of {} scheduled over HTTP", scheduled.failed_run_id
        )
        return {"success": True, "data": plain(new), "message": scheduled.message}

    @api.post("/runs/{run_id}/cancel", dependencies=admin)
    def cancel(run_id: str, dry_run: Flag = "false") -> dict:
        """Cancels the chain's pending retry ("Cancelled by operator"), or asks for its running retry to be
        stopped and cancelled (SPEC §16), as `stuck-runs cancel RUN_ID`."""
        with answering("Failed to cancel retry"):
            done = cancel_run(rt, rt.runs.parse_id(run_id), dry_run=on(dry_run), via="api")
        return {"success": True, "data": plain(done), "message": done.message}

    @api.post("/runs/{run_id}/due-now", dependencies=admin)
    def due_now(run_id: str) -> dict:
        """Makes the chain's pending retry due now (the next free slot starts it), as `stuck-runs retry RUN_ID --now`
        does before executing it; 409 when nothing of the chain is pending."""
        with answering("Failed to make the retry due"):
            done = make_due_now(rt, rt.runs.parse_id(run_id))
        logger.bind(event="api_due_now", run_id=str(done.retry_id)).info(
            "retry {} made due now over HTTP", done.retry_id
        )
        return {"success": True, "data": plain(done), "message": done.message}
