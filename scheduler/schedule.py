"""What `get_scheduler()` returns: the schedule of the stuck-runs jobs, from wherever you ask.

In the daemon's own process it is the live APScheduler; anywhere else it is what the daemons
recorded in the database (their heartbeat carries each job's next run time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from db.daemons import DaemonRecords
from db.engine import database_errors, make_engine
from db.table import split_name
from jobs.config import Settings, settings_from_environment
from jobs.status import ALIVE_WITHIN, JOB_IDS

if TYPE_CHECKING:
    from scheduler.daemon import Daemon


@dataclass(frozen=True)
class ScheduledJob:
    id: str
    next_run_time: datetime | None
    host: str | None = None
    pid: int | None = None


class LiveSchedule:
    """The schedule of the daemon running in this process."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def get_scheduled_jobs(self) -> list[ScheduledJob]:
        return [
            ScheduledJob(job.id, job.next_run_time, self._daemon.host, self._daemon.pid)
            for job in self._daemon.scheduler.get_jobs()
            if job.id in JOB_IDS
        ]


class RecordedSchedule:
    """The schedule of the freshest live daemon, as recorded in the database."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings

    def get_scheduled_jobs(self) -> list[ScheduledJob]:
        """Both jobs; `next_run_time` is None for a job no live daemon schedules."""
        settings = self._settings or settings_from_environment()
        engine = make_engine(settings.require_database_url(), role="status", pool_size=1)
        records = DaemonRecords(split_name(settings.table)[0], settings.table)
        try:
            with database_errors(engine, "reading the daemons' schedule"), engine.connect() as conn:
                since = datetime.now(timezone.utc) - ALIVE_WITHIN
                daemon = conn.execute(records.alive(since)).mappings().first()
        finally:
            engine.dispose()
        planned = (daemon or {}).get("jobs") or {}
        return [
            ScheduledJob(
                job_id,
                datetime.fromisoformat(planned[job_id]) if planned.get(job_id) else None,
                daemon["host"] if daemon else None,
                daemon["pid"] if daemon else None,
            )
            for job_id in JOB_IDS
        ]
