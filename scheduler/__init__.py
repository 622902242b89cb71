"""The daemon side of stuck-runs.

Monitoring entry, in any process:

    from scheduler import get_scheduler
    for job in get_scheduler().get_scheduled_jobs():
        print(job.id, job.next_run_time)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.daemon import Daemon
    from scheduler.schedule import LiveSchedule, RecordedSchedule

_running: Daemon | None = None

__all__ = ["get_scheduler", "ScheduledJob"]


def _set_running(daemon: Daemon | None) -> None:
    global _running
    _running = daemon


def get_scheduler() -> LiveSchedule | RecordedSchedule:
    """The live schedule in the daemon's process; the recorded one (from the database) elsewhere."""
    # Imported here: the CLI lives in this package, and `stuck-runs --help` should not load SQLAlchemy.
    from scheduler.schedule import LiveSchedule, RecordedSchedule

    return LiveSchedule(_running) if _running is not None else RecordedSchedule()


def __getattr__(name: str) -> Any:
    if name == "ScheduledJob":
        from scheduler.schedule import ScheduledJob

        return ScheduledJob
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
