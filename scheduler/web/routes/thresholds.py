"""The API's limits route (SPEC §14): each kind's runtimes, the limit in force and its evidence,
or the same for proposed values (`what_if`), as `stuck-runs thresholds` shows them."""

from __future__ import annotations

from fastapi import APIRouter, Query

from jobs.runtime import Runtime
from jobs.thresholds import parse_what_if, thresholds
from scheduler.documents import plain
from scheduler.web.answers import answering
from scheduler.web.security import Access


def add_routes(api: APIRouter, rt: Runtime, access: Access) -> None:
    @api.get("/thresholds", dependencies=access.read)
    def read_thresholds(
        what_if: str | None = Query(None, description="proposed values, changing nothing: jobs_de=30m,learn-margin=3"),
    ) -> dict:
        """Per kind: completed runs in the learning window, p50/p95/p99/longest runtime (seconds), the limit
        in force and its source, runs running now; completed runs over the limit and runs caught stuck."""
        with answering("Failed to read thresholds"):
            proposal = parse_what_if(what_if) if what_if is not None else None
            return {"success": True, "data": plain(thresholds(rt, proposal))}
