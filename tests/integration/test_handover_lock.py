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


def statements_run(engine: sa.Engine, call) -> list[str]:
    """The statements on the runs table (or its lock) that `call()` ran."""
    ran: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        if "scrape_runs" in statement or "pg_advisory" in statement:
            ran.append(statement)

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        call()
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    return ran


def test_a_set_counts_the_room_and_marks_up_to_it_in_one_statement_under_the_lock(webhook_runtime):
    rt = webhook_runtime(3)
    due = due_retries(rt.engine, 5)
    deliveries = Deliveries(rt, rt.executor, POLICY)
    answers: list = []
    ran = statements_run(rt.engine, lambda: answers.extend(deliveries.mark_batch([None, None], ahead=4)))
    # The lock, the lapsed leases (a webhook sends again), then the room and the mark together.
    assert len(ran) == 3 and "pg_advisory_xact_lock" in ran[0]
    assert all(isinstance(a, Marked) for a in answers) and len(deliveries.ready) == 1  # the room of 3
    assert [m.run.id for m in [*answers, *deliveries.ready]] == due[:3]  # the longest overdue first
    assert deliveries.mark_batch([None]) == [NO_ROOM]  # the cap is reached: not "nothing due"
    with rt.engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE status = 'running'"))
    assert len(deliveries.mark_batch([None], ahead=4)) == 1 and len(deliveries.ready) == 2  # the last two due
    assert deliveries.mark_batch([None]) == [None]  # room left, nothing due
    with rt.engine.connect() as conn:
        assert conn.execute(sa.text(HANDED)).scalar_one() == 2


def test_a_pass_marks_its_next_set_once_half_the_ready_ones_are_taken_the_older_ones_first(webhook_runtime):
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
