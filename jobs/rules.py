"""The domain rules, pure: when a retry is due, what a message says, what one attempt's failure
means for its chain.

Nothing here touches the database or the clock; `now` is always an argument, so freezegun
and plain values steer every rule. Which runs are stuck, and their fate, is decided once, in the
sweep's SQL (db/queries/sweep.py), from the message templates below; the functions here decide one
executed attempt's outcome (the processor, manual retries), and the property test holds the two
to the same budget, backoff and hours.

How counts are worded, everywhere the tool prints one (SPEC §3, §6, §10):
- An *attempt* is a row of a chain that ran: running, completed or failed. A retry still pending,
  or cancelled before it ran (superseded, by an operator), is not an attempt. "N attempts"
  counts them, the original run included: `Total attempts: 3 · final status: success`.
- A *retry* is every attempt after the original; `retry_count` is its number. "retry N/M" and
  "attempt N/M" both name retry N of a budget of M retries: `retry 2/4 scheduled`,
  `Run scheduled for retry (attempt 2/4)`, `[RETRY 2/4]`.
- SPEC's exact `permanently failed after 4 attempts` is the one text whose number counts the
  retries spent (the budget, 4), not the attempts (5, with the original): kept verbatim.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from db.messages import (  # noqa: F401 - the templates are part of the rules' vocabulary
    ATTEMPTS,
    BUDGET_SPENT,
    HOURS_FROM_SECONDS,
    MAX_DOUBLINGS,
    MINUTES_FROM_SECONDS,
    ONE_ATTEMPT,
    PERMANENT_ERROR,
    RETRY_SCHEDULED,
    STALLED_ERROR,
    STUCK_ERROR,
    STUCK_PATTERN,
    SUPERSEDED,
    TIMED_OUT,
)


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


def format_hours(duration: timedelta) -> str:
    """`1.2h`: one decimal, halves rounded up, so 07:48 to 09:00 reads 1.2h on every platform.

    In whole microseconds: exact, and cheap enough for a sweep of 100,000 runs.
    """
    micros = (duration.days * 86_400 + duration.seconds) * 1_000_000 + duration.microseconds
    tenths = (micros + _HALF_TENTH) // _TENTH if micros >= 0 else -((-micros + _HALF_TENTH) // _TENTH)
    sign = "-" if tenths < 0 else ""
    return f"{sign}{abs(tenths) // 10}.{abs(tenths) % 10}h"


_TENTH = 360_000_000  # a tenth of an hour in microseconds
_HALF_TENTH = _TENTH // 2


def format_duration(duration: timedelta) -> str:
    """A duration in a message: `1.2h` from 0.1h (6 minutes) on, below that whole minutes elapsed
    (`5m`), below a minute whole seconds (`45s`); never `0.0h`. The sweep renders the same in SQL
    (db/queries/sweep.py) from the same thresholds (db/messages.py)."""
    micros = abs(duration // timedelta(microseconds=1))
    if micros >= HOURS_FROM_SECONDS * 1_000_000:
        return format_hours(duration)
    sign = "-" if duration < timedelta(0) else ""
    seconds = micros // 1_000_000
    if seconds >= MINUTES_FROM_SECONDS:
        return f"{sign}{seconds // 60}m"
    return f"{sign}{seconds}s"


def attempts_text(attempts: int) -> str:
    """`5 attempts`, `1 attempt`."""
    return ONE_ATTEMPT if attempts == 1 else ATTEMPTS.format(count=attempts)


def format_time(value: datetime) -> str:
    """A date as people read it, everywhere: `2026-11-23 21:59 UTC` (naive values are UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def stuck_error(since: datetime, now: datetime) -> str:
    return STUCK_ERROR.format(hours=format_duration(now - since))


def stalled_error(still_for: timedelta) -> str:
    """A run (or a retry executing here) whose progress stood still for `still_for`."""
    return STALLED_ERROR.format(hours=format_duration(still_for))


def timeout_error(timeout: timedelta) -> str:
    return TIMED_OUT.format(hours=format_duration(timeout))


def superseded_message(completed_run_id: object) -> str:
    return SUPERSEDED.format(run_id=completed_run_id)


def chain_budget(is_retry: bool, row_max_retries: int, policy: RetryPolicy, *, handled: bool = False) -> int:
    """A chain's budget is fixed at its first failure that stuck-runs handled (written to the
    root's `max_retries`), and kept: retries inherit it, and a root stuck-runs already failed
    (`handled`: its failure's pattern is written) keeps it. A root never handled (failed by the
    scraper, its column at its default) takes the policy in force."""
    return row_max_retries if is_retry or handled else policy.max_retries


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
        # In float seconds, the exponent bounded: a late retry's 2^(n-1) would overflow a
        # timedelta long before the cap (2^60 s is beyond any cap; the SQL sweep bounds it alike).
        doubled = policy.retry_delay.total_seconds() * 2.0 ** min(retry_number - 1, MAX_DOUBLINGS)
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
        message = PERMANENT_ERROR.format(error=error, pattern=pattern)
        return FailureOutcome(message, pattern, budget, None, None)
    if retry_count >= budget:
        message = BUDGET_SPENT.format(error=error, attempts=retry_count)
        return FailureOutcome(message, pattern, budget, None, None)
    number = retry_count + 1
    due = now + retry_delay(policy, number, rng, retry_after)
    return FailureOutcome(
        RETRY_SCHEDULED.format(error=error, number=number, budget=budget), pattern, budget, number, due
    )


NOT_RUN = frozenset({"pending_retry", "cancelled"})  # rows of a chain that are no attempt (yet)


def count_attempts(statuses: Iterable[str]) -> int:
    """How many attempts a chain made, given its rows' statuses: the rows that ran."""
    return sum(1 for status in statuses if status not in NOT_RUN)


def run_label(what: object, retry_count: int, max_retries: int) -> str:
    """How operators name a run: `[RETRY 1/4] Data Architect in Belgium` (`what`: RUN_LABEL's text)."""
    what = str(what) if what not in (None, "") else "(no label)"
    return f"[RETRY {retry_count}/{max_retries}] {what}" if retry_count > 0 else what


def known_priority(priority: object) -> float | None:
    """A run's priority (COLUMN_MAP's `priority`) as a number; None when it has none: NULL, or NaN
    or ±Infinity (a numeric or double precision column holds them), or not a number at all."""
    try:
        number = float(priority)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
