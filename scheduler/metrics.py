"""Prometheus metrics for the daemon (METRICS_PORT), a subscriber to the events the services publish.

Counters count what happened in this process since it started; the gauges of pending and
running retries are read from the database by the heartbeat; the last successful run of each
job is a timestamp, so an alert can fire when the checker stops (`time() - ... > 2 * 3600`).

A retry handed to the fleet (SPEC §12) is counted apart, never as started, succeeded or failed
here: the scraper writes its outcome, which `stats` reads. So is one postponed because the
fleet's receiver could not take it (it stays pending, no budget spent).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from db.errors import ConfigError
from jobs.events import (
    DAEMON,
    Event,
    JobRunsEnded,
    LimitsInForce,
    PauseBegan,
    PauseEnded,
    ProcessorPassFinished,
    RetryEnded,
    RetryStarted,
    SweepFinished,
)
from jobs.limits import limit_for
from jobs.retries import ProcessResult

PREFIX = "stuck_runs"


class Metrics:
    def __init__(self, hands_off: str | None = None, intervals: Mapping[str, timedelta] | None = None) -> None:
        """`hands_off`: how this process's settings hand retries to the fleet (webhook, queue), the
        `how` of its hand-offs; None when it executes them itself. `intervals`: each job's."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.hands_off = hands_off or "unknown"

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", text, labels, registry=self.registry)

        self.stuck_detected = counter("stuck_detected", "Runs found stuck and failed by the checker")
        self.retries_scheduled = counter("retries_scheduled", "Retries scheduled (stuck runs and failed executions)")
        self.retries_started = counter("retries_started", "Retries claimed and started by this daemon")
        self.retries_succeeded = counter("retries_succeeded", "Retries that completed")
        self.retries_failed = counter("retries_failed", "Retries that failed")
        self.handed_off = counter(
            "retries_handed_off", "Retries handed to the fleet (webhook or queue), by how", ("how",)
        )
        self.postponed = counter(
            "retries_postponed", "Retries the fleet could not take, due again later (no budget spent)"
        )
        self.superseded = counter("retries_superseded", "Pending retries cancelled because their chain completed")
        self.dead_lettered = counter("dead_lettered", "Chains that ended permanently failed")
        self.job_errors = counter("job_errors", "Job runs that raised (a database outage...)", ("job",))
        self.pending = Gauge(f"{PREFIX}_pending_retries", "Retries waiting in pending_retry", registry=self.registry)
        self.running = Gauge(f"{PREFIX}_running_retries", "Retries executing here now", registry=self.registry)
        self.fleet = Gauge(
            f"{PREFIX}_handed_off_retries",
            "Retries handed to the fleet and not yet ended, by state (queued, running)",
            ("state",),
            registry=self.registry,
        )
        self.last_success = Gauge(
            f"{PREFIX}_job_last_success_timestamp_seconds",
            "When each job last finished without error (Unix time)",
            ("job",),
            registry=self.registry,
        )
        # What the monitoring kit's alerts need (monitoring/, SPEC §15): the fleet as the database
        # sees it at each heartbeat, and how often the jobs are meant to run.
        self.live_daemons = Gauge(
            f"{PREFIX}_live_daemons",
            "Daemons of the table alive (heartbeat within 60s), as this daemon reads them",
            registry=self.registry,
        )
        self.heartbeat_at = Gauge(
            f"{PREFIX}_daemon_heartbeat_timestamp_seconds",
            "When this daemon last beat (Unix time)",
            registry=self.registry,
        )
        self.started_at = Gauge(
            f"{PREFIX}_daemon_started_timestamp_seconds", "When this daemon started (Unix time)", registry=self.registry
        )
        self.started_at.set_to_current_time()
        self.paused_since = Gauge(
            f"{PREFIX}_paused_since_timestamp_seconds",
            "When the pause in force began (Unix time); 0 when not paused",
            registry=self.registry,
        )
        self.interval = Gauge(
            f"{PREFIX}_job_interval_seconds",
            "How often each job is scheduled (CHECK_INTERVAL, PROCESS_INTERVAL)",
            ("job",),
            registry=self.registry,
        )
        for job, every in (intervals or {}).items():
            self.interval.labels(job).set(every.total_seconds())

        self.limit = Gauge(
            f"{PREFIX}_limit_seconds",
            "The limit a run of each kind gets (without a max_runtime of its own), by where it comes from "
            '(configured, learned, default); kind="" is the default (STUCK_AFTER) for runs of any other kind',
            ("kind", "source"),
            registry=self.registry,
        )
        if hands_off:
            self.handed_off.labels(hands_off)  # a series from the start, so rate() sees the first one

    def serve(self, port: int) -> None:
        """Serves the exposition on `port`; a port that cannot be bound is a configuration error."""
        try:
            start_http_server(port, registry=self.registry)
        except OSError as exc:
            reason = (
                "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
            )
            raise ConfigError(
                f"METRICS_PORT={port} {reason}: choose a free port, or unset METRICS_PORT to serve no metrics"
            ) from None

    def __call__(self, event: Event) -> None:
        """Subscriber: counts what the events say happened, each piece of work once (a sweep, a
        pass's supersessions, each execution as it ends, each job run)."""
        match event:
            case SweepFinished(result) if not result.dry_run:
                self.stuck_detected.inc(result.failed)
                self.retries_scheduled.inc(result.retries_scheduled)
                self.dead_lettered.inc(result.dead_lettered)
            case ProcessorPassFinished(result):
                self.superseded.inc(len(result.superseded))  # its executions were counted as they ended
            case RetryStarted():
                self.retries_started.inc()
            case RetryEnded(outcome):
                # One handed to the fleet or postponed was never started here, and counts only as such.
                execution = ProcessResult(executed=(outcome,))
                self.retries_succeeded.inc(execution.succeeded)
                self.retries_failed.inc(execution.failed)
                if execution.handed_off:
                    self.handed_off.labels(self.hands_off).inc(execution.handed_off)
                self.postponed.inc(execution.postponed)
                self.retries_scheduled.inc(execution.retries_scheduled)
                self.dead_lettered.inc(execution.dead_lettered)
            case PauseBegan(state):
                self.paused_since.set(state.paused_at.timestamp())
            case PauseEnded():
                self.paused_since.set(0)

            case LimitsInForce(limits):
                self.limits(limits)
            case JobRunsEnded(runs, via=via) if via == DAEMON:
                for run in runs:  # an error is counted, a success stamped
                    if run.error is not None:
                        self.job_errors.labels(run.job_id).inc()
                    else:
                        self.last_success.labels(run.job_id).set_to_current_time()

    def counts(self, pending: int, running: int, handed_off_queued: int = 0, handed_off_running: int = 0) -> None:
        """The heartbeat's gauges: pending, executing here, and handed to the fleet (queued, running)."""
        self.pending.set(pending)
        self.running.set(running)
        self.fleet.labels("queued").set(handed_off_queued)
        self.fleet.labels("running").set(handed_off_running)

    def health(self, live_daemons: int, paused_at: datetime | None) -> None:
        """The heartbeat's view of the fleet: daemons alive, the pause in force; and that it beat."""
        self.live_daemons.set(live_daemons)
        self.paused_since.set(paused_at.timestamp() if paused_at else 0)
        self.heartbeat_at.set_to_current_time()

    def limits(self, limits: object) -> None:
        """One series per kind with a limit of its own, and the default; a kind whose limit went away
        (or changed source) loses its old series."""
        series = {("", "default"): limits.default}
        for kind in {*limits.configured, *limits.learned}:
            applied = limit_for(limits, kind)
            series[(kind, applied.source)] = applied.limit
        self.limit.clear()
        for (kind, source), limit in series.items():
            self.limit.labels(kind, source).set(limit.total_seconds())
