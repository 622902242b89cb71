"""`stuck-runs daemon`: APScheduler 3 running the two jobs, and nothing else of substance.

The jobs call the service functions `check` and `process` call; each job run is published
(`JobRunsEnded`) beside what the services publish, and the daemon's subscribers log it, count
it (metrics), tell systemd and write its record (scheduler/records.py). Retries execute beside
the scheduler (`ContinuousDispatch`), so a long scrape never delays the stuck checker. A tick that fires late
still runs (misfire grace of one interval, coalesced, one instance at a time). The watchdog is
fed by a job the scheduler itself dispatches, so a wedged scheduler gets the daemon restarted.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.blocking import BlockingScheduler
from loguru import logger

from db.errors import DatabaseUnavailable
from jobs.events import CHECKER, DAEMON, JOB_IDS, PROCESSOR, JobRun, JobRunsEnded
from jobs.fleet_health import fleet_health
from jobs.limits import runtime_judging_params
from jobs.retries import ProcessResult, process_due_retries
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.status import job_error
from jobs.stuck import SweepResult, sweep_stuck_runs
from scheduler.dispatch import ContinuousDispatch
from scheduler.logs import log_daemon_event
from scheduler.metrics import Metrics
from scheduler.notify import JobsStatus, Notifier
from scheduler.records import DaemonRecorder
from scheduler.schedule import set_running
from scheduler.wiring import wire

HEARTBEAT = "daemon_heartbeat"
WATCHDOG = "systemd_watchdog"
HEARTBEAT_INTERVAL = timedelta(seconds=15)
STOP_TIMEOUT = timedelta(seconds=25)  # systemd's TimeoutStopSec (45 s) leaves room above this
STARTUP_RETRY = timedelta(seconds=5)


class Daemon:
    """The scheduler, its two jobs, the retry slots, and the records other processes read."""

    def __init__(
        self,
        rt: Runtime,
        notifier: Notifier | None = None,
        stopping: threading.Event | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.rt = rt
        self.notifier = notifier or Notifier({})
        self.stopping = stopping or threading.Event()
        self.metrics = metrics
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.records = DaemonRecorder(rt, self.host, self.pid, self._next_run)
        self.dispatch = ContinuousDispatch(rt, self.stopping)
        self._ready = False
        self._stop_lock = threading.Lock()
        self._stop_requested = False
        self._started: dict[str, datetime] = {}
        self._idle = threading.Condition()
        self._busy = 0
        self.scheduler = BlockingScheduler(timezone=timezone.utc, executors={"default": ThreadPoolExecutor(4)})
        settings = rt.settings
        self._add(CHECKER, self.check, rt.clock.real(settings.check_interval))
        self._add(PROCESSOR, self.process, rt.clock.real(settings.process_interval))
        self._add(HEARTBEAT, self.heartbeat, HEARTBEAT_INTERVAL)
        if self.notifier.watchdog_interval:
            # Its own job, never held up by a slow database: only a scheduler that stopped
            # dispatching jobs stops feeding it.
            self._add(WATCHDOG, self.notifier.watchdog, self.notifier.watchdog_interval)
        self.scheduler.add_listener(self._on_submitted, EVENT_JOB_SUBMITTED)
        self.scheduler.add_listener(self._on_finished, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self.scheduler.add_listener(self._on_missed, EVENT_JOB_MISSED)
        wire(rt, watch=self.stopping)  # a daemon watches: it sends the notifications that are due
        # In this order, as they always came: counted, logged, told systemd, recorded.
        subscribers = ([metrics] if metrics else []) + [log_daemon_event, JobsStatus(self.notifier, self.stopping)]
        self._unsubscribe = [rt.events.subscribe(s) for s in (*subscribers, self.records)]

    def _add(self, job_id: str, func: Callable[[], object], every: timedelta) -> None:
        seconds = max(every.total_seconds(), 0.001)
        self.scheduler.add_job(
            self._tracked(func),
            "interval",
            seconds=seconds,
            id=job_id,
            name=job_id,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=max(1, int(seconds)),
            next_run_time=datetime.now(timezone.utc),
        )

    # -- the jobs ---------------------------------------------------------------------------

    def check(self) -> SweepResult:
        return sweep_stuck_runs(self.rt, stop=self.stopping)

    def process(self) -> ProcessResult:
        """`process`'s pass, the floor under continuous dispatch: the slots execute the due
        retries, and the pass reports what they finished since the last."""
        return process_due_retries(self.rt, stop=self.stopping, dispatch=self.dispatch.tick)

    def heartbeat(self) -> None:
        """Tells other processes this daemon is alive and when its jobs run next; READY=1 once."""
        if self.stopping.is_set():  # a stop that came while the scheduler was starting
            self._shutdown_scheduler()
            return
        if self.metrics is not None:
            self._count_for_metrics()
        if self.records.heartbeat(self.next_runs()):
            if not self._ready:
                self._ready = True
                self.notifier.ready(f"running; table {self.rt.runs.qualified_name}")

    def _count_for_metrics(self) -> None:
        try:
            with self.rt.engine.connect() as conn:
                counts = conn.execute(self.rt.queries.counts(), runtime_judging_params(self.rt)).mappings().one()
                health = fleet_health(self.rt, conn)
        except Exception:  # noqa: BLE001 - the records' write below reports the outage
            return
        handed = counts["handed_off_queued"], counts["handed_off_running"]
        self.metrics.counts(counts["pending_retry"], counts["running_retries"], *handed)
        self.metrics.health(health.live_daemons, health.paused_at)

    def next_runs(self) -> dict[str, str | None]:
        return {
            job.id: job.next_run_time.isoformat() if job.next_run_time else None
            for job in self.scheduler.get_jobs()
            if job.id in JOB_IDS
        }

    def _next_run(self, job_id: str) -> datetime | None:
        job = self.scheduler.get_job(job_id)
        return job.next_run_time if job else None

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

    # -- APScheduler's events, published as job runs ---------------------------------------

    def _on_submitted(self, event: JobEvent) -> None:
        self._started[event.job_id] = datetime.now(timezone.utc)

    def _on_finished(self, event: JobEvent) -> None:
        if event.job_id not in JOB_IDS:
            return
        now = datetime.now(timezone.utc)
        if event.exception is None:
            run = JobRun(event.job_id, "ok", event.retval.counts())
        else:
            run = JobRun(event.job_id, "error", {}, job_error(event.exception, self.rt.engine.url))
        self.rt.events.publish(JobRunsEnded((run,), self._started.get(event.job_id, now), now, DAEMON))

    def _on_missed(self, event: JobEvent) -> None:
        logger.bind(job=event.job_id, event="job_missed").warning(
            "{} missed its run at {} (more than one interval late)", event.job_id, event.scheduled_run_time
        )

    # -- life cycle -------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        """Stop claiming work; a sweep finishes its batch, executing retries go back.

        Call it from any thread but the scheduler's own (not from a signal handler).
        """
        with self._stop_lock:
            if self._stop_requested:
                return
            self._stop_requested = True
        logger.info("stopping: finishing the current batch, putting executing retries back")
        self.notifier.stopping()
        self.stopping.set()
        self.dispatch.poke()
        self._shutdown_scheduler()

    def _shutdown_scheduler(self) -> None:
        try:
            self.scheduler.shutdown(wait=False)
        except SchedulerNotRunningError:
            pass  # not started yet: run() sees `stopping` and does not start it

    def run(self) -> None:
        """Runs until `request_stop`; returns once in-flight work is safe."""
        _ = self.rt.executor  # a misconfigured executor stops the daemon before it starts
        self.records.register()
        set_running(self)
        settings = self.rt.settings
        logger.info(
            "daemon started: {} every {}, {} every {}, {} retry slot(s), table {}",
            CHECKER,
            settings.check_interval,
            PROCESSOR,
            settings.process_interval,
            settings.max_concurrent_retries,
            self.rt.runs.qualified_name,
        )
        self.dispatch.start()
        try:
            if not self.stopping.is_set():
                self.scheduler.start()
        finally:
            set_running(None)
            deadline = time.monotonic() + STOP_TIMEOUT.total_seconds()
            with self._idle:
                self._idle.wait_for(lambda: self._busy == 0, STOP_TIMEOUT.total_seconds())
            if not self.dispatch.join(timedelta(seconds=max(0.0, deadline - time.monotonic()))):
                logger.warning("a retry slot was still busy at the stop deadline")
            self.records.stopped()
            for unsubscribe in self._unsubscribe:
                unsubscribe()
            self.notifier.close()
            logger.info("daemon stopped")


def run_daemon(settings: Settings, *, role: str = "daemon") -> None:
    """The `daemon` command: waits for the database if it must, then runs until SIGTERM/SIGINT."""
    notifier = Notifier()
    stopping = threading.Event()
    daemon: Daemon | None = None

    def on_signal(*_: object) -> None:
        stopping.set()
        if daemon is not None:
            # Not from the handler itself: it interrupts the main thread, which may be inside the
            # scheduler's job processing; a shutdown there would pull the jobs from under it.
            threading.Thread(target=daemon.request_stop, name="stop", daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    metrics = None
    if settings.metrics_port:  # bound first: a port in use stops the daemon before it touches the database
        metrics = Metrics(settings.hands_off, {CHECKER: settings.check_interval, PROCESSOR: settings.process_interval})
        metrics.serve(settings.metrics_port)
        logger.info("Prometheus metrics on port {}", settings.metrics_port)
    runtime = None
    while runtime is None and not stopping.is_set():
        try:
            runtime = Runtime.open(settings, role=role, executes=True)
        except DatabaseUnavailable as exc:
            logger.error("{}; trying again in {}s", exc, int(STARTUP_RETRY.total_seconds()))
            notifier.status(f"waiting for the database: {exc}")
            stopping.wait(STARTUP_RETRY.total_seconds())
    if runtime is None:
        return
    try:
        daemon = Daemon(runtime, notifier, stopping, metrics)
        daemon.run()
    finally:
        runtime.close()
