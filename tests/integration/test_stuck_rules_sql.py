"""The set-based sweep decides in SQL what the Python rules decide for an executed attempt: the
same budget inheritance, backoff and hours, from the same message templates.

What is written twice is held equal here: hundreds of generated runs (ages, retry numbers,
budgets, roots and retries) under several policies are swept for real; every failed row must
carry exactly the message, budget and due time that `chain_budget`, `stuck_error` and
`decide_failure` give for it.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from jobs.rules import STUCK_PATTERN, RetryPolicy, chain_budget, decide_failure, stuck_error
from jobs.stuck import sweep_stuck_runs
from tests.helpers import make_runtime

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
POLICIES = [
    RetryPolicy(),
    RetryPolicy(stuck_after=timedelta(minutes=30), retry_delay=timedelta(minutes=7), max_retries=2),
    RetryPolicy(retry_delay=timedelta(minutes=10), backoff="exponential", max_delay=timedelta(hours=3), max_retries=9),
    RetryPolicy(retry_delay=timedelta(seconds=1), backoff="exponential", max_delay=timedelta(days=400), max_retries=80),
    RetryPolicy(max_retries=0),
    # Runs stuck for seconds and minutes: messages below 0.1h read `45s` and `5m`.
    RetryPolicy(stuck_after=timedelta(seconds=20), retry_delay=timedelta(minutes=1), max_retries=3),
]


def generated_runs(seed: int, count: int = 300) -> list[dict]:
    rng = random.Random(seed)
    runs = []
    for _ in range(count):
        is_retry = rng.random() < 0.6
        retry_count = rng.randint(1, 70) if is_retry else 0
        # Ages on and around the tenths of an hour, where rounding is decided.
        age = timedelta(
            minutes=rng.choice(
                [rng.uniform(31, 600), rng.randint(2, 100) * 6 + rng.choice([-3, 3]), rng.uniform(0.3, 6.5)]
            ),
            microseconds=rng.choice([0, 1, -1]),
        )
        runs.append(
            {
                "started_at": NOW - age,
                "retry_count": retry_count,
                "is_retry": is_retry,
                "max_retries": rng.randint(0, 80),
                "original_run_id": None,
            }
        )
    return runs


def insert_generated(conn: sa.Connection, runs: list[dict]) -> list:
    """The generated runs as `running` rows (a retry gets a chain root id of its own); their ids."""
    return (
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, started_at, retry_count, is_retry,"
                " max_retries, original_run_id) SELECT 'q', 'l', 'running', s, r, i, m,"
                " CASE WHEN i THEN gen_random_uuid() END"
                " FROM unnest(CAST(:s AS timestamptz[]), CAST(:r AS int[]), CAST(:i AS bool[]), CAST(:m AS int[]))"
                " AS x(s, r, i, m) RETURNING id"
            ),
            {
                "s": [r["started_at"] for r in runs],
                "r": [r["retry_count"] for r in runs],
                "i": [r["is_retry"] for r in runs],
                "m": [r["max_retries"] for r in runs],
            },
        )
        .scalars()
        .all()
    )


@pytest.mark.parametrize("policy_index", range(len(POLICIES)))
def test_sql_decisions_equal_the_python_rules(db_url, policy_index):
    policy = POLICIES[policy_index]
    runs = generated_runs(policy_index)
    rt = make_runtime(db_url, batch_size=97)
    with rt.engine.begin() as conn:
        ids = insert_generated(conn, runs)
    with freeze_time(NOW):
        result = sweep_stuck_runs(rt, policy)
    with rt.engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                sa.text(
                    "SELECT id, status, error_message, max_retries, next_retry_at FROM scrape_runs WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            )
        }
    stuck = 0
    for run_id, run in zip(ids, runs, strict=True):
        expected = decide_failure(
            error=stuck_error(run["started_at"], NOW),
            pattern=STUCK_PATTERN,
            retry_count=run["retry_count"],
            budget=chain_budget(run["is_retry"], run["max_retries"], policy),
            now=NOW,
            policy=policy,
            rng=random.Random(0),
        )
        row = rows[run_id]
        if NOW - run["started_at"] <= policy.stuck_after:
            assert row.status == "running"
            continue
        stuck += 1
        assert (row.status, row.error_message, row.max_retries) == ("failed", expected.message, expected.budget)
        assert row.next_retry_at == expected.retry_due
    assert result.failed == stuck > 100
    if policy.stuck_after < timedelta(minutes=1):
        assert any(row.error_message.startswith("Run stuck for 5m") for row in rows.values())
        assert any(row.error_message.endswith("1 attempt") or "s - retry" in row.error_message for row in rows.values())


def test_jitter_in_sql_stays_within_the_rules_bounds(db_url):
    policy = RetryPolicy(retry_delay=timedelta(minutes=20), jitter=0.5)
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, started_at)"
                " SELECT 'q', 'l', :t FROM generate_series(1, 200)"
            ),
            {"t": NOW - timedelta(hours=2)},
        )
    with freeze_time(NOW):
        sweep_stuck_runs(rt, policy)
    with rt.engine.connect() as conn:
        dues = conn.execute(sa.text("SELECT next_retry_at FROM scrape_runs WHERE status = 'failed'")).scalars().all()
    delays = [due - NOW for due in dues]
    assert len(delays) == 200
    assert all(timedelta(minutes=20) <= d <= timedelta(minutes=30) for d in delays)
    assert len(set(delays)) > 150  # really random, not one value


@pytest.mark.parametrize("policy_index", range(len(POLICIES)))
def test_a_dry_run_says_exactly_what_the_sweep_then_does(db_url, policy_index):
    policy = POLICIES[policy_index]
    runs = generated_runs(100 + policy_index, count=150)
    rt = make_runtime(db_url, batch_size=31)
    with rt.engine.begin() as conn:
        insert_generated(conn, runs)
    with freeze_time(NOW):
        planned = sweep_stuck_runs(rt, policy, dry_run=True, keep=None)
        done = sweep_stuck_runs(rt, policy, keep=None)
    assert planned.dry_run and planned.failed == done.failed > 50
    assert (planned.retries_scheduled, planned.permanently_failed) == (done.retries_scheduled, done.dead_lettered)

    def decisions(result):
        return {a.run_id: (a.message, a.label, a.retried, a.retry_due) for a in result.attempts}

    assert decisions(planned) == decisions(done)
    rt.close()


def test_a_run_is_stuck_only_strictly_after_the_threshold(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        [on_the_dot, just_over] = insert_generated(
            conn,
            [
                {"started_at": NOW - timedelta(hours=1), "retry_count": 0, "is_retry": False, "max_retries": 4},
                {
                    "started_at": NOW - timedelta(hours=1, microseconds=1),
                    "retry_count": 0,
                    "is_retry": False,
                    "max_retries": 4,
                },
            ],
        )
    with freeze_time(NOW):
        planned = sweep_stuck_runs(rt, dry_run=True)
        done = sweep_stuck_runs(rt)
    assert [a.run_id for a in planned.attempts] == [a.run_id for a in done.attempts] == [just_over]
    with rt.engine.connect() as conn:
        status = dict(conn.execute(sa.text("SELECT id, status FROM scrape_runs")).all())
    assert (status[on_the_dot], status[just_over]) == ("running", "failed")
    rt.close()
