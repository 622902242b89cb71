"""`stuck-runs stats`: what retrying has achieved over a window of time.

Every retry number is of one population, the retries that ended (completed or failed) in the
window: the total, the rows by attempt and the rows by pattern add up to it. Retries pending or
running now and retries cancelled before they ran are reported beside it, never in it.
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


@dataclass(frozen=True)
class PatternStats:
    pattern: str | None  # None: attempts the scraper failed itself, retried by an operator
    failures: int  # attempts that failed with this pattern in the window
    retries: int  # retries that ended in the window and retried an attempt failed with it
    retries_succeeded: int


@dataclass(frozen=True)
class RetryStats:
    since: datetime
    retries: int  # retries that ended (completed or failed) in the window
    succeeded: int
    chains: int  # chains those retries belong to
    cancelled: int  # retries cancelled in the window before they ran (superseded, by an operator)
    pending: int  # retries waiting now, whenever scheduled
    running: int  # retries executing now
    stuck_detections: int
    permanently_failed: int  # chains whose last attempt ended failed in the window, no retry coming
    by_attempt: tuple[AttemptStats, ...]
    by_pattern: tuple[PatternStats, ...]

    @property
    def failed(self) -> int:
        return self.retries - self.succeeded

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.retries if self.retries else None

    @property
    def retries_per_chain(self) -> float | None:
        return self.retries / self.chains if self.chains else None


def retry_stats(rt: Runtime, since: timedelta = timedelta(days=7)) -> RetryStats:
    start = rt.clock.now() - since
    q = rt.queries
    params = {"sr_since": start}
    with database_errors(rt.engine, "computing statistics"), rt.engine.connect() as conn:
        summary = conn.execute(q.stats_summary(), params).mappings().one()
        by_attempt = tuple(AttemptStats(**r) for r in conn.execute(q.stats_by_attempt(), params).mappings())
        by_pattern = tuple(PatternStats(**r) for r in conn.execute(q.stats_by_pattern(), params).mappings())
        permanent = conn.execute(q.permanently_failed(since=True), params).scalar_one()
    return RetryStats(start, permanently_failed=permanent, by_attempt=by_attempt, by_pattern=by_pattern, **summary)
