"""The stuck-run sweep against a real PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from sqlalchemy.engine import make_url

from db import locks
from jobs.rules import RetryPolicy
from jobs.stuck import sweep_stuck_runs
from tests.daemons import wait_until
from tests.helpers import chain_of, insert_run, make_runtime, row, rows

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
pytestmark = pytest.mark.usefixtures("frozen")


@pytest.fixture
def frozen():
    with freeze_time(NOW) as frozen:
        yield frozen


# A short batch ends the sweep; a full one is followed by another that finds the rest (or nothing).
@pytest.mark.parametrize(("stuck", "batches"), [(9, 1), (10, 2), (11, 2), (21, 3)])
def test_batches_of_ten_fail_every_stuck_run_once(db_url, stuck, batches):
    rt = make_runtime(db_url, batch_size=10)
    with rt.engine.begin() as conn:
        ids = {insert_run(conn, started_at=NOW - timedelta(hours=2), search_query=f"q{i}") for i in range(stuck)}
        insert_run(conn, started_at=NOW - timedelta(minutes=30), search_query="healthy")
    result = sweep_stuck_runs(rt)
    assert {a.run_id for a in result.attempts} == ids
    assert (result.failed, result.batches) == (stuck, batches)
    with rt.engine.connect() as conn:
        assert len(rows(conn, "status = 'pending_retry'")) == stuck
        assert [r["search_query"] for r in rows(conn, "status = 'running'")] == ["healthy"]
    assert sweep_stuck_runs(rt).failed == 0


def test_budget_spent_fails_permanently_without_a_retry_and_dead_letters_the_chain(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(days=1))
        last = insert_run(
            conn,
            started_at=NOW - timedelta(minutes=72),
            retry_count=4,
            max_retries=4,
            is_retry=True,
            original_run_id=root,
            config='{"pages": 2}',
        )
    result = sweep_stuck_runs(rt)
    assert [a.message for a in result.attempts] == ["Run stuck for 1.2h - permanently failed after 4 attempts"]
    assert result.permanently_failed == 1 and result.retries_scheduled == 0
    with rt.engine.connect() as conn:
        failed = row(conn, last)
        assert failed["status"] == "failed" and failed["next_retry_at"] is None
        assert len(chain_of(conn, root)) == 2  # no retry row
        letter = conn.execute(sa.text("SELECT * FROM scrape_run_dead_letters")).mappings().one()
    assert (letter["run_id"], letter["chain_id"], letter["attempts"], letter["budget"], letter["pattern"]) == (
        last,
        root,
        5,
        4,
        "stuck",
    )
    assert letter["last_error"] == "Run stuck for 1.2h - permanently failed after 4 attempts"
    assert letter["inputs"]["config"] == {"pages": 2} and letter["inputs"]["search_query"] == "Data Architect"
    assert "status" not in letter["inputs"] and "retry_count" not in letter["inputs"]


def test_the_chain_budget_is_fixed_at_the_first_failure(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        root = insert_run(conn, started_at=NOW - timedelta(hours=2))
    sweep_stuck_runs(rt, RetryPolicy(max_retries=2))
    with rt.engine.begin() as conn:
        assert row(conn, root)["max_retries"] == 2
        retry = rows(conn, "original_run_id = :r", r=root)[0]
        assert retry["max_retries"] == 2
        conn.execute(
            sa.text("UPDATE scrape_runs SET status = 'running', started_at = :t WHERE id = :id"),
            {"t": NOW - timedelta(hours=3), "id": retry["id"]},
        )
    # A later policy with a bigger budget does not change this chain's.
    result = sweep_stuck_runs(rt, RetryPolicy(max_retries=9))
    assert [a.message for a in result.attempts] == ["Run stuck for 3.0h - retry 2/2 scheduled"]


def test_unknown_columns_are_copied_and_lifecycle_columns_start_fresh(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN proxy_pool TEXT, ADD COLUMN pages INTEGER DEFAULT 5")
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN seq BIGSERIAL")
    rt = make_runtime(db_url)  # reflects the new columns
    with rt.engine.begin() as conn:
        root = insert_run(
            conn,
            started_at=NOW - timedelta(hours=2),
            config='{"max_pages": 9}',
            user_id=11,
            results_count=3,
            proxy_pool="eu-west",
            pages=2,
            updated_at=NOW - timedelta(hours=2),
        )
    sweep_stuck_runs(rt)
    with rt.engine.connect() as conn:
        original, retry = chain_of(conn, root)
    for column in ("search_query", "location_query", "config", "user_id", "results_count", "proxy_pool", "pages"):
        assert retry[column] == original[column], column
    assert retry["seq"] != original["seq"]
    assert (retry["status"], retry["retry_count"], retry["is_retry"], retry["original_run_id"]) == (
        "pending_retry",
        1,
        True,
        root,
    )
    assert retry["started_at"] is None and retry["completed_at"] is None and retry["error_message"] is None
    assert retry["updated_at"] == original["updated_at"] == NOW  # not a copy: each row written now


def test_terminal_runs_are_never_touched(db_url):
    rt = make_runtime(db_url)
    long_ago = NOW - timedelta(days=3)
    with rt.engine.begin() as conn:
        ids = {
            status: insert_run(conn, status=status, started_at=long_ago)
            for status in ("completed", "failed", "cancelled")
        }
    assert sweep_stuck_runs(rt).failed == 0
    with rt.engine.connect() as conn:
        assert {status: row(conn, run_id)["status"] for status, run_id in ids.items()} == {s: s for s in ids}
        assert rows(conn, "status = 'pending_retry'") == []


def test_heartbeat_means_stuck_only_without_progress_and_null_falls_back(db_url):
    rt = make_runtime(db_url, heartbeat_column="updated_at")
    with rt.engine.begin() as conn:
        alive = insert_run(conn, started_at=NOW - timedelta(hours=9), updated_at=NOW - timedelta(minutes=5))
        silent = insert_run(conn, started_at=NOW - timedelta(hours=9), updated_at=NOW - timedelta(minutes=90))
        never = insert_run(conn, started_at=NOW - timedelta(hours=2), updated_at=None)
        fresh = insert_run(conn, started_at=NOW - timedelta(minutes=10), updated_at=None)
    result = sweep_stuck_runs(rt)
    assert {a.run_id: a.message for a in result.attempts} == {
        silent: "Run stuck for 1.5h - retry 1/4 scheduled",
        never: "Run stuck for 2.0h - retry 1/4 scheduled",
    }
    with rt.engine.connect() as conn:
        assert row(conn, alive)["status"] == row(conn, fresh)["status"] == "running"


def test_a_run_a_live_process_is_executing_is_not_stuck(db_url):
    """Executing means holding the run's key in the runs namespace; the same key in another
    namespace (a slot's, another table's) says nothing about the run."""
    rt = make_runtime(db_url)
    runs_ns, slots_ns = locks.namespace("scrape_runs", locks.RUNS), locks.namespace("scrape_runs", locks.SLOTS)
    with rt.engine.begin() as conn:
        executing = insert_run(conn, started_at=NOW - timedelta(hours=3))
        orphan = insert_run(conn, started_at=NOW - timedelta(hours=3))
        elsewhere = insert_run(conn, started_at=NOW - timedelta(hours=1, minutes=30))
    holder = rt.engine.connect()
    assert locks.unlock_run(holder, runs_ns, executing) is False  # nothing held yet
    holder.execute(sa.select(sa.func.pg_advisory_lock(runs_ns, locks.run_key(sa.literal(str(executing))))))
    holder.execute(sa.select(sa.func.pg_advisory_lock(slots_ns, locks.run_key(sa.literal(str(elsewhere))))))
    holder.commit()
    holder_pid = holder.execute(sa.select(sa.func.pg_backend_pid())).scalar_one()
    try:
        assert sorted(a.run_id for a in sweep_stuck_runs(rt).attempts) == sorted([orphan, elsewhere])
    finally:
        holder.invalidate()
        holder.close()
    # The server lets the run's lock go as the holder's backend ends, a moment after its socket closed.
    # A transaction of its own for each look: PostgreSQL reads pg_stat_activity once per transaction.
    gone = sa.text("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = :pid")

    def holder_gone() -> bool:
        with rt.engine.connect() as conn:
            return conn.execute(gone, {"pid": holder_pid}).scalar_one()

    wait_until(holder_gone, timeout=60)
    assert [a.run_id for a in sweep_stuck_runs(rt).attempts] == [executing]


def test_dry_run_changes_nothing_and_says_what_it_would_do(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        run_id = insert_run(conn, started_at=NOW - timedelta(minutes=72))
    result = sweep_stuck_runs(rt, dry_run=True)
    assert result.dry_run and [(a.run_id, a.message) for a in result.attempts] == [
        (run_id, "Run stuck for 1.2h - retry 1/4 scheduled")
    ]
    with rt.engine.connect() as conn:
        assert row(conn, run_id)["status"] == "running"
        assert len(rows(conn)) == 1


def test_a_second_sweeper_skips_while_the_lock_is_held(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        insert_run(conn, started_at=NOW - timedelta(hours=2))
    holder = rt.engine.connect()
    locks.try_lock(holder, locks.namespace("scrape_runs", locks.SWEEP), 0)
    holder.commit()
    try:
        result = sweep_stuck_runs(rt, lock_wait=timedelta(milliseconds=200))
        assert result.skipped and "another sweep is running (stuck-runs" in result.skipped and result.failed == 0
    finally:
        holder.invalidate()
        holder.close()
    assert sweep_stuck_runs(rt).failed == 1


def test_retry_rows_are_unique_per_chain_and_number(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(hours=5))
        insert_run(conn, status="failed", is_retry=True, original_run_id=root, retry_count=1)
    with pytest.raises(sa.exc.IntegrityError), rt.engine.begin() as conn:
        insert_run(conn, status="pending_retry", is_retry=True, original_run_id=root, retry_count=1)


def test_timestamps_without_time_zone_are_utc(variant_url, variant):
    """Even on a server whose TimeZone is far from UTC: the sessions stuck-runs opens are UTC."""
    far = "Pacific/Kiritimati"  # UTC+14: a local reading of a naive column is off by more than the threshold
    admin = sa.create_engine(variant_url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"ALTER DATABASE {make_url(variant_url).database} SET TimeZone = '{far}'")
    with admin.connect() as conn:
        assert conn.exec_driver_sql("SHOW TimeZone").scalar_one() == far
    admin.dispose()
    rt = make_runtime(variant_url)
    started = NOW - timedelta(minutes=72)
    with rt.engine.begin() as conn:
        run_id = insert_run(conn, started_at=started.replace(tzinfo=None) if variant == "enum_naive" else started)
        insert_run(conn, started_at=(NOW - timedelta(minutes=59)).replace(tzinfo=None))
    result = sweep_stuck_runs(rt)
    assert [(a.run_id, a.message) for a in result.attempts] == [(run_id, "Run stuck for 1.2h - retry 1/4 scheduled")]
    with rt.engine.connect() as conn:
        completed = row(conn, run_id)["completed_at"]
    assert (completed if completed.tzinfo else completed.replace(tzinfo=timezone.utc)) == NOW


def test_a_mass_event_logs_the_first_runs_then_one_line_with_the_sql_for_the_rest(db_url):
    """A crashed host's 105 stuck runs: 100 lines by name, then one line whose SQL lists them all,
    on the table actually swept."""
    from loguru import logger

    from db.engine import make_engine
    from db.migrate import migrate
    from jobs.stuck import LOGGED_RUNS_PER_SWEEP
    from tests.schema import TEXT_STATUS

    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="job_board_runs"))
    migrate(engine, "job_board_runs")
    with engine.begin() as conn:
        for i in range(LOGGED_RUNS_PER_SWEEP + 5):
            insert_run(conn, table="job_board_runs", started_at=NOW - timedelta(hours=2), search_query=f"q{i}")
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="WARNING")
    try:
        rt = make_runtime(db_url, table="job_board_runs")
        assert sweep_stuck_runs(rt).failed == LOGGED_RUNS_PER_SWEEP + 5
        rt.close()
    finally:
        logger.remove(sink)
    by_name = [line for line in lines if "Run stuck for 2.0h - retry 1/4 scheduled" in line]
    assert len(by_name) == LOGGED_RUNS_PER_SWEEP
    [summary] = [line for line in lines if line.startswith("5 more stuck runs failed")]
    sql = summary.split("list them with: ", 1)[1]
    assert "FROM job_board_runs " in sql
    with engine.connect() as conn:
        assert len(conn.exec_driver_sql(sql).all()) == LOGGED_RUNS_PER_SWEEP + 5
    engine.dispose()
