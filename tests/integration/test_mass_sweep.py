"""A mass event: counts for every run, a screenful on the screen, one summary line in the log."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from loguru import logger

from db.queries.sweep import ASYNC_COMMIT, FLUSH_COMMITS
from jobs.events import SweepFinished
from jobs.stuck import LOGGED_RUNS_PER_SWEEP, sweep_stuck_runs
from tests.helpers import insert_run, insert_stuck_runs, make_runtime
from tests.integration.test_cli import cli

THREE_HOURS_AGO = datetime.now(timezone.utc) - timedelta(hours=3)


def test_a_retry_swallowed_by_on_conflict_is_not_counted_as_a_dead_letter(db_url):
    rt = make_runtime(db_url)
    with rt.engine.begin() as conn:
        root = insert_run(conn, started_at=THREE_HOURS_AGO)
        # Its retry exists already (an older system's, say): the sweep's INSERT … ON CONFLICT adds none.
        insert_run(conn, status="pending_retry", is_retry=True, original_run_id=root, retry_count=1)
    result = sweep_stuck_runs(rt)
    with rt.engine.connect() as conn:
        letters = conn.execute(sa.text("SELECT count(*) FROM scrape_run_dead_letters")).scalar_one()
    assert (result.failed, result.retries_scheduled, letters) == (1, 0, 0)
    assert result.permanently_failed == 0 == result.dead_lettered  # was failed - retries_scheduled = 1
    rt.close()


def test_the_sweep_counts_every_run_and_keeps_the_first(db_url):
    rt = make_runtime(db_url, batch_size=7)
    with rt.engine.begin() as conn:
        insert_stuck_runs(conn, 50, THREE_HOURS_AGO)
    result = sweep_stuck_runs(rt, keep=10)
    assert (result.failed, result.retries_scheduled, result.batches) == (50, 50, 8)
    assert len(result.rows) == 10 and len(result.attempts) == 10 and result.unlisted == 40
    with rt.engine.connect() as conn:
        listed = conn.execute(sa.text(result.listing_sql)).all()
    assert len(listed) == 50  # the SQL the result names lists every run the sweep failed
    rt.close()


def test_a_sweep_of_many_batches_sends_its_statement_once_and_leaves_nothing_prepared(db_url):
    # Sent as text for every batch, the server parsed and planned the big statement a hundred
    # times in a mass event; it is prepared with the first batch and executed for the others.
    rt = make_runtime(db_url, batch_size=5)
    sent: list[str] = []

    def remember(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        sent.append(statement)

    sa.event.listen(rt.engine, "before_cursor_execute", remember)
    try:
        for stuck in (23, 7):  # the second sweep prepares again on the pool's (same) session
            with rt.engine.begin() as conn:
                insert_stuck_runs(conn, stuck, THREE_HOURS_AGO)
            sent.clear()
            result = sweep_stuck_runs(rt)
            assert (result.failed, result.retries_scheduled, result.batches) == (stuck, stuck, stuck // 5 + 1)
            whole = [s for s in sent if "SKIP LOCKED" in s]
            assert len(whole) == 1 and whole[0].startswith(f"{ASYNC_COMMIT}; PREPARE "), whole  # with the first batch
            assert sum(s.startswith(f"{ASYNC_COMMIT}; EXECUTE ") for s in sent) == stuck // 5  # the others'
            assert sent[-2:][0] == "DEALLOCATE ALL"  # before the sweep lock's release
    finally:
        sa.event.remove(rt.engine, "before_cursor_execute", remember)
    with rt.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar_one() == 0
        retries = conn.exec_driver_sql("SELECT count(*) FROM scrape_runs WHERE status = 'pending_retry'").scalar()
    assert retries == 30
    rt.close()


def test_a_sweeps_batches_commit_without_waiting_and_one_flush_covers_them_before_it_says_anything(db_url):
    # A hundred batches each waited for its commit to reach the disk in a mass event; they commit
    # asynchronously, and one synchronous commit that writes WAL (so it waits for the WAL up to
    # it, every batch's commit included) ends the sweep, before its log lines, its result and
    # SweepFinished (the alerts). The session's own setting applies to that commit (here
    # remote_write: not forced to `on`), and an idle sweep flushes nothing (it wrote nothing).
    with sa.create_engine(db_url, isolation_level="AUTOCOMMIT").connect() as conn:
        name = sa.engine.make_url(db_url).database
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = remote_write')
    rt = make_runtime(db_url, batch_size=5)
    seen: list[str] = []

    def committing(conn) -> None:  # noqa: ANN001 - SQLAlchemy's signature
        if seen and seen[-1] in ("batch", "flush"):  # their transactions' commits (not the lock's)
            cursor = conn.connection.dbapi_connection.cursor()  # raw: no events of its own
            cursor.execute("SHOW synchronous_commit")
            seen.append(f"commit {cursor.fetchone()[0]}")

    def sending(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        seen.append("flush" if statement == str(FLUSH_COMMITS) else "batch" if ASYNC_COMMIT in statement else "other")

    sa.event.listen(rt.engine, "commit", committing)
    sa.event.listen(rt.engine, "before_cursor_execute", sending)
    sink = logger.add(lambda message: seen.append("log"), level="WARNING", format="{message}")
    unsubscribe = rt.events.subscribe(
        lambda event: seen.append("finished") if isinstance(event, SweepFinished) else None
    )
    try:
        with rt.engine.begin() as conn:
            insert_stuck_runs(conn, 12, THREE_HOURS_AGO)
        seen.clear()
        result = sweep_stuck_runs(rt)
        swept = [s for s in seen if s != "other"]
        seen.clear()
        idle = sweep_stuck_runs(rt)
        idle_seen = [s for s in seen if s != "other"]
    finally:
        unsubscribe()
        logger.remove(sink)
        sa.event.remove(rt.engine, "commit", committing)
        sa.event.remove(rt.engine, "before_cursor_execute", sending)
    assert (result.failed, result.batches, idle.failed) == (12, 3, 0)
    batches = ["batch", "commit off"] * 3  # 5, 5 and 2 runs
    assert swept == [*batches, "flush", "commit remote_write", *["log"] * 12, "finished"], swept
    assert idle_seen == ["batch", "commit off", "finished"], idle_seen
    with rt.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM scrape_runs WHERE status = 'pending_retry'").scalar() == 12
    rt.close()


def test_the_flush_makes_earlier_asynchronous_commits_durable(db_url):
    # What FLUSH_COMMITS is for: the WAL up to an earlier asynchronous commit is flushed when it
    # returns. (A transaction that only takes an xid commits asynchronously whatever the setting.)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        conn.exec_driver_sql("SET synchronous_commit = off")
        conn.commit()
        with conn.begin():
            conn.exec_driver_sql("UPDATE scrape_runs SET status = status")
            conn.exec_driver_sql("CREATE TABLE flushed_or_not (x int)")
        written = conn.exec_driver_sql("SELECT pg_current_wal_insert_lsn()").scalar()
        conn.commit()
        conn.exec_driver_sql("SET synchronous_commit = on")
        conn.commit()
        with conn.begin():
            conn.execute(FLUSH_COMMITS)
        flushed = conn.exec_driver_sql("SELECT pg_current_wal_flush_lsn() - %(lsn)s::pg_lsn", {"lsn": written}).scalar()
    engine.dispose()
    assert flushed >= 0


def test_a_mass_event_is_one_summary_line_in_the_log(db_url):
    rt = make_runtime(db_url, batch_size=100)
    with rt.engine.begin() as conn:
        insert_stuck_runs(conn, 2500, THREE_HOURS_AGO)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING", format="{message}")
    try:
        result = sweep_stuck_runs(rt)
    finally:
        logger.remove(sink)
    assert result.failed == 2500
    summaries = [line for line in lines if "more stuck runs failed" in line]
    assert len(lines) == LOGGED_RUNS_PER_SWEEP + 1  # not one summary per batch (there were 25)
    assert summaries == [lines[-1]] and "2400 more stuck runs failed (2500 in all)" in summaries[0]
    rt.close()


def test_check_lists_a_screenful_then_says_how_to_list_the_rest(db_url):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        insert_stuck_runs(conn, 120, THREE_HOURS_AGO)
    result = cli("check", env={"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Stuck-run sweep: failed 120 stuck run(s)")
    assert len(lines) == 1 + 1 + 50 + 1  # summary, header, a screenful (not a terminal: 50), the rest's line
    rest = lines[-1]
    assert rest.startswith("… and 70 more not listed here; list them with --all, or: SELECT ")
    with engine.connect() as conn:
        assert len(conn.execute(sa.text(rest.split(", or: ", 1)[1])).all()) == 120
    engine.dispose()


def test_all_and_json_list_every_run(db_url):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        insert_stuck_runs(conn, 60, THREE_HOURS_AGO)
    listed = cli("check", "--all", "--stuck-after", "2h", env={"DATABASE_URL": db_url})
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1 + 1 + 60
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM scrape_runs"))
        insert_stuck_runs(conn, 60, THREE_HOURS_AGO)
    document = json.loads(cli("check", "--json", env={"DATABASE_URL": db_url}).stdout)
    assert document["failed"] == 60 and len(document["attempts"]) == 60 and document["unlisted"] == 0
    assert {a["label"] for a in document["attempts"]} == {f"q{n} in Belgium" for n in range(1, 61)}
    assert all(a["retried"] and a["retry_due"].endswith("+00:00") for a in document["attempts"])
    engine.dispose()
