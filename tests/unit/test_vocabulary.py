"""One vocabulary for counts (jobs/rules.py): attempts are rows that ran, "N/M" is retry N of M."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from jobs.manual import ChainHistory, ScheduledRetry
from jobs.model import Run
from jobs.rules import BUDGET_SPENT, RETRY_SCHEDULED, attempts_text, count_attempts

NOW = datetime(2026, 11, 22, 19, 0, tzinfo=timezone.utc)


def chain(*statuses: str) -> ChainHistory:
    root = uuid.uuid4()
    runs = tuple(
        Run(
            id=root if number == 0 else uuid.uuid4(),
            status=status,
            what="Data Architect in Belgium",
            retry_count=number,
            is_retry=number > 0,
            original_run_id=None if number == 0 else root,
        )
        for number, status in enumerate(statuses)
    )
    return ChainHistory(root, runs)


@pytest.mark.parametrize(
    ("statuses", "attempts", "summary"),
    [
        (("failed", "failed", "completed"), 3, "Total attempts: 3 · final status: success"),  # SPEC §10
        (("completed", "cancelled"), 1, "Total attempts: 1 · final status: success"),  # superseded, never ran
        (("failed", "pending_retry"), 1, "Total attempts: 1 · final status: pending_retry"),
        (("failed", "failed", "running"), 3, "Total attempts: 3 · final status: running"),
        (("failed", "cancelled"), 1, "Total attempts: 1 · final status: cancelled"),  # cancelled by an operator
    ],
)
def test_an_attempt_is_a_row_that_ran(statuses, attempts, summary):
    assert chain(*statuses).summary == summary
    assert count_attempts(statuses) == chain(*statuses).attempts_made == attempts


def test_n_of_m_is_the_retry_number_of_the_budget_in_every_message():
    assert RETRY_SCHEDULED.format(error="Run stuck for 1.2h", number=1, budget=4) == (
        "Run stuck for 1.2h - retry 1/4 scheduled"
    )
    scheduled = ScheduledRetry(uuid.uuid4(), "Data Architect in Belgium", None, attempt=2, budget=4, due=NOW)
    assert scheduled.message == "Run scheduled for retry (attempt 2/4)"


def test_budget_spent_message_is_the_contracts_text_and_history_counts_the_original_too():
    # SPEC §3's exact text names the retries spent; history's total counts the original as well.
    assert BUDGET_SPENT.format(error="Run stuck for 1.2h", attempts=4) == (
        "Run stuck for 1.2h - permanently failed after 4 attempts"
    )
    assert chain("failed", "failed", "failed", "failed", "failed").attempts_made == 5
    assert attempts_text(1) == "1 attempt"
