"""Backoff as properties: never below the policy's delay, never above the cap, Retry-After wins
only when longer."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone

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


def cap(policy: RetryPolicy) -> timedelta | None:
    """The most an exponential delay may be (the cap never undercuts the policy's delay)."""
    return max(policy.max_delay, policy.retry_delay) if policy.backoff == "exponential" else None


@settings(max_examples=500, deadline=None)
@given(policies, st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=2**32))
def test_no_delay_below_the_policy_and_none_above_the_cap(policy, number, seed):
    delay = retry_delay(policy, number, random.Random(seed))
    assert delay >= policy.retry_delay
    if cap(policy) is not None:
        assert delay <= cap(policy)
    else:
        assert delay <= policy.retry_delay * (1 + policy.jitter) + timedelta(microseconds=1)


@settings(max_examples=500, deadline=None)
@given(policies, st.integers(min_value=1, max_value=40))
def test_without_jitter_each_exponential_delay_doubles_the_last_until_the_cap(policy, number):
    steady = replace(policy, jitter=0.0)
    this, following = (retry_delay(steady, n, random.Random(0)) for n in (number, number + 1))
    assert retry_delay(steady, 1, random.Random(0)) == policy.retry_delay
    if policy.backoff == "fixed":
        assert this == following == policy.retry_delay
    else:
        assert following == min(this * 2, cap(policy))


@settings(max_examples=500, deadline=None)
@given(policies, st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=2**32))
def test_jitter_only_adds_up_to_its_fraction_of_the_steady_delay(policy, number, seed):
    steady = retry_delay(replace(policy, jitter=0.0), number, random.Random(seed))
    delay = retry_delay(policy, number, random.Random(seed))
    assert steady <= delay <= steady * (1 + policy.jitter) + timedelta(microseconds=1)


@settings(max_examples=300, deadline=None)
@given(policies, st.integers(min_value=1, max_value=10), seconds, st.integers(min_value=0, max_value=2**32))
def test_retry_after_wins_only_when_longer(policy, number, after, seed):
    without = retry_delay(policy, number, random.Random(seed))
    honoured = retry_delay(policy, number, random.Random(seed), retry_after=timedelta(seconds=after))
    assert honoured == max(without, timedelta(seconds=after))


@settings(max_examples=200, deadline=None)
@given(policies, st.integers(min_value=0, max_value=9), st.integers(min_value=0, max_value=9))
def test_a_retry_is_scheduled_exactly_while_budget_is_left(policy, retry_count, budget):
    now = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
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
        assert outcome.retry_number == retry_count + 1 and outcome.retry_due >= now + policy.retry_delay
        assert outcome.message == f"HTTP 503 - retry {retry_count + 1}/{budget} scheduled"
    else:
        assert outcome.ends_chain and outcome.message == f"HTTP 503 - permanently failed after {retry_count} attempts"
