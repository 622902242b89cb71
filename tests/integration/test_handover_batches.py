"""The hand-over's marks in sets (issue 23): lanes that want a retry at once are marked for in one
transaction under the cap's lock, waiting for it with no session held; a set is the highest
priority then the longest overdue, lapsed leases first, and never more than the cap leaves room for,
in one process or several."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from loguru import logger

from db.layout import Layout, parse_column_map
from jobs.batching import Combined
from jobs.clock import SystemClock
from jobs.delivery import LEASE_MARGIN, LEASE_TOO_SHORT, NO_ROOM, Deliveries, lanes_for
from jobs.executors.outcome import HandedOver
from jobs.executors.senders import Senders, answer_within
from jobs.outcomes import Marked
from jobs.rules import RetryPolicy
from tests.daemons import wait_until
from tests.helpers import insert_due_retry, make_runtime
from tests.integration.test_priority import EXPECTED
from tests.integration.test_priority import due_retries as prioritized
from tests.integration.test_races import finish, spawn
from tests.receiver import start_receiver

WAITING_FOR_A_ROW = "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
WAITING_FOR_THE_LOCK = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
HANDED = "SELECT count(*) FROM scrape_runs WHERE status = 'running' AND handed_off = 'webhook'"
POLICY = RetryPolicy(retry_delay=timedelta(hours=4), stuck_after=timedelta(hours=1))


@pytest.fixture
def opened():
    runtimes = []

    def open_runtime(db_url, receiver, **settings):
        runtimes.append(make_runtime(db_url, webhook=receiver.url + "/r/{run_id}", policy=POLICY, **settings))
        return runtimes[-1]

    yield open_runtime
    for rt in runtimes:
        rt.close()


def due_retries(db_url, count: int) -> list:
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        ids = [insert_due_retry(conn, search_query=f"q{i}")[1] for i in range(count)]
    engine.dispose()
    return ids


def lapse(engine: sa.Engine, ids: list) -> None:
    """As a process killed right after its mark committed leaves them: marked, the lease run out."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE scrape_runs SET status = 'running', started_at = now(), handed_off = 'webhook',"
                " next_retry_at = NULL, delivering_until = now() - interval '1 second', delivering_by = 'gone'"
                " WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )


def test_lanes_waiting_at_once_get_their_retries_from_one_mark_holding_no_session_meanwhile(db_url, tmp_path, opened):
    receiver = start_receiver(tmp_path)  # nothing is delivered: only marked
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=10)
        due_retries(db_url, 8)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        marked: dict[int, object] = {}

        def lane(n: int) -> None:
            marked[n] = deliveries.mark()

        lanes = [threading.Thread(target=lane, args=(n,)) for n in range(6)]
        holder = sa.create_engine(db_url)
        with holder.begin() as conn:
            conn.execute(rt.queries.handoff_lock)  # held elsewhere: the first lane's mark waits for it
            lanes[0].start()
            wait_until(lambda: conn.execute(sa.text(WAITING_FOR_THE_LOCK)).scalar_one() == 1, timeout=60)
            for thread in lanes[1:]:
                thread.start()
            wait_until(lambda: len(deliveries.batches._waiting) == 5, timeout=60)
            assert rt.engine.pool.checkedout() == 1  # the five wait for the next set, not for a session
        holder.dispose()
        for thread in lanes:
            thread.join(60)
    finally:
        receiver.stop()
    assert all(isinstance(m, Marked) for m in marked.values())
    assert len({m.run.id for m in marked.values()}) == 6
    # The first lane's own transaction, then one for the five that waited meanwhile.
    assert sorted(sum(m.by == other.by for other in marked.values()) for m in marked.values()) == [1] + [5] * 5
    assert receiver.requests() == []


def test_a_set_marked_at_once_is_the_highest_priority_then_the_longest_overdue_in_that_order(engine, db_url, tmp_path):
    prioritized(engine)
    receiver = start_receiver(tmp_path)
    layout = Layout(columns=parse_column_map("priority=urgency"))
    rt = make_runtime(db_url, webhook=receiver.url + "/r/{run_id}", layout=layout, max_concurrent_retries=10)
    try:
        deliveries = Deliveries(rt, rt.executor, POLICY)
        first, second = deliveries.mark_batch([None] * 3), deliveries.mark_batch([None] * 3)
    finally:
        rt.close()
        receiver.stop()
    names = [m.run.inputs["search_query"] for m in first + second[:2]]
    assert names == [name for name, _, _ in EXPECTED]
    assert second[2] is None  # nothing more is due
    assert len({m.by for m in first}) == 1 and first[0].by != second[0].by


def test_lapsed_leases_come_first_and_count_against_the_cap_of_a_set(db_url, tmp_path, opened):
    receiver = start_receiver(tmp_path)
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=3)
        lapsed = due_retries(db_url, 2)
        lapse(rt.engine, lapsed)
        due = due_retries(db_url, 4)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        answers = deliveries.mark_batch([None] * 5)
        then = deliveries.mark_batch([None] * 2)
    finally:
        receiver.stop()
    again, fresh, *rest = answers[:2], answers[2], *answers[3:]
    assert {m.run.id for m in again} == set(lapsed) and all(m.again for m in again)
    assert fresh.run.id in due and not fresh.again
    assert rest == [NO_ROOM, NO_ROOM] and then == [NO_ROOM, NO_ROOM]  # 2 lapsed + 1 fresh = the cap of 3
    with rt.engine.connect() as conn:
        assert conn.execute(sa.text(HANDED)).scalar_one() == 3


@pytest.mark.slow
def test_three_processes_marking_sets_at_once_never_exceed_the_cap_and_deliver_each_retry_once(db_url, tmp_path):
    """The receiver answers 202 and writes nothing: each retry handed stays `running`, holding its
    slot, so the cap (4) must stop fifteen lanes in three processes at exactly four."""
    receiver = start_receiver(tmp_path)
    try:
        taken, *_ = due_retries(db_url, 31)
        with sa.create_engine(db_url).begin() as conn:  # one slot taken already: a retry handed before
            conn.execute(
                sa.text("UPDATE scrape_runs SET status = 'running', handed_off = 'webhook' WHERE id = :id"),
                {"id": taken},
            )
        env = {
            "DATABASE_URL": db_url,
            "SCRAPE_RUN_WEBHOOK": receiver.url + "/r/{run_id}",
            "MAX_CONCURRENT_RETRIES": "5",
            "LOG_LEVEL": "WARNING",
        }
        finish([spawn("-m", "scheduler", "process", env=env) for _ in range(3)])
    finally:
        receiver.stop()
    keys = [request["key"] for request in receiver.requests()]
    assert len(keys) == 4 and len(set(keys)) == 4
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text(HANDED)).scalar_one() == 5
        assert conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE delivering_by IS NOT NULL")).scalar() == 0
    engine.dispose()


def test_confirms_end_each_mark_still_its_deliverys_in_one_statement(db_url, tmp_path, opened):
    receiver = start_receiver(tmp_path)
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=10)
        due_retries(db_url, 3)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        marks = deliveries.mark_batch([None] * 3)
        taken = marks[1].run.id
        with rt.engine.begin() as conn:  # its lease ran out and another process marked it anew
            conn.execute(sa.text("UPDATE scrape_runs SET delivering_by = 'another' WHERE id = :id"), {"id": taken})
            conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": marks[2].run.id})
        ended = deliveries.end_marks(marks)
        with rt.engine.connect() as conn:
            left = {
                r[0]: r[1] for r in conn.execute(sa.text("SELECT id, delivering_by FROM scrape_runs WHERE is_retry"))
            }
    finally:
        receiver.stop()
    assert ended == ["running", None, "completed"]  # what the fleet wrote stands
    assert left == {marks[0].run.id: None, taken: "another", marks[2].run.id: None}


def test_lanes_confirming_while_a_set_is_written_are_confirmed_together_in_the_next(db_url, tmp_path, opened):
    receiver = start_receiver(tmp_path)
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=10)
        due_retries(db_url, 5)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        marks = deliveries.mark_batch([None] * 5)
        statements: list[str] = []
        sa.event.listen(rt.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        outcomes: dict[int, object] = {}

        def lane(n: int) -> None:
            outcomes[n] = deliveries.settle(marks[n], HandedOver("webhook"))

        lanes = [threading.Thread(target=lane, args=(n,)) for n in range(5)]
        holder = sa.create_engine(db_url)
        with holder.begin() as conn:  # the first lane's confirm waits for this row lock
            conn.execute(sa.text("SELECT 1 FROM scrape_runs WHERE id = :id FOR UPDATE"), {"id": marks[0].run.id})
            lanes[0].start()
            wait_until(lambda: conn.execute(sa.text(WAITING_FOR_A_ROW)).scalar_one() == 1, timeout=60)
            for thread in lanes[1:]:
                thread.start()
            wait_until(lambda: len(deliveries.confirms._waiting) == 4, timeout=60)
            assert rt.engine.pool.checkedout() == 1  # the four wait for the next set, not for a session
        holder.dispose()
        for thread in lanes:
            thread.join(60)
    finally:
        receiver.stop()
    assert sorted(o.status for o in outcomes.values()) == ["handed_off"] * 5
    assert sum("unnest" in statement for statement in statements) == 2  # the first lane's, then the four's
    with rt.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE delivering_by IS NOT NULL")).scalar() == 0


def test_a_set_of_confirms_postgresql_ends_to_break_a_deadlock_is_written_again(db_url, tmp_path, opened):
    """A fleet that writes several rows in one transaction may lock them in another order than a
    set of confirms: PostgreSQL ends one of the two; if the set, it is tried again, not lost."""
    receiver = start_receiver(tmp_path)
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=10)
        due_retries(db_url, 2)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        first, last = deliveries.mark_batch([None] * 2)
        # Ours detects the deadlock (100 ms) long before the fleet's transaction would (60 s).
        sa.event.listen(rt.engine, "connect", lambda dbapi, _: dbapi.cursor().execute("SET deadlock_timeout = '100ms'"))
        rt.engine.dispose()  # its sessions open anew, with that setting
        fleet = sa.create_engine(db_url)
        ended: list = []
        with fleet.begin() as conn:
            conn.exec_driver_sql("SET deadlock_timeout = '60s'")
            lock = "UPDATE scrape_runs SET status = 'completed' WHERE id = :id"
            conn.execute(sa.text(lock), {"id": last.run.id})
            confirming = threading.Thread(target=lambda: ended.extend(deliveries.end_marks([first, last])))
            confirming.start()
            wait_until(lambda: conn.execute(sa.text(WAITING_FOR_A_ROW)).scalar_one() == 1, timeout=60)
            conn.execute(sa.text(lock), {"id": first.run.id})  # waits for the set, which waits for it
        fleet.dispose()
        confirming.join(60)
    finally:
        receiver.stop()
    assert ended == ["completed", "completed"]  # written again once the fleet's transaction ended
    with rt.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE delivering_by IS NOT NULL")).scalar() == 0


def test_a_pass_marks_ahead_as_many_as_the_room_allows_in_start_order_for_the_next_lanes(db_url, tmp_path, opened):
    receiver = start_receiver(tmp_path)  # nothing is delivered: only marked
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=5)
        due = due_retries(db_url, 8)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        asked = deliveries.mark_batch([None], ahead=7)
        ahead = list(deliveries.ready)
        then = deliveries.mark_batch([None], ahead=7)
    finally:
        receiver.stop()
    assert len(asked) == 1 and len(ahead) == 4  # the room of 5: one for the lane asking, four ahead
    assert [m.run.id for m in asked + ahead] == due[:5]  # as they were due, the longest overdue first
    assert len({m.by for m in asked + ahead}) == 1  # one transaction
    assert then == [NO_ROOM] and len(deliveries.ready) == 4
    with rt.engine.connect() as conn:
        assert conn.execute(sa.text(HANDED)).scalar_one() == 5


def test_retries_marked_ahead_that_no_lane_delivered_are_put_back_as_they_were(db_url, tmp_path, opened):
    receiver = start_receiver(tmp_path)
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=10)
        due_retries(db_url, 4)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        (lanes,) = deliveries.mark_batch([None], ahead=3)  # three marked ahead; then the pass is stopped
        stop = threading.Event()
        stop.set()
        outcomes = deliveries.drain(stop)
        with rt.engine.connect() as conn:
            left = conn.execute(
                sa.text(
                    "SELECT status, delivering_by IS NOT NULL, next_retry_at < now() FROM scrape_runs"
                    " WHERE is_retry AND id <> :id"
                ),
                {"id": lanes.run.id},
            ).all()
    finally:
        receiver.stop()
    assert [o.status for o in outcomes] == ["released"] * 3 and not deliveries.ready
    assert left == [("pending_retry", False, True)] * 3  # unmarked, due as they were
    assert receiver.requests() == []


class LaterClock(SystemClock):
    """The system's clock, `ahead` later: a pass that takes up retries marked `ahead` ago."""

    def __init__(self, ahead: timedelta) -> None:
        self.ahead = ahead

    def now(self) -> datetime:
        return super().now() + self.ahead


def test_retries_marked_ahead_whose_lease_ran_short_are_put_back_saying_so(db_url, tmp_path, opened):
    """A retry that waited for a lane until its lease no longer covers a delivery is not sent (another
    process could deliver it too): put back, and its log line says why, not that a signal stopped it."""
    receiver = start_receiver(tmp_path)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=10)
        due_retries(db_url, 4)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        (lanes,) = deliveries.mark_batch([None], ahead=3)
        rt.clock = LaterClock(LEASE_MARGIN + timedelta(seconds=1))  # the lanes take them 31 s later
        outcomes = deliveries.drain(threading.Event())
    finally:
        logger.remove(sink)
        receiver.stop()
    assert [o.status for o in outcomes].count("released") == 3 and not deliveries.ready  # then marked anew
    released = [line for line in lines if "left pending_retry" in line]
    assert len(released) == 3 and all(LEASE_TOO_SHORT in line for line in released), released


def test_a_pass_lanes_hand_their_confirms_over_and_go_on_each_set_written_once(db_url, tmp_path, opened):
    """Confirms written by whichever lane finds no set being written, over all that came meanwhile:
    a lane adding one while a set is written does not wait for it."""
    writing, go = threading.Event(), threading.Event()
    sets: list[list[int]] = []

    def write(items):
        sets.append(list(items))
        if len(sets) == 1:
            writing.set()
            assert go.wait(60)

    combined = Combined(write)
    first = threading.Thread(target=combined.add, args=(0,))
    first.start()
    assert writing.wait(60)
    for n in range(1, 4):
        combined.add(n)  # returns at once: the first thread writes them next
    go.set()
    first.join(60)
    assert sets == [[0], [1, 2, 3]]


def test_a_celery_pass_runs_a_few_lanes_whatever_the_cap_and_a_webhook_one_per_slot():
    class Engine:
        def __init__(self, lanes):
            self.lanes = lanes

    celery_like, webhook_like = Engine(8), Engine(None)
    assert lanes_for(celery_like, 100) == 8 and lanes_for(celery_like, 3) == 3
    assert lanes_for(webhook_like, 100) == 100


def test_a_lane_finding_no_room_waits_for_its_pass_own_deliveries_to_settle_then_asks_again(db_url, tmp_path, opened):
    """A set marked ahead fills the cap at once: the lanes asking next find no room, which the fleet
    may free as soon as one of the pass's own deliveries is settled; with none unsettled, the cap is
    taken by what is running and the lane ends its pass."""
    receiver = start_receiver(tmp_path)
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=2)
        deliveries = Deliveries(rt, rt.executor, POLICY)
        stop = threading.Event()
        assert deliveries.room_may_come(stop) is False  # nothing of its own in flight
        deliveries.count_settled(marked=2)
        answers: list[bool] = []
        waiting = threading.Thread(target=lambda: answers.append(deliveries.room_may_come(stop)))
        waiting.start()
        wait_until(lambda: waiting.is_alive() and deliveries.unsettled == 2, timeout=60)
        assert answers == []  # waits while both are in flight
        deliveries.count_settled(settled=1)
        waiting.join(60)
        assert answers == [True]
    finally:
        receiver.stop()


def test_sends_reuse_idle_sender_threads_and_one_given_up_on_before_it_started_never_runs():
    senders = Senders("test-send")
    try:
        for n in range(20):  # one after another, each once the last one's sender is idle again
            assert answer_within(senders.submit(lambda n=n: n), threading.Event(), time.monotonic() + 60) == n
            wait_until(lambda: senders.idle == 1, timeout=60)
        assert senders.started == 1
    finally:
        senders.close()
    waiting, ran = Senders("test-send"), []
    waiting.closed = True  # no sender starts: a send waits in the queue, as behind stuck ones
    try:
        late = waiting.submit(lambda: ran.append("late"))
        assert answer_within(late, threading.Event(), time.monotonic() + 0.2) is None and late.cancelled()
        waiting.closed = False
        assert answer_within(waiting.submit(lambda: "next"), threading.Event(), time.monotonic() + 60) == "next"
        assert ran == []  # the sender that started skipped the send given up on
    finally:
        waiting.close()
