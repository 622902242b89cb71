"""Manual retry: the refusals of a retry API, and what a success schedules."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from db.errors import RetryRefused, RunNotFound, UsageError
from jobs.manual import RetryCriteria, chain_history, parse_run_id, retry_matching, retry_run
from jobs.rules import RetryPolicy
from jobs.stuck import sweep_stuck_runs
from tests.helpers import chain_of, insert_run, make_runtime, rows

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
pytestmark = pytest.mark.usefixtures("frozen")


@pytest.fixture
def frozen():
    with freeze_time(NOW) as frozen:
        yield frozen


@pytest.fixture
def rt(db_url):
    runtime = make_runtime(db_url)
    yield runtime
    runtime.close()


def test_a_failed_run_is_scheduled_now_with_the_policy_budget(rt):
    with rt.engine.begin() as conn:
        run_id = insert_run(
            conn,
            status="failed",
            started_at=NOW - timedelta(hours=1),
            error_message="boom",
            max_retries=9,
            config='{"pages": 2}',
        )
    result = retry_run(rt, run_id, policy=RetryPolicy(max_retries=3))
    assert result.message == "Run scheduled for retry (attempt 1/3)"
    with rt.engine.connect() as conn:
        original, retry = chain_of(conn, run_id)
    assert (original["status"], original["max_retries"], original["next_retry_at"]) == ("failed", 3, NOW)
    assert (retry["status"], retry["retry_count"], retry["max_retries"], retry["next_retry_at"]) == (
        "pending_retry",
        1,
        3,
        NOW,
    )
    assert retry["config"] == {"pages": 2} and retry["id"] == result.retry_id


@pytest.mark.parametrize(
    ("status", "fragment"),
    [
        ("completed", "completed: there is nothing to retry"),
        ("running", "is running for 2.0h: wait for it to finish"),
        ("pending_retry", "already scheduled for retry at 2026-11-22 12:00 UTC"),
        ("cancelled", "was cancelled (Superseded"),
    ],
)
def test_statuses_that_cannot_be_retried_say_why(rt, status, fragment):
    with rt.engine.begin() as conn:
        run_id = insert_run(
            conn,
            status=status,
            started_at=NOW - timedelta(hours=2),
            next_retry_at=NOW + timedelta(hours=2),
            error_message="Superseded: run x completed" if status == "cancelled" else None,
        )
    with pytest.raises(RetryRefused, match=fragment.replace("(", r"\(")):
        retry_run(rt, run_id)


def test_unknown_and_malformed_run_ids(rt):
    with pytest.raises(RunNotFound, match="not found in scrape_runs"):
        retry_run(rt, uuid.uuid4())
    with pytest.raises(UsageError, match="'not-a-uuid' is not a run id"):
        parse_run_id(rt, "not-a-uuid")


def test_a_spent_budget_is_refused_with_attempts_error_and_pattern_unless_reset(rt):
    with rt.engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(days=1))
        last = insert_run(
            conn,
            status="failed",
            retry_count=4,
            max_retries=4,
            is_retry=True,
            original_run_id=root,
            error_message="HTTP 503 Service Unavailable - permanently failed after 4 attempts",
        )
    with pytest.raises(RetryRefused) as refused:
        retry_run(rt, last)
    message = str(refused.value)
    assert "4 of 4 retries spent; 5 attempts, the original run included" in message
    assert "HTTP 503 Service Unavailable" in message
    assert "failure pattern: server_error" in message and "--reset-budget" in message
    result = retry_run(rt, last, reset_budget=True)
    assert result.message == "Run scheduled for retry (attempt 5/8)"


def test_a_budget_fixed_at_zero_by_the_sweep_is_honoured_by_a_plain_retry(rt):
    with rt.engine.begin() as conn:
        run_id = insert_run(conn, started_at=NOW - timedelta(hours=2))
    swept = sweep_stuck_runs(rt, RetryPolicy(max_retries=0))
    assert [a.message for a in swept.attempts] == ["Run stuck for 2.0h - permanently failed after 0 attempts"]
    # The policy in force is 4 retries now; the chain's budget was fixed at 0 and is spent.
    with pytest.raises(
        RetryRefused, match=r"spent its retry budget \(0 of 0 retries spent; 1 attempt, the original run included"
    ):
        retry_run(rt, run_id, policy=RetryPolicy(max_retries=4))
    with rt.engine.connect() as conn:
        assert chain_of(conn, run_id)[0]["max_retries"] == 0 and len(chain_of(conn, run_id)) == 1
    result = retry_run(rt, run_id, policy=RetryPolicy(max_retries=4), reset_budget=True)
    assert result.message == "Run scheduled for retry (attempt 1/4)"


def test_a_root_stuck_runs_failed_keeps_its_budget_when_the_policy_changes(rt):
    with rt.engine.begin() as conn:
        run_id = insert_run(conn, started_at=NOW - timedelta(hours=2))
    sweep_stuck_runs(rt, RetryPolicy(max_retries=2))
    with rt.engine.begin() as conn:  # its retry was cancelled by an operator, then the chain retried by hand
        conn.execute(sa.text("DELETE FROM scrape_runs WHERE original_run_id = :r"), {"r": run_id})
    result = retry_run(rt, run_id, policy=RetryPolicy(max_retries=7))
    assert result.message == "Run scheduled for retry (attempt 1/2)"


def test_an_older_attempt_retries_the_chains_latest_failed_attempt(rt):
    with rt.engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(days=1))
        latest = insert_run(conn, status="failed", retry_count=1, max_retries=4, is_retry=True, original_run_id=root)
    result = retry_run(rt, root)
    assert (result.failed_run_id, result.message) == (latest, "Run scheduled for retry (attempt 2/4)")


def test_a_chain_that_completed_is_not_retried(rt):
    with rt.engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(days=1))
        done = insert_run(conn, status="completed", retry_count=1, is_retry=True, original_run_id=root)
    with pytest.raises(RetryRefused, match=f"its chain completed with run {done}"):
        retry_run(rt, root)


def test_a_chain_with_a_retry_already_pending_is_not_retried_twice(rt):
    with rt.engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(days=1))
        insert_run(
            conn,
            status="pending_retry",
            retry_count=1,
            is_retry=True,
            original_run_id=root,
            next_retry_at=NOW + timedelta(hours=1),
        )
    with pytest.raises(RetryRefused, match="latest attempt .* is already scheduled"):
        retry_run(rt, root)


def test_retrying_a_dead_lettered_run_marks_its_record_requeued(rt):
    with rt.engine.begin() as conn:
        run_id = insert_run(
            conn,
            status="failed",
            started_at=NOW - timedelta(hours=3),
            max_retries=0,
            error_message="x - not retried: permanent error (not_found)",
        )
        conn.execute(
            sa.text(
                "INSERT INTO scrape_run_dead_letters (run_id, chain_id, attempts, budget, pattern)"
                " VALUES (:id, :id, 1, 0, 'not_found')"
            ),
            {"id": run_id},
        )
    result = retry_run(rt, run_id)
    with rt.engine.connect() as conn:
        letter = conn.execute(sa.text("SELECT requeued_at, requeued_run_id FROM scrape_run_dead_letters")).one()
    assert tuple(letter) == (NOW, result.retry_id)


def test_history_lists_the_chain_oldest_first_from_any_attempt(rt):
    with rt.engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(hours=9))
        first = insert_run(
            conn,
            status="failed",
            retry_count=1,
            is_retry=True,
            original_run_id=root,
            started_at=NOW - timedelta(hours=5),
        )
        second = insert_run(
            conn,
            status="completed",
            retry_count=2,
            is_retry=True,
            original_run_id=root,
            started_at=NOW - timedelta(hours=1),
        )
    history = chain_history(rt, second)
    assert [a.id for a in history.attempts] == [root, first, second]
    assert history.final_status == "success"


def failed_chain(
    conn,
    query: str,
    error: str,
    *,
    ended: datetime,
    pattern: str | None = "server_error",
    retry_count: int = 0,
    **columns,
):
    """A chain whose latest attempt failed; `pattern` None means the scraper failed it itself."""
    root = insert_run(
        conn,
        status="failed",
        search_query=query,
        started_at=ended - timedelta(hours=1),
        completed_at=ended,
        error_message=error,
        failure_pattern=pattern if retry_count == 0 else "stuck",
        **({} if retry_count else columns),
    )
    if retry_count == 0:
        return root
    return insert_run(
        conn,
        status="failed",
        search_query=query,
        started_at=ended - timedelta(minutes=30),
        completed_at=ended,
        error_message=error,
        failure_pattern=pattern,
        retry_count=retry_count,
        is_retry=True,
        original_run_id=root,
        **columns,
    )


def test_bulk_retry_filters_spreads_and_skips_spent_budgets(rt):
    with rt.engine.begin() as conn:
        a = failed_chain(conn, "Data Architect", "HTTP 503 Service Unavailable", ended=NOW - timedelta(hours=2))
        b = failed_chain(conn, "Data Engineer", "HTTP 503 from the board", ended=NOW - timedelta(hours=5))
        failed_chain(conn, "Data Analyst", "HTTP 503", ended=NOW - timedelta(days=3))  # too old
        failed_chain(conn, "Data Scientist", "captcha", ended=NOW - timedelta(hours=1))  # other error
        spent = failed_chain(
            conn, "Data Manager", "HTTP 503", ended=NOW - timedelta(hours=1), retry_count=4, max_retries=4
        )
        insert_run(conn, status="completed", search_query="Data Lead", error_message="HTTP 503")
    criteria = RetryCriteria(error_like="%503%", since=timedelta(days=1))
    dry = retry_matching(rt, criteria, spread=timedelta(hours=2), dry_run=True)
    assert [s.failed_run_id for s in dry.scheduled] == [a, b] and all(s.retry_id is None for s in dry.scheduled)
    assert [s.run_id for s in dry.skipped] == [spent] and "--reset-budget" in dry.skipped[0].reason
    with rt.engine.connect() as conn:
        assert rows(conn, "status = 'pending_retry'") == []

    done = retry_matching(rt, criteria, spread=timedelta(hours=2))
    assert [(s.failed_run_id, s.due, s.message) for s in done.scheduled] == [
        (a, NOW, "Run scheduled for retry (attempt 1/4)"),
        (b, NOW + timedelta(hours=1), "Run scheduled for retry (attempt 1/4)"),
    ]
    with rt.engine.connect() as conn:
        pending = rows(conn, "status = 'pending_retry'")
    assert sorted((r["original_run_id"], r["next_retry_at"]) for r in pending) == sorted(
        [(a, NOW), (b, NOW + timedelta(hours=1))]
    )
    # Retrying again finds nothing: those chains now have a retry pending.
    assert retry_matching(rt, criteria).scheduled == ()


def test_bulk_retry_by_kind_and_query(rt):
    with rt.engine.begin() as conn:
        by_scraper = failed_chain(conn, "Data Architect", "selector not found", ended=NOW, pattern=None)
        handled = failed_chain(conn, "Data Architect", "HTTP 503", ended=NOW, location_query="Berlin")
        dead = failed_chain(conn, "Data Engineer", "HTTP 404 - not retried", ended=NOW, pattern="not_found")
        conn.execute(
            sa.text(
                "INSERT INTO scrape_run_dead_letters (run_id, chain_id, attempts, budget, pattern)"
                " VALUES (:id, :id, 1, 4, 'not_found')"
            ),
            {"id": dead},
        )
    scraper = retry_matching(rt, RetryCriteria(kind="scraper"), dry_run=True)
    assert [s.failed_run_id for s in scraper.scheduled] == [by_scraper]
    permanent = retry_matching(rt, RetryCriteria(kind="permanent"), dry_run=True)
    assert [s.failed_run_id for s in permanent.scheduled] == [dead]
    berlin = retry_matching(rt, RetryCriteria(search_query="data arch%", location_query="berlin"), dry_run=True)
    assert [s.failed_run_id for s in berlin.scheduled] == [handled]
    limited = retry_matching(rt, RetryCriteria(kind="failed", since=timedelta(days=1), limit=2), dry_run=True)
    assert len(limited.scheduled) == 2


def test_a_single_dry_run_checks_and_changes_nothing(rt):
    with rt.engine.begin() as conn:
        run_id = insert_run(conn, status="failed", error_message="boom")
    plan = retry_run(rt, run_id, dry_run=True)
    assert plan.retry_id is None and plan.message == "Run scheduled for retry (attempt 1/4)"
    with rt.engine.connect() as conn:
        assert rows(conn, "status = 'pending_retry'") == []


# Chains as (status of each row, oldest first): the root, then its retries 1, 2...
CHAIN_SHAPES = [
    ("failed",),
    ("failed", "failed"),
    ("failed", "failed", "failed"),
    ("failed", "pending_retry"),
    ("failed", "running"),
    ("failed", "completed"),
    ("failed", "cancelled"),
    ("failed", "failed", "cancelled"),
    ("completed",),
    ("failed", "completed", "failed"),  # a late completion of an earlier attempt: the chain is done
]


def test_a_manual_retry_takes_what_a_bulk_retry_takes_from_every_chain(rt):
    """One rule says which attempt of a chain can be retried: a manual retry of any run of a chain
    retries exactly the attempt a bulk retry lists for that chain, and is refused where it lists none."""
    chains = []
    with rt.engine.begin() as conn:
        for number, shape in enumerate(CHAIN_SHAPES):
            ids = []
            for retry, status in enumerate(shape):
                started = NOW - timedelta(hours=10 - retry, minutes=number)
                chain = {"original_run_id": ids[0], "is_retry": True, "retry_count": retry} if ids else {}
                ids.append(insert_run(conn, status=status, started_at=started, search_query=f"shape{number}", **chain))
            chains.append(ids)
    bulk = retry_matching(rt, RetryCriteria(limit=100, search_query="shape%"), dry_run=True)
    listed = {item.failed_run_id for item in bulk.scheduled}
    for shape, ids in zip(CHAIN_SHAPES, chains, strict=True):
        expected = next((run_id for run_id in ids if run_id in listed), None)
        for run_id in ids:
            try:
                taken = retry_run(rt, run_id, dry_run=True).failed_run_id
            except RetryRefused:
                taken = None
            assert taken == (expected if shape[ids.index(run_id)] == "failed" else None), (shape, ids.index(run_id))
