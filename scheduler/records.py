"""The daemon's records: its registration, heartbeat and stop, and one `stuck_runs_job_runs` row
per job run, written from APScheduler's events so the jobs know nothing of them.

Other processes read them (`stuck-runs status`, `get_scheduler()`). A record lost in a database
outage never stops the daemon: the outage is logged when it starts and when it ends, not per write.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime, timezone
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_SUBMITTED, JobEvent
from apscheduler.schedulers.base import BaseScheduler
from loguru import logger

from db.daemons import DaemonRecords
from db.engine import describe_db_error
from jobs.runtime import Runtime
from jobs.status import job_error


def finished_run(event: JobEvent, url: Any) -> tuple[str, dict[str, Any], str | None]:
    """A finished job run as it is recorded and logged: outcome (ok | error), counts, error."""
    if event.exception is None:
        return "ok", event.retval.counts(), None
    return "error", {}, job_error(event.exception, url)


class DaemonRecorder:
    """Writes one daemon's records; subscribed to the scheduler for the runs of `recorded` jobs."""

    def __init__(self, rt: Runtime, host: str, pid: int, recorded: Collection[str]) -> None:
        self.engine = rt.engine
        self.statements = DaemonRecords(rt.runs.table.schema, rt.runs.canonical_name)
        self.host, self.pid = host, pid
        self.recorded = frozenset(recorded)
        self.daemon_id: int | None = None
        self._scheduler: BaseScheduler | None = None
        self._started: dict[str, datetime] = {}
        self._db_down = False

    def subscribe(self, scheduler: BaseScheduler) -> None:
        self._scheduler = scheduler
        scheduler.add_listener(self._on_submitted, EVENT_JOB_SUBMITTED)
        scheduler.add_listener(self._on_finished, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)

    def started_at(self, job_id: str) -> datetime:
        """When the job's current (or last) run was submitted; now if it never was."""
        return self._started.get(job_id, datetime.now(timezone.utc))

    # -- the daemon's own row ---------------------------------------------------------------

    def register(self) -> None:
        """Registers the daemon; unlike every later write, a failure here raises (nothing started)."""
        with self.engine.begin() as conn:
            statement = self.statements.register(self.host, self.pid, datetime.now(timezone.utc), {})
            self.daemon_id = conn.execute(statement).scalar_one()

    def heartbeat(self, next_runs: dict[str, str | None]) -> bool:
        """Tells other processes the daemon is alive; False if the database did not take it."""
        return self._write(self.statements.heartbeat(self.daemon_id, datetime.now(timezone.utc), next_runs))

    def stopped(self) -> bool:
        return self._write(self.statements.stopped(self.daemon_id, datetime.now(timezone.utc)))

    # -- events -----------------------------------------------------------------------------

    def _on_submitted(self, event: JobEvent) -> None:
        self._started[event.job_id] = datetime.now(timezone.utc)

    def _on_finished(self, event: JobEvent) -> None:
        if event.job_id not in self.recorded:
            return
        started = self.started_at(event.job_id)
        outcome, counts, error = finished_run(event, self.engine.url)
        job = self._scheduler.get_job(event.job_id) if self._scheduler else None
        next_run = job.next_run_time if job else None
        finished = datetime.now(timezone.utc)
        self._write(
            self.statements.job_started(self.daemon_id, event.job_id, self.host, self.pid, started),
            lambda run_id: self.statements.job_finished(run_id, finished, outcome, counts, error, next_run),
        )

    def _write(self, statement: Any, then: Callable[[Any], Any] | None = None) -> bool:
        """Writes a record; an outage is logged when it starts and when it ends, not per write."""
        try:
            with self.engine.begin() as conn:
                result = conn.execute(statement)
                if then is not None:
                    conn.execute(then(result.scalar_one()))
        except Exception as exc:  # noqa: BLE001 - a record lost in an outage must not stop the daemon
            if not self._db_down:
                logger.bind(event="records_down").warning(
                    "cannot write the daemon's records: {}", describe_db_error(exc, self.engine.url)
                )
            self._db_down = True
            return False
        if self._db_down:
            logger.bind(event="records_up").info("the database answers again")
        self._db_down = False
        return True
