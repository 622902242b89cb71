"""The domain rules, pure: which run is stuck, when its retry is due, what its message says.

Nothing here touches the database or the clock; `now` is always an argument, so freezegun
and plain values steer every rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

STUCK_PATTERN = "stuck"
TIMEOUT_PATTERN = "timeout"


@dataclass(frozen=True)
class RetryPolicy:
    """How stuck runs are detected and how failed attempts are retried."""

    stuck_after: timedelta = timedelta(hours=1)
    retry_delay: timedelta = timedelta(hours=4)
    max_retries: int = 4
    backoff: str = "fixed"  # or "exponential": retry_delay * 2^(n-1), capped by max_delay
    max_delay: timedelta = timedelta(days=1)
    jitter: float = 0.0  # fraction of the delay added at random, never subtracted
    permanent_patterns: frozenset[str] = frozenset({"not_found", "forbidden"})


@dataclass(frozen=True)
class FailureOutcome:
    """What becomes of one failed attempt: its final message and, if the chain goes on, its retry."""

    message: str
    pattern: str
    budget: int  # the chain's max_retries, as written on the failed attempt
    retry_number: int | None  # the next attempt's retry_count; None when the chain ends here
    retry_due: datetime | None

    @property
    def ends_chain(self) -> bool:
        return self.retry_number is None


def is_stuck(since: datetime | None, now: datetime, stuck_after: timedelta) -> bool:
    """A run is stuck when it has made no progress for strictly longer than the threshold."""
    return since is not None and now - since > stuck_after


def format_hours(duration: timedelta) -> str:
    """`1.2h`: one decimal, halves rounded up, so 07:48 to 09:00 reads 1.2h on every platform."""
    hours = Decimal(duration.total_seconds()) / Decimal(3600)
    return f"{hours.quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}h"


def stuck_error(since: datetime, now: datetime) -> str:
    return f"Run stuck for {format_hours(now - since)}"


def timeout_error(timeout: timedelta) -> str:
    return f"Execution timed out after {format_hours(timeout)}"


def superseded_message(completed_run_id: object) -> str:
    return f"Superseded: run {completed_run_id} completed"


def chain_budget(is_retry: bool, row_max_retries: int, policy: RetryPolicy) -> int:
    """A chain's budget is fixed at its first failure: the root takes the policy's, retries inherit."""
    return row_max_retries if is_retry else policy.max_retries


def retry_delay(
    policy: RetryPolicy,
    retry_number: int,
    rng: random.Random,
    retry_after: timedelta | None = None,
) -> timedelta:
    """The wait before retry `retry_number` (1-based).

    Never below the policy's delay; with exponential backoff never above `max_delay`, jitter
    included. A `Retry-After` the site reported wins when it is longer than the policy's delay.
    """
    if policy.backoff == "exponential":
        cap = max(policy.max_delay, policy.retry_delay)
        # In float seconds: a late retry's 2^(n-1) would overflow a timedelta long before the cap.
        doubled = policy.retry_delay.total_seconds() * 2.0 ** min(retry_number - 1, 1023)
        base = min(timedelta(seconds=min(doubled, cap.total_seconds())), cap)
    else:
        base = policy.retry_delay
    delay = base + base * (policy.jitter * rng.random())
    if policy.backoff == "exponential":
        delay = min(delay, max(policy.max_delay, base))
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def decide_failure(
    *,
    error: str,
    pattern: str,
    retry_count: int,
    budget: int,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    retry_after: timedelta | None = None,
) -> FailureOutcome:
    """The fate of a failed attempt with retry number `retry_count` in a chain of budget `budget`."""
    if pattern in policy.permanent_patterns:
        message = f"{error} - not retried: permanent error ({pattern})"
        return FailureOutcome(message, pattern, budget, None, None)
    if retry_count >= budget:
        # SPEC's exact wording counts retry attempts: "after 4 attempts" for a budget of 4.
        message = f"{error} - permanently failed after {retry_count} attempts"
        return FailureOutcome(message, pattern, budget, None, None)
    number = retry_count + 1
    due = now + retry_delay(policy, number, rng, retry_after)
    return FailureOutcome(f"{error} - retry {number}/{budget} scheduled", pattern, budget, number, due)


def decide_stuck(
    *,
    since: datetime,
    now: datetime,
    retry_count: int,
    is_retry: bool,
    row_max_retries: int,
    policy: RetryPolicy,
    rng: random.Random,
) -> FailureOutcome:
    """The fate of a run found stuck: failed with `Run stuck for X.Xh`, retried while budget is left."""
    return decide_failure(
        error=stuck_error(since, now),
        pattern=STUCK_PATTERN,
        retry_count=retry_count,
        budget=chain_budget(is_retry, row_max_retries, policy),
        now=now,
        policy=policy,
        rng=rng,
    )


def run_label(search_query: object, location_query: object, retry_count: int, max_retries: int) -> str:
    """How operators name a run: `[RETRY 1/4] Data Architect in Belgium`."""
    what = " in ".join(str(part) for part in (search_query, location_query) if part not in (None, ""))
    what = what or "(no query)"
    return f"[RETRY {retry_count}/{max_retries}] {what}" if retry_count > 0 else what
