"""The hand-over's turns of the cap's lock, fewer and shorter (issue 23): a set's room is counted
and marked up to in one statement; in a pass, the next set is marked while the lanes still
deliver the last one's; each thread calling the fleet over HTTP has a client of its own."""

from __future__ import annotations

import threading
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa

from jobs.delivery import NO_ROOM, Deliveries
from jobs.executors.senders import ClientPerThread
from jobs.outcomes import Marked
from jobs.rules import RetryPolicy
from tests.daemons import wait_until
from tests.helpers import insert_due_retry, make_runtime
from tests.receiver import start_receiver

POLICY = RetryPolicy(retry_delay=timedelta(hours=4), stuck_after=timedelta(hours=1))
HANDED = "SELECT count(*) FROM scrape_runs WHERE status = 'running' AND handed_off = 'webhook'"


@pytest.fixture
def webhook_runtime(db_url, tmp_path):
    receiver = start_receiver(tmp_path)  # nothing is delivered here: only marked
    runtimes = []

    def open_runtime(cap: int):
        runtimes.append(
            make_runtime(db_url, webhook=receiver.url + "/r/{run_id}", policy=POLICY, max_concurrent_retries=cap)
        )
        return runtimes[-1]

    yield open_runtime
    for rt in runtimes:
        rt.close()
    receiver.stop()


def due_retries(engine: sa.Engine, count: int) -> list:
    with engine.begin() as conn:
        return [insert_due_retry(conn, search_query=f"q{i}")[1] for i in range(count)]


def statements_run(engine: sa.Engine, call, *, autocommit: list[bool] | None = None) -> list[str]:
    """The query strings on the runs table (or its lock) that `call()` sent; with `autocommit`, whether
    each was sent on a connection in autocommit (then psycopg2 sends no BEGIN before it and no COMMIT
    after it: the string is the one round trip, its statements one transaction)."""
    ran: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        if "scrape_runs" in statement or "pg_advisory" in statement:
            ran.append(statement)
            if autocommit is not None:
                autocommit.append(conn.connection.dbapi_connection.autocommit)

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        call()
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    return ran


def locked_then(statement: str, marking: str) -> bool:
    """`statement` takes the cap's lock, then runs `marking`, in one query string."""
    lock, _, then = statement.partition(";")
    return "pg_advisory_xact_lock" in lock and marking in then and "pg_advisory" not in then


def test_a_set_counts_the_room_and_marks_up_to_it_in_one_statement_under_the_lock(webhook_runtime):
    rt = webhook_runtime(3)
    due = due_retries(rt.engine, 5)
    deliveries = Deliveries(rt, rt.executor, POLICY)
    answers: list = []
    autocommit: list[bool] = []
    call = lambda: answers.extend(deliveries.mark_batch([None, None], ahead=4))  # noqa: E731
    ran = statements_run(rt.engine, call, autocommit=autocommit)
    # A webhook sends again: the lapsed leases marked anew under the lock, then the room counted and
    # marked up to under it; each one query string, one round trip, one transaction.
    assert len(ran) == 2 and all(locked_then(s, "UPDATE scrape_runs") for s in ran) and all(autocommit)
    assert "delivering_until <" in ran[0] and "delivering_until <" not in ran[1]
    assert all(isinstance(a, Marked) for a in answers) and len(deliveries.ready) == 1  # the room of 3
    assert [m.run.id for m in [*answers, *deliveries.ready]] == due[:3]  # the longest overdue first
    assert deliveries.mark_batch([None]) == [NO_ROOM]  # the cap is reached: not "nothing due"
    with rt.engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE status = 'running'"))
    assert len(deliveries.mark_batch([None], ahead=4)) == 1 and len(deliveries.ready) == 2  # the last two due
    assert deliveries.mark_batch([None]) == [None]  # room left, nothing due
    with rt.engine.connect() as conn:
        assert conn.execute(sa.text(HANDED)).scalar_one() == 2


def test_an_engine_never_sent_twice_marks_a_set_in_one_round_trip_and_confirms_it_in_one(webhook_runtime):
    rt = webhook_runtime(3)
    due = due_retries(rt.engine, 4)
    rt.executor.sends_again = False  # as Celery: a lapsed lease is the stuck checker's, not marked anew
    deliveries = Deliveries(rt, rt.executor, POLICY)
    answers: list = []
    autocommit: list[bool] = []
    ran = statements_run(
        rt.engine, lambda: answers.extend(deliveries.mark_batch([None], ahead=2)), autocommit=autocommit
    )
    assert len(ran) == 1 and locked_then(ran[0], "UPDATE scrape_runs") and autocommit == [True]
    marked = [*answers, *deliveries.ready]
    assert [m.run.id for m in marked] == due[:3]
    with rt.engine.begin() as conn:  # the fleet wrote one's outcome already: its confirm leaves it standing
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": due[0]})
    autocommit.clear()
    ended = []
    ran = statements_run(rt.engine, lambda: ended.extend(deliveries.end_marks(marked)), autocommit=autocommit)
    assert len(ran) == 1 and ran[0].count("UPDATE scrape_runs") == 1 and ";" not in ran[0] and autocommit == [True]
    assert ended == ["completed", "running", "running"]
    with rt.engine.connect() as conn:
        unmarked = "SELECT count(*) FROM scrape_runs WHERE delivering_by IS NULL AND handed_off = 'webhook'"
        assert conn.execute(sa.text(unmarked)).scalar_one() == 3


def test_a_pass_marks_its_next_set_once_a_quarter_of_the_ready_ones_are_taken_the_older_ones_first(webhook_runtime):
    rt = webhook_runtime(10)
    due_retries(rt.engine, 20)
    deliveries = Deliveries(rt, rt.executor, POLICY)
    deliveries.ahead = 9  # as `drain` sets it for a cap of 10
    first = deliveries.mark()
    assert isinstance(first, Marked) and len(deliveries.ready) == 9
    taken = [deliveries.ready.popleft() for _ in range(2)]
    assert deliveries.mark_before_running_dry() is None  # seven of nine still ready: no set yet
    taken.append(deliveries.ready.popleft())
    older = list(deliveries.ready)
    assert deliveries.mark_before_running_dry() is None  # the cap is reached: the lanes take those ready
    with rt.engine.begin() as conn:  # the fleet ended the four taken: four slots free
        ids = [m.run.id for m in [first, *taken]]
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = ANY(:ids)"), {"ids": ids})
    mine = deliveries.mark_before_running_dry()
    assert isinstance(mine, Marked) and mine.by != first.by  # a new set: one for this lane, three ready
    assert list(deliveries.ready)[:6] == older and len(deliveries.ready) == 9  # the older ones go first
    with rt.engine.connect() as conn:
        assert conn.execute(sa.text(HANDED)).scalar_one() == 10


def test_each_thread_calling_the_fleet_has_a_client_of_its_own_closed_once_the_thread_ended():
    clients = ClientPerThread(httpx.Client)
    mine = clients.get()
    assert clients.get() is mine
    theirs: list[httpx.Client] = []
    other = threading.Thread(target=lambda: theirs.append(clients.get()))
    other.start()
    other.join(60)
    assert theirs[0] is not mine and not theirs[0].is_closed
    later: list[httpx.Client] = []
    another = threading.Thread(target=lambda: later.append(clients.get()))
    another.start()
    another.join(60)
    assert theirs[0].is_closed and not mine.is_closed  # a lane of a pass gone: its client (socket) goes
    clients.close()
    assert mine.is_closed and later[0].is_closed
    after: list[httpx.Client] = []
    last = threading.Thread(target=lambda: after.append(clients.get()))
    last.start()
    last.join(60)
    assert after[0].is_closed  # closed: a call on it raises, as on the one shared client before


def test_a_set_checks_each_candidates_chain_for_a_completed_run_by_index_whatever_the_stats(webhook_runtime):
    rt = webhook_runtime(3)
    due_retries(rt.engine, 3)
    rt.executor.sends_again = False
    marking: list = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        if "pg_advisory_xact_lock" in statement:
            marking.append((statement.partition(";")[2], parameters))

    sa.event.listen(rt.engine, "before_cursor_execute", seen)
    try:
        Deliveries(rt, rt.executor, POLICY).mark_set(1, 2)
    finally:
        sa.event.remove(rt.engine, "before_cursor_execute", seen)
    statement, parameters = marking[0]
    with rt.engine.connect() as conn:
        plan = "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + statement, parameters))
    # A subquery run for each candidate (on a large table: its chain's root by the primary key, its
    # retries by the chain index), never an anti-join whose plan the stats choose: with stats taken
    # while few runs had completed, that join compared every candidate with every completed run.
    assert "Anti Join" not in plan and "NOT EXISTS(SubPlan" in plan, plan


def test_a_set_finding_no_room_says_so_even_when_room_comes_free_right_after_it(webhook_runtime, db_url):
    rt = webhook_runtime(2)
    due = due_retries(rt.engine, 3)
    rt.executor.sends_again = False  # as Celery: the set is the one marking statement
    deliveries = Deliveries(rt, rt.executor, POLICY)
    assert len(deliveries.mark_batch([None], ahead=1)) == 1 and len(deliveries.ready) == 1  # the cap of 2
    fleet = sa.create_engine(db_url, poolclass=sa.pool.NullPool)

    def fleet_ends_one(conn, cursor, statement, parameters, context, executemany) -> None:
        # The fleet ends a retry the moment the set's marking statement has run (no room then):
        # a slot is free by the time anything after that statement could count the room again.
        if "pg_advisory_xact_lock" in statement:
            with fleet.begin() as other:
                other.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": due[0]})

    sa.event.listen(rt.engine, "after_cursor_execute", fleet_ends_one)
    try:
        # The cap was reached when the set marked: "no room", never "nothing due" (a lane told
        # nothing is due ends, and a pass stops marking ahead, while one retry is still due).
        assert deliveries.mark_batch([None]) == [NO_ROOM]
    finally:
        sa.event.remove(rt.engine, "after_cursor_execute", fleet_ends_one)
        fleet.dispose()
    third = deliveries.mark_batch([None])[0]
    assert isinstance(third, Marked) and third.run.id == due[2]


def scalar(engine: sa.Engine, sql: str):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def test_a_set_of_confirms_locks_its_rows_in_the_tables_order_as_a_fleet_updating_many_does(webhook_runtime, db_url):
    rt = webhook_runtime(3)
    due_retries(rt.engine, 2)
    rt.executor.sends_again = False
    with rt.engine.begin() as conn:  # a table as large as a fleet's: each confirm finds its row by the key
        filler = "INSERT INTO scrape_runs (search_query, location_query, status) SELECT 'old', 'x', 'completed' FROM generate_series(1, 3000)"
        conn.execute(sa.text(filler))
        conn.execute(sa.text("ANALYZE scrape_runs"))
    deliveries = Deliveries(rt, rt.executor, POLICY)
    marked = [deliveries.mark_batch([None], ahead=1)[0], *deliveries.ready]
    with rt.engine.connect() as conn:
        order = "SELECT id FROM scrape_runs WHERE id = ANY(:ids) ORDER BY ctid"
        first, second = conn.execute(sa.text(order), {"ids": [m.run.id for m in marked]}).scalars()
    by_id = {m.run.id: m for m in marked}
    fleet = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    ended: list = []
    try:
        with fleet.connect() as other:
            # A fleet ending many rows in one statement locks them in the table's order: it holds the
            # first while the set of confirms (given the second first) starts.
            other.execute(sa.text("SELECT 1 FROM scrape_runs WHERE id = :id FOR UPDATE"), {"id": first})
            confirming = threading.Thread(
                target=lambda: ended.extend(deliveries.end_marks([by_id[second], by_id[first]]))
            )
            confirming.start()
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%scrape_runs%'"
            wait_until(lambda: scalar(fleet, waiting) == 1, timeout=30)
            # The confirms wait for the first row holding no other: the fleet takes the second at once
            # (locked in the other order, the two would deadlock: PostgreSQL ends one after a second).
            other.execute(sa.text("SELECT 1 FROM scrape_runs WHERE id = :id FOR UPDATE NOWAIT"), {"id": second})
            other.commit()
        confirming.join(30)
    finally:
        fleet.dispose()
    assert ended == ["running", "running"]
