"""The pure rules: stuck or not, the delay, the exact messages."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from freezegun import freeze_time

from jobs.rules import (
    FailureOutcome,
    RetryPolicy,
    chain_budget,
    decide_failure,
    format_duration,
    format_hours,
    retry_delay,
    run_label,
    stuck_error,
    superseded_message,
    timeout_error,
)

UTC = timezone.utc
NINE = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("minutes", "text"),
    [(72, "1.2h"), (60, "1.0h"), (120, "2.0h"), (63, "1.1h"), (69, "1.2h"), (0, "0.0h"), (6000, "100.0h")],
)
def test_hours_have_one_decimal_and_round_halves_up(minutes, text):
    assert format_hours(timedelta(minutes=minutes)) == text


def the_example_run_at_nine() -> FailureOutcome:
    """SPEC §10's run, started at 07:48, failed by the 09:00 check: the rules a stuck run's fate
    is made of (the sweep decides it in SQL; tests/integration/test_stuck_rules_sql.py holds the two
    to the same answers)."""
    return decide_failure(
        error=stuck_error(datetime(2026, 11, 22, 7, 48, tzinfo=UTC), NINE),
        pattern="stuck",
        retry_count=0,
        budget=chain_budget(False, 4, RetryPolicy()),
        now=NINE,
        policy=RetryPolicy(),
        rng=random.Random(1),
    )


def test_the_example_run_started_at_0748_reads_stuck_for_1_2h_at_nine():
    outcome = the_example_run_at_nine()
    assert outcome.message == "Run stuck for 1.2h - retry 1/4 scheduled"
    assert outcome.retry_number == 1
    assert outcome.retry_due == datetime(2026, 11, 22, 13, 0, tzinfo=UTC)
    assert outcome.pattern == "stuck"


def test_budget_spent_message_and_no_retry():
    outcome = decide_failure(
        error=stuck_error(NINE - timedelta(minutes=72), NINE),
        pattern="stuck",
        retry_count=4,
        budget=4,
        now=NINE,
        policy=RetryPolicy(),
        rng=random.Random(1),
    )
    # Retry 4 of 4 failed: the original and four retries ran, five attempts.
    assert outcome.message == "Run stuck for 1.2h - permanently failed after 4 attempts"
    assert outcome.ends_chain and outcome.retry_due is None


def test_a_chain_with_no_budget_failed_after_its_one_attempt():
    outcome = decide_failure(
        error="Run stuck for 1.2h",
        pattern="stuck",
        retry_count=0,
        budget=0,
        now=NINE,
        policy=RetryPolicy(max_retries=0),
        rng=random.Random(1),
    )
    assert outcome.message == "Run stuck for 1.2h - permanently failed after 0 attempts"
    assert outcome.ends_chain


def test_the_budget_is_the_policys_for_a_root_and_inherited_by_retries():
    policy = RetryPolicy(max_retries=2)
    assert chain_budget(False, 4, policy) == 2  # a root takes the policy's, whatever its row says
    assert chain_budget(True, 3, policy) == 3  # a retry inherits its chain's


def test_a_roots_budget_once_fixed_by_stuck_runs_is_kept():
    policy = RetryPolicy(max_retries=4)
    # A root stuck-runs failed (it wrote the failure's pattern) has its chain's budget on its row.
    assert chain_budget(False, 0, policy, handled=True) == 0
    assert chain_budget(False, 9, policy, handled=False) == 4  # failed by the scraper: never fixed


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
    assert timeout_error(timedelta(seconds=90)) == "Execution timed out after 1m"
    assert superseded_message("abc") == "Superseded: run abc completed"
    assert run_label("Data Architect in Belgium", 1, 4) == "[RETRY 1/4] Data Architect in Belgium"
    assert run_label("Data Architect in Belgium", 0, 4) == "Data Architect in Belgium"
    assert run_label("", 2, 4) == "[RETRY 2/4] (no label)"


def test_fixed_delay_is_the_policy_delay():
    policy = RetryPolicy(retry_delay=timedelta(hours=4))
    assert [retry_delay(policy, n, random.Random()) for n in (1, 2, 5)] == [timedelta(hours=4)] * 3


def test_exponential_delay_doubles_and_is_capped():
    policy = RetryPolicy(retry_delay=timedelta(hours=1), backoff="exponential", max_delay=timedelta(hours=6))
    delays = [retry_delay(policy, n, random.Random()) for n in range(1, 6)]
    assert delays == [timedelta(hours=h) for h in (1, 2, 4, 6, 6)]


@pytest.mark.parametrize(
    ("backoff", "base_minutes"),
    [
        ("fixed", [30, 30, 30, 30, 30, 30]),
        ("exponential", [30, 60, 120, 180, 180, 180]),  # doubled, then held at the 3 h cap
    ],
)
def test_jitter_never_goes_below_the_policy_nor_above_the_cap(backoff, base_minutes):
    policy = RetryPolicy(retry_delay=timedelta(minutes=30), backoff=backoff, max_delay=timedelta(hours=3), jitter=0.5)
    rng = random.Random(7)
    for number, minutes in enumerate(base_minutes, start=1):
        base = timedelta(minutes=minutes)
        delays = [retry_delay(policy, number, rng) for _ in range(200)]
        assert all(base <= delay <= base * 1.5 for delay in delays), number
        assert max(delays) > base * 1.25 or base == policy.max_delay  # the jitter really adds
        if backoff == "exponential":
            assert max(delays) <= policy.max_delay


def test_a_longer_retry_after_wins_a_shorter_one_does_not():
    policy = RetryPolicy(retry_delay=timedelta(minutes=10))
    assert retry_delay(policy, 1, random.Random(), retry_after=timedelta(hours=1)) == timedelta(hours=1)
    assert retry_delay(policy, 1, random.Random(), retry_after=timedelta(seconds=30)) == timedelta(minutes=10)


@freeze_time("2026-11-23 15:00:00")  # the wall clock, a day and six hours after the `now` the rules are given
def test_rules_follow_the_clock_they_are_given_not_the_wall_clock():
    outcome = the_example_run_at_nine()
    assert (outcome.message, outcome.retry_due) == (
        "Run stuck for 1.2h - retry 1/4 scheduled",
        NINE + timedelta(hours=4),
    )


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


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(minutes=6), "0.1h"),  # SPEC's hours from 0.1h on
        (timedelta(minutes=6) - timedelta(microseconds=1), "5m"),  # whole minutes elapsed, never rounded up
        (timedelta(minutes=2, seconds=59), "2m"),  # one decimal would say 0.0h
        (timedelta(minutes=1), "1m"),
        (timedelta(seconds=59, microseconds=999_999), "59s"),
        (timedelta(seconds=45), "45s"),
        (timedelta(0), "0s"),
        (timedelta(hours=1, minutes=12), "1.2h"),
        (timedelta(minutes=-6), "-0.1h"),
        (timedelta(seconds=-45), "-45s"),
    ],
)
def test_durations_under_a_tenth_of_an_hour_are_minutes_or_seconds(duration, text):
    assert format_duration(duration) == text


def test_no_duration_reads_zero_hours():
    texts = {format_duration(timedelta(seconds=s / 4)) for s in range(-4 * 60 * 10, 4 * 60 * 10)}
    assert "0.0h" not in texts and "-0.0h" not in texts
    assert stuck_error(NINE - timedelta(minutes=5, seconds=30), NINE) == "Run stuck for 5m"
