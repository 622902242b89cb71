"""What `get_scheduler()` returns: the schedule of the stuck-runs jobs, from wherever you ask.

In the daemon's own process it is the live APScheduler; anywhere else it is what the daemons
recorded in the database (their heartbeat carries each job's next run time).

Asking is cheap and leaves the caller's process as it was: `.env` is read, never loaded into
`os.environ`, and one engine serves every call of a process (built on first use, disposed by
`close()` or at interpreter exit).
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol

from db.daemons import DaemonRecords
from db.engine import database_errors, make_engine
from db.reflect import split_name
from jobs.events import JOB_IDS
from jobs.settings import Settings, environment_with_dotenv, load_settings
from jobs.status import ALIVE_WITHIN

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler
    from sqlalchemy.engine import Engine


@dataclass(frozen=True)
class ScheduledJob:
    id: str
    next_run_time: datetime | None
    host: str | None = None
    pid: int | None = None


class RunningDaemon(Protocol):
    """What the live schedule reads of the daemon running in this process (scheduler/daemon.py)."""

    host: str
    pid: int
    scheduler: BaseScheduler


_running: RunningDaemon | None = None


def set_running(daemon: RunningDaemon | None) -> None:
    """The daemon calls it as it starts and stops: `get_scheduler()` then answers from it."""
    global _running
    _running = daemon


def current_schedule() -> LiveSchedule | RecordedSchedule:
    """The live schedule while a daemon runs in this process; the recorded one (shared) else."""
    daemon = _running
    return LiveSchedule(daemon) if daemon is not None else shared_schedule


class LiveSchedule:
    """The schedule of the daemon running in this process."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self._daemon = daemon

    def get_scheduled_jobs(self) -> list[ScheduledJob]:
        return [
            ScheduledJob(job.id, job.next_run_time, self._daemon.host, self._daemon.pid)
            for job in self._daemon.scheduler.get_jobs()
            if job.id in JOB_IDS
        ]

    def close(self) -> None:
        """Nothing to release: the daemon owns its engine."""


class RecordedSchedule:
    """The schedule of the freshest live daemon, as recorded in the database.

    Settings come from `settings`, else from the environment and `.env` at each call (read, not
    loaded). One engine is kept between calls; a new database URL, or a forked child, gets its own.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._built_for: tuple[str, int] | None = None  # the URL and the process of the engine
        self._dispose: weakref.finalize | None = None

    def get_scheduled_jobs(self) -> list[ScheduledJob]:
        """Both jobs; `next_run_time` is None for a job no live daemon schedules."""
        settings = self._settings or load_settings(environment_with_dotenv())
        engine = self._engine_for(settings.require_database_url())
        records = DaemonRecords(split_name(settings.table)[0], settings.table)
        with database_errors(engine, "reading the daemons' schedule"), engine.connect() as conn:
            since = datetime.now(timezone.utc) - ALIVE_WITHIN
            daemon = conn.execute(records.alive(since)).mappings().first()
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

    def close(self) -> None:
        """Disposes of the engine, closing its connections; a later call builds a new one."""
        with self._lock:
            self._release()

    def _engine_for(self, url: str) -> Engine:
        with self._lock:
            wanted = (url, os.getpid())
            if self._engine is None or self._built_for != wanted:
                self._release()
                self._engine, self._built_for = make_engine(url, role="status", pool_size=1), wanted
                # Run by close(), by garbage collection or at interpreter exit, whichever comes first.
                self._dispose = weakref.finalize(self, _dispose, self._engine, os.getpid())
            return self._engine

    def _release(self) -> None:
        if self._dispose is not None:
            self._dispose()
        self._engine = self._built_for = self._dispose = None


def _dispose(engine: Engine, owner_pid: int) -> None:
    """Closes the engine's connections in the process that opened them; a forked child only lets
    go of them, as closing would end the parent's sessions."""
    engine.dispose(close=os.getpid() == owner_pid)


shared_schedule = RecordedSchedule()  # what `get_scheduler()` returns outside the daemon's process
