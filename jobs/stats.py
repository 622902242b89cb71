"""`stuck-runs stats`: what retrying has achieved over a window of time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from db import dead_letters
from db.engine import database_errors
from jobs.runtime import Runtime


@dataclass(frozen=True)
class AttemptStats:
    attempt: int  # the retry number (1 = first retry)
    retries: int
    succeeded: int

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.retries if self.retries else None


@dataclass(frozen=True)
class PatternStats:
    pattern: str
    failures: int  # attempts that failed with this pattern
    retries: int  # retries those failures got
    retries_succeeded: int


@dataclass(frozen=True)
class RetryStats:
    since: datetime
    retries: int  # retry attempts that ended (completed or failed) in the window
    succeeded: int
    chains: int  # chains those retries belong to
    stuck_detections: int
    permanent_failures: int  # chains dead-lettered in the window
    by_attempt: tuple[AttemptStats, ...]
    by_pattern: tuple[PatternStats, ...]

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
        permanent = conn.execute(dead_letters.created_since(q.dead_letters), params).scalar_one()
    return RetryStats(start, permanent_failures=permanent, by_attempt=by_attempt, by_pattern=by_pattern, **summary)
