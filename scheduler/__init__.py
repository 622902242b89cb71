"""The daemon side of stuck-runs.

Monitoring entry, in any process:

    from scheduler import get_scheduler
    for job in get_scheduler().get_scheduled_jobs():
        print(job.id, job.next_run_time)

Asking changes nothing in the caller's process (`.env` is read, not loaded into `os.environ`),
and every call shares one engine; `get_scheduler().close()` releases it before exit if need be.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.schedule import LiveSchedule, RecordedSchedule

__all__ = ["get_scheduler", "ScheduledJob"]


def get_scheduler() -> LiveSchedule | RecordedSchedule:
    """The live schedule in the daemon's process; the recorded one (from the database) elsewhere,
    the same object at every call."""
    # Imported here: the CLI lives in this package, and `stuck-runs --help` should not load SQLAlchemy.
    from scheduler.schedule import current_schedule

    return current_schedule()


def __getattr__(name: str) -> Any:
    if name == "ScheduledJob":
        from scheduler.schedule import ScheduledJob

        return ScheduledJob
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
