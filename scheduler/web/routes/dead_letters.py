"""The API's dead-letter routes: chains that ended permanently failed, one of them, a requeue."""

from __future__ import annotations

from fastapi import APIRouter, Query

from jobs.dead_letters import get_dead_letter, list_dead_letters, requeue
from jobs.runtime import Runtime
from jobs.settings import parse_duration
from scheduler.documents import plain
from scheduler.web.answers import answering
from scheduler.web.security import Access, Flag, on


def add_routes(api: APIRouter, rt: Runtime, access: Access) -> None:
    read, admin = access.read, access.admin

    @api.get("/dead-letters", dependencies=read)
    def dead_letters(
        limit: int = Query(50, ge=1, le=1000),
        pattern: str | None = None,
        since: str | None = None,
        include_requeued: Flag = "false",
    ) -> dict:
        """Chains that ended permanently failed, newest first (`stuck-runs dlq list`)."""
        with answering("Failed to list dead letters"):
            window = parse_duration(since, "since") if since else None
            letters = list_dead_letters(
                rt, limit=limit, pattern=pattern, since=window, include_requeued=on(include_requeued)
            )
        return {"success": True, "data": plain(letters)}

    @api.get("/dead-letters/{ref}", dependencies=read)
    def dead_letter(ref: str) -> dict:
        """One dead letter, by number or `run:<run id>`, with its traceback or stderr tail."""
        with answering("Failed to read dead letter", not_found="Dead letter not found"):
            return {"success": True, "data": plain(get_dead_letter(rt, ref))}

    @api.post("/dead-letters/{ref}/requeue", dependencies=admin)
    def requeue_letter(ref: str) -> dict:
        """Retries a dead-lettered chain with a new budget (`stuck-runs dlq requeue`)."""
        with answering("Failed to requeue dead letter", not_found="Dead letter not found"):
            scheduled = requeue(rt, ref)
        return {"success": True, "data": plain(scheduled), "message": scheduled.message}
