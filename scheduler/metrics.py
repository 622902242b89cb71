"""Prometheus metrics for the daemon (METRICS_PORT), fed by the results the services return.

Counters count what happened in this process since it started; the gauges of pending and
running retries are read from the database by the heartbeat; the last successful run of each
job is a timestamp, so an alert can fire when the checker stops (`time() - ... > 2 * 3600`).
"""

from __future__ import annotations

import errno

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from jobs.errors import ConfigError
from jobs.retries import ProcessResult, RetryOutcome
from jobs.stuck import SweepResult

PREFIX = "stuck_runs"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", text, labels, registry=self.registry)

        self.stuck_detected = counter("stuck_detected", "Runs found stuck and failed by the checker")
        self.retries_scheduled = counter("retries_scheduled", "Retries scheduled (stuck runs and failed executions)")
        self.retries_started = counter("retries_started", "Retries claimed and started by this daemon")
        self.retries_succeeded = counter("retries_succeeded", "Retries that completed")
        self.retries_failed = counter("retries_failed", "Retries that failed")
        self.superseded = counter("retries_superseded", "Pending retries cancelled because their chain completed")
        self.dead_lettered = counter("dead_lettered", "Chains that ended permanently failed")
        self.job_errors = counter("job_errors", "Job runs that raised (a database outage...)", ("job",))
        self.pending = Gauge(f"{PREFIX}_pending_retries", "Retries waiting in pending_retry", registry=self.registry)
        self.running = Gauge(f"{PREFIX}_running_retries", "Retries executing now", registry=self.registry)
        self.last_success = Gauge(
            f"{PREFIX}_job_last_success_timestamp_seconds",
            "When each job last finished without error (Unix time)",
            ("job",),
            registry=self.registry,
        )

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

    def job_finished(self, job_id: str, result: object, error: BaseException | None) -> None:
        if error is not None:
            self.job_errors.labels(job_id).inc()
            return
        self.last_success.labels(job_id).set_to_current_time()
        if isinstance(result, SweepResult):
            self.stuck_detected.inc(result.failed)
            self.retries_scheduled.inc(result.retries_scheduled)
            self.dead_lettered.inc(result.permanently_failed)
        elif isinstance(result, ProcessResult):
            self.superseded.inc(len(result.superseded))

    def retry_event(self, event: str, payload: object) -> None:
        """Called by the retry slots: 'started' with the run, 'finished' with its outcome."""
        if event == "started":
            self.retries_started.inc()
        elif event == "finished" and isinstance(payload, RetryOutcome):
            if payload.status == "completed":
                self.retries_succeeded.inc()
            elif payload.status == "failed":
                self.retries_failed.inc()
                if payload.retry_due is not None:
                    self.retries_scheduled.inc()
                if payload.dead_lettered:
                    self.dead_lettered.inc()

    def counts(self, pending: int, running: int) -> None:
        self.pending.set(pending)
        self.running.set(running)
