"""The results' own counts: what a job run is recorded and logged with, and what the metrics count."""

import uuid
from datetime import datetime, timezone

from jobs.events import ProcessorPassFinished, RetryEnded, RetryStarted, SweepFinished
from jobs.retries import ProcessResult, RetryOutcome, SupersededRetry
from jobs.stuck import SweepResult
from scheduler.metrics import Metrics

DUE = datetime(2026, 1, 1, tzinfo=timezone.utc)


def outcome(status, *, retry_due=None, dead_lettered=False):
    return RetryOutcome(uuid.uuid4(), "a run", status, retry_due=retry_due, dead_lettered=dead_lettered)


def superseded():
    return SupersededRetry(uuid.uuid4(), uuid.uuid4(), "a run", uuid.uuid4(), "Superseded")


def test_a_sweep_records_its_four_counts_and_skipped_only_when_it_skipped():
    sweep = SweepResult(failed=5, retries_scheduled=3, dead_lettered=2, batches=1)
    assert sweep.counts() == {"failed": 5, "retries_scheduled": 3, "permanently_failed": 2, "batches": 1}
    skipped = SweepResult(skipped="another sweep is running (pid 7)")
    assert skipped.counts() == {
        "failed": 0,
        "retries_scheduled": 0,
        "permanently_failed": 0,
        "batches": 0,
        "skipped": "another sweep is running (pid 7)",
    }


def test_a_processor_pass_records_superseded_executed_completed_failed():
    executed = (outcome("completed"), outcome("failed", retry_due=DUE), outcome("released"))
    result = ProcessResult((superseded(),), executed)
    assert result.counts() == {"superseded": 1, "executed": 3, "completed": 1, "failed": 1}


def test_a_pass_counts_retries_and_dead_letters_only_of_failed_executions():
    executed = (
        outcome("failed", retry_due=DUE),
        outcome("failed", dead_lettered=True),
        outcome("completed", retry_due=DUE, dead_lettered=True),  # a scraper's own status: no retry of ours
    )
    result = ProcessResult(executed=executed)
    assert (result.retries_scheduled, result.dead_lettered) == (1, 1)


def sample(metrics, name):
    return metrics.registry.get_sample_value(f"stuck_runs_{name}_total") or 0


def test_the_metrics_count_a_sweep_a_pass_and_each_execution_once():
    metrics = Metrics()
    metrics(SweepFinished(SweepResult(failed=4, retries_scheduled=3, dead_lettered=1)))
    metrics(SweepFinished(SweepResult(failed=9, retries_scheduled=9, dead_lettered=9, dry_run=True)))  # planned only
    ended = (outcome("failed", retry_due=DUE), outcome("failed", dead_lettered=True), outcome("completed"))
    metrics(RetryStarted(None))
    for each in ended:
        metrics(RetryEnded(each))
    # The pass reports the executions again: only its supersessions are new.
    metrics(ProcessorPassFinished(ProcessResult((superseded(), superseded()), ended)))
    counted = {
        name: sample(metrics, name)
        for name in (
            "stuck_detected",
            "retries_scheduled",
            "dead_lettered",
            "retries_superseded",
            "retries_started",
            "retries_succeeded",
            "retries_failed",
        )
    }
    assert counted == {
        "stuck_detected": 4,
        "retries_scheduled": 4,
        "dead_lettered": 2,
        "retries_superseded": 2,
        "retries_started": 1,
        "retries_succeeded": 1,
        "retries_failed": 2,
    }
