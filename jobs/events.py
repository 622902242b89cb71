"""What the services tell the rest of the process, as typed events, and who listens.

The services publish (a sweep finished, a retry started or ended, a pause began...); the edges
subscribe what they need: the daemon its logs, metrics, records and systemd status, the CLI its
progress lines and job records (scheduler/wiring.py). A new listener (notifications, SPEC §15)
is one more subscription, and no service changes.

Delivery is synchronous, in the publisher's thread and in subscription order, so a subscriber
sees events in the order they happened. A subscriber that raises is logged and skipped: what it
failed to note never stops the work that published it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from loguru import logger

from jobs.model import Run

CHECKER = "stuck_run_checker"
PROCESSOR = "retry_processor"
JOB_IDS = (CHECKER, PROCESSOR)  # the two jobs, as the daemon schedules them and the records name them
DAEMON = "daemon"  # the `via` of a daemon's own job runs
VIA_KEY = "via"  # in a recorded run's counts: what started work outside the daemon (no column of its own)


# Every service imports this module (through the runtime, which carries the process's `Events`),
# so it imports none of them: the results an event carries are described by what subscribers read
# of them (jobs.stuck.SweepResult, jobs.retries.ProcessResult, jobs.outcomes.RetryOutcome,
# jobs.control.PauseState are what the services publish).


class SweepReport(Protocol):
    failed: int
    retries_scheduled: int
    dead_lettered: int
    dry_run: bool


class PassReport(Protocol):
    superseded: tuple
    waiting: Any  # jobs.waiting.Waiting | None: why due retries did not start


class AttemptReport(Protocol):
    run_id: Any
    label: str
    status: str
    delivered: bool
    failed_at_fleet: bool
    retry_due: datetime | None
    dead_lettered: bool


class PauseReport(Protocol):
    paused_at: datetime
    until: datetime | None
    paused_by: str

    @property
    def message(self) -> str: ...


@dataclass(frozen=True)
class SweepFinished:
    """A stuck-run sweep ended (a dry run too: `result.dry_run`)."""

    result: SweepReport  # a jobs.stuck.SweepResult


@dataclass(frozen=True)
class ProcessorPassFinished:
    """A retry processor pass ended: its supersessions, and the executions it reports (a dry
    run changes nothing and is not published)."""

    result: PassReport  # a jobs.retries.ProcessResult


@dataclass(frozen=True)
class RetryStarted:
    """A retry was claimed and its scraper started here."""

    run: Run


@dataclass(frozen=True)
class RetryEnded:
    """A retry's attempt ended here: executed, delivered, handed over, postponed, put back."""

    outcome: AttemptReport  # a jobs.outcomes.RetryOutcome


@dataclass(frozen=True)
class PauseBegan:
    state: PauseReport  # a jobs.control.PauseState


@dataclass(frozen=True)
class PauseEnded:
    state: PauseReport  # the pause that ended


@dataclass(frozen=True)
class JobRun:
    """One job's part of a run of work, as it is recorded."""

    job_id: str
    outcome: str  # ok | error
    counts: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None  # one line, never a password

    @property
    def summary(self) -> str:
        """`failed=1, retries_scheduled=1, ...` (`done` when it counts nothing), or `error: ...`."""
        if self.error is not None:
            return f"error: {self.error}"
        return ", ".join(f"{k}={v}" for k, v in self.counts.items()) or "done"


@dataclass(frozen=True)
class JobRunsEnded:
    """Work of the jobs ended: a daemon's tick (one job), or `check`, `process`, `fix`, the
    script or the API outside it (`fix` is a run of both jobs, recorded together)."""

    runs: tuple[JobRun, ...]
    started: datetime
    finished: datetime
    via: str  # daemon, cli (also the manual script), api


@dataclass(frozen=True)
class LimitsInForce:
    """A process read the limits in force (SPEC §14): the default, by kind configured and learned."""

    limits: Any  # a jobs.limits.Limits


Event = (
    SweepFinished
    | ProcessorPassFinished
    | RetryStarted
    | RetryEnded
    | PauseBegan
    | PauseEnded
    | JobRunsEnded
    | LimitsInForce
)
Subscriber = Callable[[Event], None]


class Events:
    """A process's subscribers, told every published event in turn."""

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Adds `subscriber` (after those already there); returns what removes it again."""
        with self._lock:
            self._subscribers += (subscriber,)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    def publish(self, event: Event) -> None:
        for subscriber in self._subscribers:  # a snapshot: subscribing meanwhile is safe
            try:
                subscriber(event)
            except Exception as exc:  # noqa: BLE001 - a listener's failure must not stop the work
                name = getattr(subscriber, "__qualname__", None) or type(subscriber).__qualname__
                logger.bind(event="subscriber_error").error(
                    "{} failed on {}: {}: {}", name, type(event).__name__, type(exc).__name__, exc
                )
