"""`stuck-runs stats`: what retrying has achieved over a window of time.

Every retry number is of one population, the retries that ended (completed or failed) in the
window: the total, the rows by attempt, by pattern and by how they ran add up to it. Retries
pending, running or handed to the fleet now and retries cancelled before they ran are reported
beside it, never in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from db.engine import database_errors
from jobs.runtime import Runtime


@dataclass(frozen=True)
class AttemptStats:
    attempt: int  # the retry number (1 = first retry)
    retries: int  # retries with that number that ended in the window
    succeeded: int

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.retries if self.retries else None


# How a retry ran: executed by stuck-runs itself (command, callable), or handed to the fleet
# (SPEC §12) by webhook (a delivery the webhook refused too) or by its queue (`handed_off`).
HERE = "here"
WAYS = (HERE, "webhook", "queue")


@dataclass(frozen=True)
class HowStats:
    how: str  # here | webhook | queue
    retries: int  # retries that ran so and ended in the window
    succeeded: int  # completed (for a handed-off retry: the scraper wrote completed)

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.retries if self.retries else None


def by_how(rows: list[dict]) -> tuple[HowStats, ...]:
    """Every way in WAYS, in that order (zero when none ran so), then any other way found."""
    found = {row["how"] or HERE: HowStats(row["how"] or HERE, row["retries"], row["succeeded"]) for row in rows}
    ways = [*WAYS, *sorted(set(found) - set(WAYS))]
    return tuple(found.get(how, HowStats(how, 0, 0)) for how in ways)


@dataclass(frozen=True)
class PatternStats:
    pattern: str | None  # None: attempts the scraper failed itself, retried by an operator
    failures: int  # attempts that failed with this pattern in the window
    retries: int  # retries that ended in the window and retried an attempt failed with it
    retries_succeeded: int


class RetryOutcomes:
    """What `retries` ended and `succeeded` say besides: failed, and the success rate."""

    retries: int
    succeeded: int

    @property
    def failed(self) -> int:
        return self.retries - self.succeeded

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.retries if self.retries else None


@dataclass(frozen=True)
class RetryStats(RetryOutcomes):
    since: datetime
    retries: int  # retries that ended (completed or failed) in the window
    succeeded: int
    chains: int  # chains those retries belong to
    cancelled: int  # retries cancelled in the window before they ran (superseded, by an operator)
    pending: int  # retries waiting now, whenever scheduled
    running: int  # retries executing here now (not those handed to the fleet)
    handed_off_queued: int  # retries handed to the fleet, waiting in its queue now (0: STATUS_MAP maps no queued)
    handed_off_running: int  # retries handed to the fleet, running there now
    stuck_detections: int
    permanently_failed: int  # chains whose last attempt ended failed in the window, no retry coming
    by_attempt: tuple[AttemptStats, ...]
    by_pattern: tuple[PatternStats, ...]
    by_how: tuple[HowStats, ...]  # here, webhook, queue

    @property
    def retries_per_chain(self) -> float | None:
        return self.retries / self.chains if self.chains else None

    @property
    def handed_off(self) -> int:
        """Of the retries ended in the window, those handed to the fleet."""
        return sum(h.retries for h in self.by_how if h.how != HERE)

    def fleet_shown(self, hands_off: str | None) -> bool:
        """Whether to show the fleet's numbers: a retry of the window or one now was handed off, or
        `hands_off` (the settings' way: webhook, queue) says retries are."""
        return bool(self.handed_off or self.handed_off_queued or self.handed_off_running or hands_off)


def retry_stats(rt: Runtime, since: timedelta = timedelta(days=7)) -> RetryStats:
    start = rt.clock.now() - since
    q = rt.queries
    params = {"sr_since": start}
    with database_errors(rt.engine, "computing statistics"), rt.engine.connect() as conn:
        summary = conn.execute(q.stats_summary(), params).mappings().one()
        by_attempt = tuple(AttemptStats(**r) for r in conn.execute(q.stats_by_attempt(), params).mappings())
        by_pattern = tuple(PatternStats(**r) for r in conn.execute(q.stats_by_pattern(), params).mappings())
        how = by_how(list(conn.execute(q.stats_by_how(), params).mappings()))
        permanent = conn.execute(q.permanently_failed(since=True), params).scalar_one()
    return RetryStats(
        start, permanently_failed=permanent, by_attempt=by_attempt, by_pattern=by_pattern, by_how=how, **summary
    )
