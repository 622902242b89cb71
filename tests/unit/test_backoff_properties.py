"""Backoff as properties: never below the policy's delay, never above the cap, Retry-After wins
only when longer."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.rules import RetryPolicy, decide_failure, retry_delay

seconds = st.integers(min_value=0, max_value=7 * 86400)
policies = st.builds(
    lambda delay, extra, backoff, jitter: RetryPolicy(
        retry_delay=timedelta(seconds=delay),
        max_delay=timedelta(seconds=delay + extra),
        backoff=backoff,
        jitter=jitter,
    ),
    seconds,
    seconds,
    st.sampled_from(["fixed", "exponential"]),
    st.floats(min_value=0, max_value=1, allow_nan=False),
)


def base(policy: RetryPolicy, number: int) -> timedelta:
    if policy.backoff == "fixed":
        return policy.retry_delay
    doubled = policy.retry_delay.total_seconds() * 2.0 ** (number - 1)
    return min(timedelta(seconds=min(doubled, policy.max_delay.total_seconds())), policy.max_delay)


@settings(max_examples=500, deadline=None)
@given(policies, st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=2**32))
def test_no_delay_below_the_policy_and_none_above_the_cap(policy, number, seed):
    delay = retry_delay(policy, number, random.Random(seed))
    assert delay >= base(policy, number)
    assert delay <= base(policy, number) * (1 + policy.jitter) + timedelta(microseconds=1)
    if policy.backoff == "exponential":
        assert delay <= policy.max_delay


@settings(max_examples=300, deadline=None)
@given(policies, st.integers(min_value=1, max_value=10), seconds, st.integers(min_value=0, max_value=2**32))
def test_retry_after_wins_only_when_longer(policy, number, after, seed):
    without = retry_delay(policy, number, random.Random(seed))
    honoured = retry_delay(policy, number, random.Random(seed), retry_after=timedelta(seconds=after))
    assert honoured == max(without, timedelta(seconds=after))


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(min_value=0, max_value=9), st.integers(min_value=0, max_value=9))
def test_a_retry_is_scheduled_exactly_while_budget_is_left(policy, retry_count, budget):
    with freeze_time("2026-11-22 09:00:00"):
        now = datetime.now(timezone.utc)
        outcome = decide_failure(
            error="HTTP 503",
            pattern="server_error",
            retry_count=retry_count,
            budget=budget,
            now=now,
            policy=policy,
            rng=random.Random(0),
        )
    if retry_count < budget:
        assert outcome.retry_number == retry_count + 1 and outcome.retry_due >= now + base(policy, retry_count + 1)
        assert outcome.message == f"HTTP 503 - retry {retry_count + 1}/{budget} scheduled"
    else:
        assert outcome.ends_chain and outcome.message == f"HTTP 503 - permanently failed after {retry_count} attempts"
