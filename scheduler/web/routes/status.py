"""The API's status routes: health (no token), daemons and jobs, retry stats, the hourly timeline."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from jobs.runtime import Runtime
from jobs.settings import parse_duration
from jobs.stats import retry_stats
from jobs.status import read_status
from jobs.targets import stats_by
from jobs.timeline import hourly_timeline
from scheduler.documents import plain
from scheduler.web.answers import answering, failure
from scheduler.web.security import Access


def add_routes(api: APIRouter, rt: Runtime, access: Access) -> None:
    read = access.read

    @api.get("/health", dependencies=access.anyone)
    def health() -> Any:
        """Whether this server can answer: it and its database; needs no token. 503 when the database cannot be reached."""
        try:
            with rt.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception:  # noqa: BLE001 - any failure is "cannot answer"; the reason is not a client's
            return failure(503, "Database unavailable")
        return {"success": True, "status": "ok"}

    @api.get("/status", dependencies=read)
    def status() -> dict:
        """Daemons alive, each job's last and next run, and the run counts (`stuck-runs status`):
        `running_retries` executing here, `handed_off_queued` / `handed_off_running` at the fleet."""
        with answering("Failed to read status"):
            return {"success": True, "data": plain(read_status(rt))}

    @api.get("/stats", dependencies=read)
    def stats(
        since: str = Query("7d", description="a window such as 24h or 7d"),
        by: str | None = Query(None, description="target, kind or a column: per group, worst first"),
        limit: int = Query(20, ge=1, le=10_000, description="groups, with `by`"),
    ) -> dict:
        """Retry metrics over the window (`stuck-runs stats`), `by_how` they ran: here, webhook, queue.
        With `by` (`stuck-runs stats --by`): per target, kind or column, worst first."""
        with answering("Failed to read stats"):
            window = parse_duration(since, "since")
            if by is not None:
                return {"success": True, "data": plain(stats_by(rt, by, window, limit))}
            return {"success": True, "data": plain(retry_stats(rt, window))}

    @api.get("/stats/hourly", dependencies=read)
    def hourly(since: str = Query("7d", description="a window of at most 31d")) -> dict:
        """Per UTC hour, oldest first, every hour present: retries succeeded and failed, stuck detections."""
        with answering("Failed to read the hourly timeline"):
            return {"success": True, "data": plain(hourly_timeline(rt, parse_duration(since, "since")))}
