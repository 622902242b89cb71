"""The results' own counts, as rules over any results: what a job run is recorded and logged with,
and what the metrics count (counted per execution, they add up to the pass's own counts)."""

import uuid
from datetime import datetime, timezone

from hypothesis import given
from hypothesis import strategies as st

from jobs.events import ProcessorPassFinished, RetryEnded, RetryStarted, SweepFinished
from jobs.retries import ProcessResult, RetryOutcome, SupersededRetry
from jobs.stuck import SweepResult
from scheduler.metrics import Metrics

DUE = datetime(2026, 1, 1, tzinfo=timezone.utc)
# What a sweep record holds (`status`, the API and the job records read these names).
SWEEP_RECORD = {"failed", "retries_scheduled", "permanently_failed", "batches"}
PASS_RECORD = {"superseded", "executed", "completed", "failed"}
FLEET_RECORD = {"handed_off", "postponed", "refused", "failed_at_fleet"}


def outcome(status, *, retry_due=None, dead_lettered=False, delivered=False, failed_at_fleet=False):
    return RetryOutcome(
        uuid.uuid4(),
        "a run",
        status,
        retry_due=retry_due,
        dead_lettered=dead_lettered,
        delivered=delivered,
        failed_at_fleet=failed_at_fleet,
    )


def superseded():
    return SupersededRetry(uuid.uuid4(), uuid.uuid4(), "a run", uuid.uuid4(), "Superseded")


counts = st.integers(min_value=0, max_value=10_000)
sweeps = st.builds(SweepResult, failed=counts, retries_scheduled=counts, dead_lettered=counts, batches=counts)
ends = st.fixed_dictionaries({"retry_due": st.sampled_from([None, DUE]), "dead_lettered": st.booleans()})
# What can become of an attempt: run here (the scraper may write a status of its own), delivered
# to the fleet, or a failure the fleet wrote.
here = st.builds(
    lambda status, end: outcome(status, **end), st.sampled_from(["completed", "failed", "released", "cancelled"]), ends
)
delivered = st.builds(
    lambda status, end: outcome(status, delivered=True, **end),
    st.sampled_from(["handed_off", "postponed", "failed", "released"]),
    ends,
)
at_fleet = st.builds(lambda end: outcome("failed", failed_at_fleet=True, **end), ends)
outcomes = st.one_of(here, delivered, at_fleet)


@given(sweeps, st.sampled_from([None, "another sweep is running (pid 7)"]))
def test_a_sweep_is_recorded_with_its_own_counts_and_skipped_only_when_it_skipped(sweep, skipped):
    sweep = SweepResult(**{**sweep.__dict__, "skipped": skipped})
    recorded = sweep.counts()
    assert set(recorded) == SWEEP_RECORD | ({"skipped"} if skipped else set())
    assert recorded["failed"] == sweep.failed
    assert recorded["permanently_failed"] == sweep.dead_lettered
    assert (recorded["retries_scheduled"], recorded["batches"]) == (sweep.retries_scheduled, sweep.batches)
    assert recorded.get("skipped") == skipped


@given(st.lists(outcomes, max_size=12), st.integers(min_value=0, max_value=3))
def test_a_pass_records_each_attempt_once_and_fleet_counts_only_when_there_are_some(executed, n_superseded):
    result = ProcessResult(tuple(superseded() for _ in range(n_superseded)), tuple(executed))
    recorded = result.counts()
    assert PASS_RECORD <= set(recorded) <= PASS_RECORD | FLEET_RECORD
    assert all(recorded[name] > 0 for name in FLEET_RECORD & set(recorded))
    assert recorded["superseded"] == n_superseded
    # Executed here: what neither went to the fleet nor came back from it.
    ran_here = [o for o in executed if not (o.delivered or o.failed_at_fleet)]
    assert recorded["executed"] == len(ran_here)
    assert recorded["completed"] + recorded["failed"] <= recorded["executed"]
    # Every delivery and fleet failure is in exactly one fleet count, except one put back by a signal.
    fleet = sum(recorded.get(name, 0) for name in FLEET_RECORD)
    assert fleet == len(executed) - len(ran_here) - sum(1 for o in executed if o.delivered and o.status == "released")


@given(st.lists(outcomes, max_size=8), outcomes)
def test_only_a_failed_attempt_schedules_a_retry_or_ends_its_chain(executed, extra):
    before = ProcessResult(executed=tuple(executed))
    after = ProcessResult(executed=(*executed, extra))
    added = (after.retries_scheduled - before.retries_scheduled, after.dead_lettered - before.dead_lettered)
    if extra.status != "failed":  # a scraper's own status, a hand-off, a put-back: no retry of ours
        assert added == (0, 0)
    else:
        assert added == (int(extra.retry_due is not None), int(extra.dead_lettered))


def sample(metrics, name):
    return metrics.registry.get_sample_value(f"stuck_runs_{name}_total") or 0


@given(st.lists(sweeps, max_size=3), st.lists(outcomes, max_size=10), st.integers(min_value=0, max_value=3))
def test_the_metrics_counted_per_execution_add_up_to_the_results(swept, executed, n_superseded):
    metrics = Metrics()
    for sweep in swept:
        metrics(SweepFinished(sweep))
    started = 0
    for each in executed:
        if not (each.delivered or each.failed_at_fleet):
            metrics(RetryStarted(None))
            started += 1
        metrics(RetryEnded(each))
    # The pass reports its executions again once it is over: only its supersessions are new.
    whole = ProcessResult(tuple(superseded() for _ in range(n_superseded)), tuple(executed))
    metrics(ProcessorPassFinished(whole))
    assert sample(metrics, "stuck_detected") == sum(s.failed for s in swept)
    assert sample(metrics, "retries_scheduled") == sum(s.retries_scheduled for s in swept) + whole.retries_scheduled
    assert sample(metrics, "dead_lettered") == sum(s.dead_lettered for s in swept) + whole.dead_lettered
    assert sample(metrics, "retries_superseded") == n_superseded
    assert sample(metrics, "retries_started") == started
    assert sample(metrics, "retries_succeeded") == whole.succeeded
    assert sample(metrics, "retries_failed") == whole.failed
