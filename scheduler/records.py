"""The job records: one `stuck_runs_job_runs` row per job run, written from the published
`JobRunsEnded` events so the jobs know nothing of them; and a daemon's own row (registration,
heartbeat, stop).

Other processes read them (`stuck-runs status`, `get_scheduler()`). A daemon's runs carry its id
and each job's next run; work done outside it (`check`, `process`, `fix`, the script, the API)
carries who ran it (`via`) in its counts. A record lost in a database outage never stops the
work: a daemon logs the outage when it starts and when it ends, not per write.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from loguru import logger

from db.daemons import DaemonRecords
from db.engine import describe_db_error
from jobs.events import DAEMON, VIA_KEY, Event, JobRunsEnded
from jobs.runtime import Runtime


class JobRecords:
    """Subscriber: writes the runs of work done outside a daemon, in one transaction per event."""

    def __init__(self, rt: Runtime) -> None:
        self.engine = rt.engine
        self.statements = DaemonRecords(rt.runs.table.schema, rt.runs.canonical_name)

    def __call__(self, event: Event) -> None:
        if not isinstance(event, JobRunsEnded) or event.via == DAEMON:
            return
        host, pid = socket.gethostname(), os.getpid()
        try:
            with self.engine.begin() as conn:
                for run in event.runs:
                    started = self.statements.job_started(None, run.job_id, host, pid, event.started)
                    run_id = conn.execute(started).scalar_one()
                    counts = {**run.counts, VIA_KEY: event.via}
                    conn.execute(
                        self.statements.job_finished(run_id, event.finished, run.outcome, counts, run.error, None)
                    )
        except Exception as exc:  # noqa: BLE001 - the work is done; only its record is lost
            logger.bind(event="records_down").warning(
                "cannot record the run of {}: {}",
                ", ".join(run.job_id for run in event.runs),
                describe_db_error(exc, self.engine.url),
            )


class DaemonRecorder:
    """Writes one daemon's records; as a subscriber, the runs of its own jobs."""

    def __init__(self, rt: Runtime, host: str, pid: int, next_run: Callable[[str], datetime | None]) -> None:
        """`next_run(job_id)`: when the scheduler runs the job next, recorded with each run."""
        self.engine = rt.engine
        self.statements = DaemonRecords(rt.runs.table.schema, rt.runs.canonical_name)
        self.host, self.pid = host, pid
        self.next_run = next_run
        self.daemon_id: int | None = None
        self._db_down = False

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

    # -- its job runs -----------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        if not isinstance(event, JobRunsEnded) or event.via != DAEMON:
            return
        for run in event.runs:
            next_run = self.next_run(run.job_id)
            self._write(
                self.statements.job_started(self.daemon_id, run.job_id, self.host, self.pid, event.started),
                lambda run_id, run=run, next_run=next_run: self.statements.job_finished(
                    run_id, event.finished, run.outcome, dict(run.counts), run.error, next_run
                ),
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
