"""`stuck-runs daemon`: APScheduler 3 running the two jobs, and nothing else of substance.

The jobs call the service functions; listeners on APScheduler's events log what happened and
record each job run in the database, so `jobs/` knows nothing of the scheduler. A tick that
fires late still runs (misfire grace of one interval, coalesced, one instance at a time).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler
from loguru import logger

from db.daemons import DaemonRecords
from db.engine import describe_db_error
from jobs.errors import OperatorError
from jobs.retries import ProcessResult, process_due_retries
from jobs.runtime import Runtime
from jobs.stuck import SweepResult, sweep_stuck_runs

CHECKER = "stuck_run_checker"
PROCESSOR = "retry_processor"
HEARTBEAT = "daemon_heartbeat"
HEARTBEAT_INTERVAL = timedelta(seconds=15)
STOP_TIMEOUT = timedelta(seconds=25)  # systemd's TimeoutStopSec leaves room above this


def summarize(result: object) -> dict[str, Any]:
    """The counts a job run is recorded and logged with."""
    if isinstance(result, SweepResult):
        counts = {
            "failed": result.failed,
            "retries_scheduled": result.retries_scheduled,
            "permanently_failed": result.permanently_failed,
            "batches": result.batches,
        }
        return {**counts, "skipped": result.skipped} if result.skipped else counts
    if isinstance(result, ProcessResult):
        return {
            "superseded": len(result.superseded),
            "executed": len(result.executed),
            "completed": result.succeeded,
            "failed": result.failed,
        }
    return {}


class Daemon:
    """The scheduler, its two jobs, and the records other processes read."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.stopping = threading.Event()
        self.records = DaemonRecords(rt.runs.table.schema, rt.runs.qualified_name)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.daemon_id: int | None = None
        self._started: dict[str, datetime] = {}
        self._idle = threading.Condition()
        self._busy = 0
        self.scheduler = BlockingScheduler(
            timezone=timezone.utc, executors={"default": ThreadPoolExecutor(max_workers=4)}
        )
        settings = rt.settings
        self._add(CHECKER, self.check, rt.clock.real(settings.check_interval))
        self._add(PROCESSOR, self.process, rt.clock.real(settings.process_interval))
        self._add(HEARTBEAT, self.heartbeat, HEARTBEAT_INTERVAL)
        self.scheduler.add_listener(self._on_submitted, EVENT_JOB_SUBMITTED)
        self.scheduler.add_listener(self._on_finished, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self.scheduler.add_listener(self._on_missed, EVENT_JOB_MISSED)

    def _add(self, job_id: str, func: Callable[[], object], every: timedelta, *, first_run: bool = True) -> None:
        seconds = max(every.total_seconds(), 0.001)
        first = {"next_run_time": datetime.now(timezone.utc)} if first_run else {}
        self.scheduler.add_job(
            self._tracked(func),
            "interval",
            seconds=seconds,
            id=job_id,
            name=job_id,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=max(1, int(seconds)),
            **first,
        )

    # -- the jobs ---------------------------------------------------------------------------

    def check(self) -> SweepResult:
        return sweep_stuck_runs(self.rt, stop=self.stopping)

    def process(self) -> ProcessResult:
        return process_due_retries(self.rt, stop=self.stopping)

    def heartbeat(self) -> None:
        """Tells other processes this daemon is alive and when its jobs run next."""
        self._write(self.records.heartbeat(self.daemon_id, datetime.now(timezone.utc), self.next_runs()))

    def next_runs(self) -> dict[str, str | None]:
        return {
            job.id: job.next_run_time.isoformat() if job.next_run_time else None
            for job in self.scheduler.get_jobs()
            if job.id in (CHECKER, PROCESSOR)
        }

    def _tracked(self, func: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with self._idle:
                self._busy += 1
            try:
                return func()
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

        return run

    # -- events: logs and records -------------------------------------------------------------

    def _on_submitted(self, event: JobEvent) -> None:
        self._started[event.job_id] = datetime.now(timezone.utc)

    def _on_finished(self, event: JobEvent) -> None:
        if event.job_id == HEARTBEAT and event.exception is None:
            return
        log = logger.bind(job=event.job_id, event="job_run")
        started = self._started.pop(event.job_id, datetime.now(timezone.utc))
        if event.exception is None:
            counts, outcome, error = summarize(event.retval), "ok", None
            log.info("{} finished: {}", event.job_id, ", ".join(f"{k}={v}" for k, v in counts.items()) or "done")
        else:
            counts, outcome = {}, "error"
            error = (
                str(event.exception)
                if isinstance(event.exception, OperatorError)
                else (f"{type(event.exception).__name__}: {describe_db_error(event.exception, self.rt.engine.url)}")
            )
            log.error("{} failed: {}", event.job_id, error)
        if event.job_id == HEARTBEAT:
            return
        job = self.scheduler.get_job(event.job_id)
        next_run = job.next_run_time if job else None
        statement = self.records.job_started(self.daemon_id, event.job_id, self.host, self.pid, started)
        self._write_job_run(statement, outcome, counts, error, next_run)
        self.heartbeat()

    def _on_missed(self, event: JobEvent) -> None:
        logger.bind(job=event.job_id, event="job_missed").warning(
            "{} missed its run at {} (more than one interval late)", event.job_id, event.scheduled_run_time
        )

    def _write(self, statement: Any) -> bool:
        try:
            with self.rt.engine.begin() as conn:
                conn.execute(statement)
            return True
        except Exception as exc:  # noqa: BLE001 - a record lost in an outage must not stop the daemon
            logger.warning("could not write the daemon record: {}", describe_db_error(exc, self.rt.engine.url))
            return False

    def _write_job_run(self, started: Any, outcome: str, counts: dict, error: str | None, next_run: Any) -> None:
        try:
            with self.rt.engine.begin() as conn:
                run_id = conn.execute(started).scalar_one()
                conn.execute(
                    self.records.job_finished(run_id, datetime.now(timezone.utc), outcome, counts, error, next_run)
                )
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not record the job run: {}", describe_db_error(exc, self.rt.engine.url))

    # -- life cycle -----------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """Stop claiming work; running jobs finish their batch or put their retries back."""
        if not self.stopping.is_set():
            logger.info("stopping: finishing the current batch, putting executing retries back")
            self.stopping.set()
            self.scheduler.shutdown(wait=False)

    def run(self) -> None:
        """Runs until `request_stop` (SIGTERM, SIGINT); returns once in-flight work is safe."""
        from scheduler import _set_running

        _ = self.rt.executor  # a misconfigured executor stops the daemon before it starts
        with self.rt.engine.begin() as conn:
            self.daemon_id = conn.execute(
                self.records.register(self.host, self.pid, self.rt.clock.now(), {})
            ).scalar_one()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        _set_running(self)
        settings = self.rt.settings
        logger.info(
            "daemon started: {} every {}, {} every {}, table {}",
            CHECKER,
            settings.check_interval,
            PROCESSOR,
            settings.process_interval,
            self.rt.runs.qualified_name,
        )
        try:
            self.scheduler.start()
        finally:
            _set_running(None)
            self._wait_idle(STOP_TIMEOUT)
            self._write(self.records.stopped(self.daemon_id, self.rt.clock.now()))
            logger.info("daemon stopped")

    def _wait_idle(self, timeout: timedelta) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout.total_seconds())
