"""SCRAPE_RUN_HANDOFF (SPEC §12): due retries flipped to the scraper's queued value, picked up by
the fleet's own worker (a real process), guarded by the sweep and the cap."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.layout import Layout
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.stuck import sweep_stuck_runs
from tests.daemons import wait_until
from tests.fleet_worker import read_log, start_worker, stop_process
from tests.helpers import chain_of, insert_due_retry, insert_run, make_runtime, row
from tests.integration.test_cli import cli as run_cli

QUEUED = Layout(statuses={"queued": ("pending",)})
POLICY = RetryPolicy(retry_delay=timedelta(minutes=10), stuck_after=timedelta(hours=2))


def handoff_runtime(db_url, **settings):
    return make_runtime(db_url, handoff="queued", layout=QUEUED, policy=POLICY, **settings)


def due_retries(rt, count=1):
    with rt.engine.begin() as conn:
        return [insert_due_retry(conn, search_query=f"q{i}")[1] for i in range(count)]


def set_started(rt, run_id, ago: timedelta) -> None:
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE scrape_runs SET started_at = now() - CAST(:ago AS interval) WHERE id = :id"),
            {"id": run_id, "ago": f"{ago.total_seconds()} seconds"},
        )


def test_a_due_retry_is_flipped_to_the_queued_value_with_its_hand_off_time(db_url):
    rt = handoff_runtime(db_url)
    [retry] = due_retries(rt)
    before = datetime.now(timezone.utc)
    result = process_due_retries(rt)
    assert [(o.run_id, o.status) for o in result.executed] == [(retry, "handed_off")]
    assert result.counts() == {"superseded": 0, "executed": 0, "completed": 0, "failed": 0, "handed_off": 1}
    with rt.engine.connect() as conn:
        queued = row(conn, retry)
    assert (queued["status"], queued["handed_off"], queued["next_retry_at"]) == ("pending", "queue", None)
    assert queued["started_at"] >= before


def test_the_cap_counts_queued_and_running_hand_offs_until_they_end(db_url):
    rt = handoff_runtime(db_url, max_concurrent_retries=3)
    retries = due_retries(rt, 5)
    assert len(process_due_retries(rt).executed) == 3
    assert process_due_retries(rt).executed == ()
    with rt.engine.begin() as conn:
        handed = [r for r in retries if row(conn, r)["status"] == "pending"]
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'running' WHERE id = :id"), {"id": handed[0]})
    assert process_due_retries(rt).executed == ()  # running at the fleet still counts
    with rt.engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": handed[0]})
    assert len(process_due_retries(rt).executed) == 1


def test_a_hand_off_nobody_starts_is_failed_as_not_started(db_url):
    rt = handoff_runtime(db_url)
    [retry] = due_retries(rt)
    process_due_retries(rt)
    set_started(rt, retry, timedelta(minutes=100))
    assert sweep_stuck_runs(rt).failed == 0  # 1.7h: not over the threshold
    set_started(rt, retry, timedelta(minutes=121))
    preview = sweep_stuck_runs(rt, dry_run=True)
    assert preview.failed == 1 and preview.rows[0]["message"] == "Run not started after 2.0h - retry 2/4 scheduled"
    swept = sweep_stuck_runs(rt)
    assert swept.failed == 1 and swept.retries_scheduled == 1
    with rt.engine.connect() as conn:
        failed = row(conn, retry)
        nxt = conn.execute(sa.text("SELECT status, retry_count FROM scrape_runs WHERE retry_count = 2")).one()
    assert (failed["status"], failed["error_message"]) == ("failed", "Run not started after 2.0h - retry 2/4 scheduled")
    assert tuple(nxt) == ("pending_retry", 2)


def test_a_queued_run_the_scraper_queued_itself_is_left_alone(db_url):
    rt = handoff_runtime(db_url)
    with rt.engine.begin() as conn:
        own = insert_run(conn, status="pending", started_at=datetime.now(timezone.utc) - timedelta(days=3))
    assert sweep_stuck_runs(rt).failed == 0
    with rt.engine.connect() as conn:
        assert row(conn, own)["status"] == "pending"


def test_the_fleets_worker_runs_handed_off_retries_and_its_failures_continue_the_chain(db_url, tmp_path):
    rt = handoff_runtime(db_url, max_concurrent_retries=4)
    ok_retries = due_retries(rt, 2)
    process_due_retries(rt)
    log = tmp_path / "worker.log"
    worker = start_worker(db_url, log, queued="pending", fate="ok", work=0.05, poll=0.05)
    try:
        wait_until(lambda: sum(1 for line in read_log(log) if line[0] == "ended") == 2, timeout=30)
    finally:
        stop_process(worker)
    with rt.engine.connect() as conn:
        assert [row(conn, r)["status"] for r in ok_retries] == ["completed", "completed"]

    [failing] = due_retries(rt)
    process_due_retries(rt)
    worker = start_worker(db_url, tmp_path / "failing.log", queued="pending", fate="fail", work=0.05, max_runs=1)
    assert worker.wait(30) == 0
    [outcome] = process_due_retries(rt).executed  # the worker's failure continues the chain
    assert (outcome.run_id, outcome.status, outcome.pattern) == (failing, "failed", "server_error")
    with rt.engine.connect() as conn:
        failed = row(conn, failing)
        chain = chain_of(conn, failed["original_run_id"])
    assert failed["error_message"] == "HTTP Error 503: Service Unavailable - retry 2/4 scheduled"
    assert [(r["retry_count"], r["status"]) for r in chain][-1] == (2, "pending_retry")


def test_retry_now_hands_the_one_retry_over(db_url):
    from jobs.manual import run_retry_now

    rt = handoff_runtime(db_url)
    [retry] = due_retries(rt)
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE scrape_runs SET next_retry_at = now() + interval '1 day' WHERE id = :id"), {"id": retry}
        )
    outcome = run_retry_now(rt, retry, wait=lambda: None)
    assert outcome is not None and outcome.status == "handed_off"
    with rt.engine.connect() as conn:
        assert row(conn, retry)["status"] == "pending"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SCRAPE_RUN_HANDOFF": "queued"}, "STATUS_MAP does not map queued: add queued="),
        ({"SCRAPE_RUN_HANDOFF": "running", "STATUS_MAP": "queued=pending"}, "is not the state retries are handed off"),
        ({"SCRAPE_RUN_WEBHOOK": "ftp://fleet/run/{run_id}"}, "is not an http(s) URL"),
        ({"SCRAPE_RUN_WEBHOOK": "http://{search_query}.fleet/run"}, "the host part of"),
        ({"SCRAPE_RUN_WEBHOOK": "http://fleet/run/{nope}"}, "{nope} is not a column of scrape_runs"),
        ({"SCRAPE_RUN_WEBHOOK": "http://fleet/run/{run_id!r}"}, "{run_id!r} is not a placeholder (no !conversion"),
        (
            {"SCRAPE_RUN_WEBHOOK": "http://127.0.0.1:abc/x?token=hunter2"},
            "'http://127.0.0.1:abc/x?…' has no valid host",
        ),
        ({"SCRAPE_RUN_WEBHOOK": "http://fleet:99999/x"}, "has no valid host and port"),
        ({"SCRAPE_RUN_WEBHOOK": "http://exa mple.com/x"}, "has no valid host and port"),
        ({"SCRAPE_RUN_WEBHOOK": "http://me:hunter2@fleet/x"}, "the host part of 'http://…@fleet/x' must"),
        (
            {"SCRAPE_RUN_WEBHOOK": "http://fleet/run", "SCRAPE_RUN_COMMAND": "true"},
            "SCRAPE_RUN_COMMAND and SCRAPE_RUN_WEBHOOK are both set",
        ),
        ({"WEBHOOK_SECRET": "a-secret-of-sixteen-chars"}, "WEBHOOK_SECRET is set but SCRAPE_RUN_WEBHOOK is not"),
        ({"SCRAPE_RUN_WEBHOOK": "http://fleet/run", "WEBHOOK_TIMEOUT": "1h"}, "WEBHOOK_TIMEOUT='1h' is too long"),
    ],
)
def test_bad_hand_off_settings_exit_2_in_one_line_and_touch_nothing(db_url, env, expected):
    with sa.create_engine(db_url).begin() as conn:
        [retry] = [insert_due_retry(conn)[1]]
        before = conn.execute(sa.text("SELECT * FROM scrape_runs ORDER BY id")).all()
    result = run_cli("process", env={"DATABASE_URL": db_url, **env})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "a-secret-of-sixteen-chars" not in result.stderr
    assert "hunter2" not in result.stderr
    with sa.create_engine(db_url).connect() as conn:
        assert conn.execute(sa.text("SELECT * FROM scrape_runs ORDER BY id")).all() == before
        assert row(conn, retry)["status"] == "pending_retry"


def test_retry_now_on_the_cli_hands_the_new_retry_to_the_fleet_and_exits_0(db_url):
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_HANDOFF": "queued", "STATUS_MAP": "queued=pending"}
    with sa.create_engine(db_url).begin() as conn:
        failed = insert_run(conn, status="failed", started_at=datetime.now(timezone.utc), error_message="HTTP 503")
    result = run_cli("retry", str(failed), "--now", env=env)
    assert result.returncode == 0, result.stderr
    assert "Handed to the fleet: its scraper writes the outcome" in result.stdout
    with sa.create_engine(db_url).connect() as conn:
        [retry] = [r for r in chain_of(conn, failed) if r["is_retry"]]
    assert (retry["status"], retry["handed_off"]) == ("pending", "queue")


def test_a_queued_value_the_column_cannot_take_is_refused_before_anything_changes(databases):
    url = databases.create()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE vc_runs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), status varchar(10) NOT NULL,"
            " started_at timestamptz, completed_at timestamptz, error_message text)"
        )
    env = {"DATABASE_URL": url, "SCRAPE_RUNS_TABLE": "vc_runs", "STATUS_MAP": "pending_retry=pend_retry"}
    assert run_cli("migrate", env=env).returncode == 0
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO vc_runs (status, started_at) VALUES ('running', now() - interval '3 hours')")
        before = conn.execute(sa.text("SELECT * FROM vc_runs")).all()
    env["STATUS_MAP"] += ",queued=waiting_for_worker"
    for command in ("check", "process", "fix"):
        result = run_cli(command, env={**env, "SCRAPE_RUN_HANDOFF": "queued"})
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip().splitlines() == [
            "stuck-runs: vc_runs.status is varchar(10), too short for queued='waiting_for_worker': map queued to "
            "a value of at most 10 characters in STATUS_MAP, or widen the column"
        ]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT * FROM vc_runs")).all() == before
    engine.dispose()


def test_a_queued_value_an_enum_lacks_is_added_by_migrate_first(databases):
    url = databases.create()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TYPE run_status AS ENUM ('running', 'completed', 'failed')")
        conn.exec_driver_sql(
            "CREATE TABLE enum_runs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), status run_status NOT NULL,"
            " started_at timestamptz, completed_at timestamptz, error_message text)"
        )
    env = {"DATABASE_URL": url, "SCRAPE_RUNS_TABLE": "enum_runs"}
    assert run_cli("migrate", env=env).returncode == 0
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO enum_runs (status, started_at) VALUES ('running', now() - interval '3 hours')"
        )
    env.update(STATUS_MAP="queued=pending", SCRAPE_RUN_HANDOFF="queued")
    refused = run_cli("check", env=env)
    assert refused.returncode == 1 and "missing status value 'pending'" in refused.stderr, refused.stderr
    assert "run `stuck-runs migrate`" in refused.stderr and "Traceback" not in refused.stderr
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status::text FROM enum_runs")).scalars().all() == ["running"]
    assert run_cli("migrate", env=env).returncode == 0
    checked = run_cli("check", env=env)
    assert checked.returncode == 0, checked.stderr
    with engine.connect() as conn:
        assert "pending" in conn.execute(sa.text("SELECT enum_range(NULL::run_status)::text")).scalar_one()
    engine.dispose()


def test_a_webhook_hand_off_its_receiver_queued_and_nobody_started_is_failed_too(db_url):
    rt = handoff_runtime(db_url)
    [retry] = due_retries(rt)
    with rt.engine.begin() as conn:  # delivered by webhook; the receiver put it in its own queue
        conn.execute(
            sa.text(
                "UPDATE scrape_runs SET status = 'pending', handed_off = 'webhook', started_at = now() WHERE id = :id"
            ),
            {"id": retry},
        )
    set_started(rt, retry, timedelta(minutes=121))
    assert sweep_stuck_runs(rt).failed == 1
    with rt.engine.connect() as conn:
        assert row(conn, retry)["error_message"] == "Run not started after 2.0h - retry 2/4 scheduled"


def test_the_fleets_failures_are_read_through_their_own_small_index(db_url):
    from sqlalchemy.dialects import postgresql

    rt = handoff_runtime(db_url)
    statement = rt.queries.fleet_failures.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, started_at, handed_off, is_retry,"
                " retry_count, failure_pattern) SELECT 'q', 'l', 'failed', now(), 'queue', true, 1, 'server_error'"
                " FROM generate_series(1, 20000)"
            )
        )
        conn.exec_driver_sql("ANALYZE scrape_runs")
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {str(statement).replace(':sr_limit', '1000')}").scalars())
    assert "ix_scrape_runs_fleet_failed" in plan, plan


def test_a_failure_the_fleet_wrote_is_continued_and_said_so_never_counted_as_an_execution_here(db_url):
    rt = handoff_runtime(db_url)
    [retry] = due_retries(rt)
    assert [o.status for o in process_due_retries(rt).executed] == ["handed_off"]
    with rt.engine.begin() as conn:  # the fleet's worker ran it and failed
        conn.execute(
            sa.text(
                "UPDATE scrape_runs SET status = 'failed', completed_at = now(),"
                " error_message = 'HTTP Error 503: Service Unavailable' WHERE id = :id"
            ),
            {"id": retry},
        )
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_HANDOFF": "queued", "STATUS_MAP": "queued=pending"}
    result = run_cli("process", env=env)
    assert result.returncode == 0, result.stderr
    assert "Retry processor: 0 superseded, 1 failed at the fleet (their chains continued)" in result.stdout
    assert "executed" not in result.stdout, result.stdout
    assert f"Failed at the fleet: [RETRY 1/4] q0 in Belgium (run {retry}) — HTTP Error 503" in result.stdout
    rt.close()
