"""The pure rules: stuck or not, the delay, the exact messages."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from freezegun import freeze_time

from jobs.rules import (
    RetryPolicy,
    decide_failure,
    decide_stuck,
    format_hours,
    is_stuck,
    retry_delay,
    run_label,
    superseded_message,
    timeout_error,
)

UTC = timezone.utc
NINE = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


def test_a_run_is_stuck_only_strictly_after_the_threshold():
    hour = timedelta(hours=1)
    assert not is_stuck(NINE - hour, NINE, hour)
    assert is_stuck(NINE - hour - timedelta(microseconds=1), NINE, hour)
    assert not is_stuck(None, NINE, hour)


@pytest.mark.parametrize(
    ("minutes", "text"),
    [(72, "1.2h"), (60, "1.0h"), (120, "2.0h"), (63, "1.1h"), (69, "1.2h"), (0, "0.0h"), (6000, "100.0h")],
)
def test_hours_have_one_decimal_and_round_halves_up(minutes, text):
    assert format_hours(timedelta(minutes=minutes)) == text


def test_the_example_run_started_at_0748_reads_stuck_for_1_2h_at_nine():
    outcome = decide_stuck(
        since=datetime(2026, 11, 22, 7, 48, tzinfo=UTC),
        now=NINE,
        retry_count=0,
        is_retry=False,
        row_max_retries=4,
        policy=RetryPolicy(),
        rng=random.Random(1),
    )
    assert outcome.message == "Run stuck for 1.2h - retry 1/4 scheduled"
    assert outcome.retry_number == 1
    assert outcome.retry_due == datetime(2026, 11, 22, 13, 0, tzinfo=UTC)
    assert outcome.pattern == "stuck"


def test_budget_spent_message_and_no_retry():
    outcome = decide_stuck(
        since=NINE - timedelta(minutes=72),
        now=NINE,
        retry_count=4,
        is_retry=True,
        row_max_retries=4,
        policy=RetryPolicy(),
        rng=random.Random(1),
    )
    assert outcome.message == "Run stuck for 1.2h - permanently failed after 4 attempts"
    assert outcome.ends_chain and outcome.retry_due is None


def test_the_budget_is_the_policys_for_a_root_and_inherited_by_retries():
    policy = RetryPolicy(max_retries=2)
    root = decide_stuck(
        since=NINE - timedelta(hours=2),
        now=NINE,
        retry_count=0,
        is_retry=False,
        row_max_retries=4,
        policy=policy,
        rng=random.Random(),
    )
    assert (root.budget, root.message) == (2, "Run stuck for 2.0h - retry 1/2 scheduled")
    retry = decide_stuck(
        since=NINE - timedelta(hours=2),
        now=NINE,
        retry_count=1,
        is_retry=True,
        row_max_retries=3,
        policy=policy,
        rng=random.Random(),
    )
    assert (retry.budget, retry.message) == (3, "Run stuck for 2.0h - retry 2/3 scheduled")


@pytest.mark.parametrize(
    ("pattern", "retry_count", "message"),
    [
        ("server_error", 1, "HTTP 503 - retry 2/4 scheduled"),
        ("server_error", 4, "HTTP 503 - permanently failed after 4 attempts"),
        ("not_found", 1, "HTTP 503 - not retried: permanent error (not_found)"),
        ("forbidden", 0, "HTTP 503 - not retried: permanent error (forbidden)"),
    ],
)
def test_execution_failure_messages(pattern, retry_count, message):
    outcome = decide_failure(
        error="HTTP 503",
        pattern=pattern,
        retry_count=retry_count,
        budget=4,
        now=NINE,
        policy=RetryPolicy(),
        rng=random.Random(),
    )
    assert outcome.message == message


def test_other_messages():
    assert timeout_error(timedelta(hours=1)) == "Execution timed out after 1.0h"
    assert superseded_message("abc") == "Superseded: run abc completed"
    assert run_label("Data Architect", "Belgium", 1, 4) == "[RETRY 1/4] Data Architect in Belgium"
    assert run_label("Data Architect", "Belgium", 0, 4) == "Data Architect in Belgium"
    assert run_label("Data Architect", None, 2, 4) == "[RETRY 2/4] Data Architect"


def test_fixed_delay_is_the_policy_delay():
    policy = RetryPolicy(retry_delay=timedelta(hours=4))
    assert [retry_delay(policy, n, random.Random()) for n in (1, 2, 5)] == [timedelta(hours=4)] * 3


def test_exponential_delay_doubles_and_is_capped():
    policy = RetryPolicy(retry_delay=timedelta(hours=1), backoff="exponential", max_delay=timedelta(hours=6))
    delays = [retry_delay(policy, n, random.Random()) for n in range(1, 6)]
    assert delays == [timedelta(hours=h) for h in (1, 2, 4, 6, 6)]


@pytest.mark.parametrize("backoff", ["fixed", "exponential"])
def test_jitter_never_goes_below_the_policy_nor_above_the_cap(backoff):
    policy = RetryPolicy(retry_delay=timedelta(minutes=30), backoff=backoff, max_delay=timedelta(hours=3), jitter=0.5)
    rng = random.Random(7)
    for number in range(1, 10):
        base = (
            policy.retry_delay if backoff == "fixed" else min(policy.retry_delay * 2 ** (number - 1), policy.max_delay)
        )
        for _ in range(200):
            delay = retry_delay(policy, number, rng)
            assert base <= delay <= base * 1.5
            if backoff == "exponential":
                assert delay <= policy.max_delay


def test_a_longer_retry_after_wins_a_shorter_one_does_not():
    policy = RetryPolicy(retry_delay=timedelta(minutes=10))
    assert retry_delay(policy, 1, random.Random(), retry_after=timedelta(hours=1)) == timedelta(hours=1)
    assert retry_delay(policy, 1, random.Random(), retry_after=timedelta(seconds=30)) == timedelta(minutes=10)


@freeze_time("2026-11-22 15:00:00")
def test_rules_follow_the_clock_they_are_given():
    now = datetime.now(UTC)
    assert is_stuck(datetime(2026, 11, 22, 13, 0, tzinfo=UTC), now, timedelta(hours=1))
    assert not is_stuck(datetime(2026, 11, 22, 14, 0, tzinfo=UTC), now, timedelta(hours=1))


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(minutes=3), "0.1h"),  # 0.05h rounds up
        (timedelta(minutes=3) - timedelta(microseconds=1), "0.0h"),
        (timedelta(hours=1, minutes=15), "1.3h"),  # 1.25h rounds up
        (timedelta(hours=1, minutes=15) - timedelta(microseconds=1), "1.2h"),
        (timedelta(days=3, hours=2), "74.0h"),
        (timedelta(minutes=-6), "-0.1h"),
    ],
)
def test_hours_round_exactly_at_the_halves(duration, text):
    assert format_hours(duration) == text
