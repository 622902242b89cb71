"""The daemon side of stuck-runs.

Monitoring entry, in any process:

    from scheduler import get_scheduler
    for job in get_scheduler().get_scheduled_jobs():
        print(job.id, job.next_run_time)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.schedule import LiveSchedule, RecordedSchedule, ScheduledJob

if TYPE_CHECKING:
    from scheduler.daemon import Daemon

_running: Daemon | None = None

__all__ = ["get_scheduler", "ScheduledJob"]


def _set_running(daemon: Daemon | None) -> None:
    global _running
    _running = daemon


def get_scheduler() -> LiveSchedule | RecordedSchedule:
    """The live schedule in the daemon's process; the recorded one (from the database) elsewhere."""
    return LiveSchedule(_running) if _running is not None else RecordedSchedule()
