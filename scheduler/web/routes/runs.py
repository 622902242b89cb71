"""The API's run routes: the runs list, a keyset page at a time, and one run with its chain."""

from __future__ import annotations

from fastapi import APIRouter, Query

from jobs.limits import limit_document
from jobs.listing import MAX_PAGE, MAX_SEARCH, RunFilter, list_runs
from jobs.manual import chain_history
from jobs.runtime import Runtime
from jobs.settings import parse_duration
from scheduler.documents import plain
from scheduler.web.answers import answering
from scheduler.web.security import Access, Flag, on


def add_routes(api: APIRouter, rt: Runtime, access: Access) -> None:
    read = access.read

    @api.get("/runs", dependencies=read)
    def runs(
        status: str | None = Query(None, description="running, completed, failed, pending_retry, cancelled"),
        q: str | None = Query(None, description=f"text in the run's inputs or its error, any case (≤ {MAX_SEARCH})"),
        since: str | None = Query(
            None,
            description="within this long (90m, 24h, 7d), by the time that describes the status: started; "
            "due (overdue or due within it) for pending_retry; ended for cancelled; handed off for queued",
        ),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        cursor: str | None = Query(None, description="next_cursor of the previous page"),
        before: str | None = Query(None, description="prev_cursor of a page: the page before it"),
        stuck: Flag = Query("false", description="only runs running past their limit, as `check` judges them"),
        order: str = Query(
            "newest",
            description="newest (runs not started first), started (newest started), due (pending retries by due time)",
        ),
        target: str | None = Query(None, description="only runs of this target (TARGET's value: a site, a host)"),
    ) -> dict:
        """Runs newest first (or by start, or by due time), a keyset page at a time, either way."""
        with answering("Failed to list runs"):
            window = parse_duration(since, "since") if since else None
            filters = RunFilter(
                status, q or None, window, limit, cursor, stuck=on(stuck), order=order, before=before, target=target
            )
            page = list_runs(rt, filters)
        return {
            "success": True,
            "data": plain(page.runs),
            "next_cursor": page.next_cursor,
            "prev_cursor": page.prev_cursor,
        }

    @api.get("/runs/{run_id}", dependencies=read)
    def run(run_id: str) -> dict:
        """A run and its whole chain, oldest first."""
        with answering("Failed to read run"):
            wanted = rt.runs.parse_id(run_id)
            chain = chain_history(rt, wanted)
        this = next(a for a in chain.attempts if a.id == wanted)
        limit = limit_document(rt, this)  # SPEC §14: which limit judges it, and why
        return {"success": True, "data": {"run": plain(this), "chain": plain(chain), "limit": limit}}
