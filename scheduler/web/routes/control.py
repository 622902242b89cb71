"""The API's control routes: the stuck-run sweep on demand (`check`), pause and resume."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from fastapi import APIRouter, Query

from jobs.control import pause_retries, resume_retries
from jobs.events import CHECKER
from jobs.limits import Limits
from jobs.runtime import Runtime
from jobs.settings import parse_duration
from jobs.status import job_run
from jobs.stuck import sweep_stuck_runs
from scheduler.documents import plain
from scheduler.web.answers import ApiError, answering
from scheduler.web.security import Access, Flag, on


def add_routes(api: APIRouter, rt: Runtime, access: Access) -> None:
    admin = access.admin

    @api.post("/runs/reset-stuck", dependencies=admin)
    def reset_stuck(
        timeout_minutes: float | None = Query(
            None,
            gt=0,
            le=5_256_000,
            description="stuck after this many minutes; without it each run is judged by its limit, as `check` judges it",
        ),
        dry_run: Flag = "false",
    ) -> dict:
        """The stuck-run sweep of `check`, with this threshold or the configured one: it fails the stuck runs and schedules their retries."""
        limits = None  # each run by its own limit, as `check` judges it
        policy = rt.settings.policy  # `check`'s own: STUCK_AFTER, and each run's limit where the table keeps one
        if timeout_minutes is not None:
            if timedelta(minutes=timeout_minutes) < timedelta(seconds=1):
                raise ApiError(400, "Invalid timeout_minutes: use at least 1 second's worth (0.02)")
            policy = replace(policy, stuck_after=timedelta(minutes=timeout_minutes))
            limits = Limits.flat(policy.stuck_after)  # one flat threshold for this call (SPEC §14)
        dry_run = on(dry_run)
        with answering("Failed to reset stuck runs"), job_run(rt, (CHECKER,), dry_run=dry_run, via="api") as record:
            result = sweep_stuck_runs(rt, policy, dry_run=dry_run, keep=None, limits=limits)
            record(result)  # `status` shows it as the checker's last run, as it shows `check`'s
        if result.skipped:
            raise ApiError(409, "Another sweep is running", {"reason": result.skipped})
        attempts = result.document()["attempts"]
        verb = "Would reset" if dry_run else "Reset"
        return {
            "success": True,
            "reset_count": result.failed,
            "run_ids": [plain(rt.runs.id_from_text(a["run_id"])) for a in attempts],
            "retry_ids": [plain(rt.runs.id_from_text(a["retry_id"])) for a in attempts if a.get("retry_id")],
            "dry_run": dry_run,
            "message": f"{verb} {result.failed} stuck run(s)",
        }

    @api.post("/pause", dependencies=admin)
    def pause(
        for_: str | None = Query(None, alias="for", description="end by itself after this long, e.g. 4h"),
    ) -> dict:
        """Stops every process from starting retries (sweeps go on), as `stuck-runs pause --for 4h`."""
        with answering("Failed to pause retries"):
            state = pause_retries(rt, parse_duration(for_, "for") if for_ is not None else None, via="api")
        return {"success": True, "data": plain(state), "message": state.message}

    @api.post("/resume", dependencies=admin)
    def resume() -> dict:
        """Ends a pause, as `stuck-runs resume`."""
        with answering("Failed to resume retries"):
            ended = resume_retries(rt)
        message = "Retries resumed" if ended else "Retries were not paused; nothing changed"
        return {"success": True, "data": {"resumed": ended is not None, "pause": plain(ended)}, "message": message}
