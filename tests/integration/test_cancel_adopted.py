"""Cancelling running retries (SPEC §16) on every adopted table shape, and the dispatcher pass that
stops a retry handed to an engine (`Cancels`), in-process: the engine is a stand-in that records
what it was told (or a Celery whose broker nobody runs); the database is real."""

from __future__ import annotations

import socket
import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.migrate import migrate
from jobs.cancelling import act_on_cancels
from jobs.control import cancel_run
from jobs.executors.base import Cancels
from jobs.executors.outcome import Cancelled
from jobs.manual import chain_history
from jobs.outcomes import record_outcome
from jobs.rules import RetryPolicy
from jobs.runtime import Runtime
from jobs.settings import Settings
from tests.adopted import ADOPTABLE, Adopted, utc_now
from tests.daemons import wait_until
from tests.helpers import make_runtime
from tests.integration.test_cancel_running import running_retry, status
from tests.integration.test_cli import cli
from tests.integration.test_index_predicates import layout_of


def requests(rt) -> list[str]:
    """The cancel requests standing for `rt`'s table (stuck-runs' own table sits in its schema)."""
    with rt.engine.connect() as conn:
        return list(conn.execute(sa.select(rt.queries.cancels.c.run_id)).scalars())


def holding_run_lock(rt, run_id) -> sa.Connection:
    conn = rt.engine.connect()
    conn.execute(sa.text("SELECT pg_advisory_lock(:ns, hashtext(:id))"), {"ns": rt.queries.runs_ns, "id": str(run_id)})
    conn.commit()
    return conn


@pytest.mark.parametrize("adopted", ADOPTABLE, ids=lambda a: a.name)
def test_a_running_retry_is_cancelled_on_every_adopted_table(databases, adopted: Adopted):
    url = databases.create()
    engine = make_engine(url)
    layout = layout_of(adopted)
    with engine.begin() as conn:
        conn.exec_driver_sql(adopted.ddl)
    migrate(engine, adopted.table, None, layout, extend_check=adopted.check_guarded)
    with engine.begin() as conn:
        ids = [
            adopted.insert(
                conn, f"ok-{n}", status=adopted.running[0], started_at=utc_now(), is_retry=True, retry_count=1
            )
            for n in range(2)
        ]
    engine.dispose()
    rt = Runtime.open(Settings(database_url=url, table=adopted.table, layout=layout))
    try:
        gone, live = ids
        assert cancel_run(rt, gone).running == "cancelled"  # nobody holds its run lock
        holder = holding_run_lock(rt, live)
        try:
            done = cancel_run(rt, live)
            assert done.running == "requested" and requests(rt) == [str(live)]
            run = next(a for a in chain_history(rt, live).attempts if a.id == live)
            outcome = record_outcome(rt, RetryPolicy(), run, Cancelled(by="test"))  # the executing process's record
        finally:
            holder.close()
        assert outcome.status == "cancelled" and requests(rt) == []
        with rt.engine.connect() as conn:
            table = sa.text(f'SELECT "{adopted.status}", CAST("{adopted.error}" AS text) FROM {adopted.quoted}')
            written = conn.execute(table).all()
    finally:
        rt.close()
    assert [value for value, _ in written] == [adopted.cancelled] * 2
    assert all("Cancelled by operator" in (error or "") for _, error in written)


class Engine:
    """A stand-in engine that records what it was told, and says the job runs until killed."""

    def __init__(self) -> None:
        self.told: list[tuple[str, bool]] = []
        self.lock = threading.Lock()

    def cancel(self, run, *, kill: bool) -> str:
        with self.lock:
            self.told.append((str(run.id), kill))
        return "killed" if kill else "revoked"

    def still_running(self, runs):
        return [run for run in runs if (str(run.id), True) not in self.told]


def test_an_engine_s_run_is_cancelled_once_then_killed_after_cancel_timeout_by_one_pass(engine, db_url):
    assert isinstance(Engine(), Cancels)
    _, handed = running_retry(engine, handed_off="celery")
    _, here = running_retry(engine)  # run here: left to its executing process's watch
    fleet = Engine()
    rt = make_runtime(db_url, cancel_timeout=timedelta(seconds=1))
    try:
        holder = holding_run_lock(rt, here)
        assert cancel_run(rt, here).running == "requested"
        holder.close()
        with rt.engine.begin() as conn:  # the engine's run is requested as `cancel` does for a Cancels executor
            conn.execute(
                sa.text("INSERT INTO stuck_runs_cancels VALUES ('scrape_runs', :id, now(), 'test', NULL)"),
                {"id": str(handed)},
            )
        passes = [threading.Thread(target=act_on_cancels, args=(rt, fleet, "celery")) for _ in range(3)]
        for thread in passes:
            thread.start()
        for thread in passes:
            thread.join()
        assert fleet.told == [(str(handed), False)] and status(engine, handed) == "cancelled"
        assert status(engine, here) == "running" and sorted(requests(rt)) == sorted([str(handed), str(here)])
        wait_until(lambda: act_on_cancels(rt, fleet, "celery") == 0 and (str(handed), True) in fleet.told, timeout=10)
        assert fleet.told == [(str(handed), False), (str(handed), True)] and requests(rt) == [str(here)]
    finally:
        rt.close()


def request(engine, run_id, *, signalled_ago: timedelta | None = None) -> None:
    """A cancel request for `run_id`, as `cancel` writes it (`signalled_ago`: the engine was asked then)."""
    signalled = "NULL" if signalled_ago is None else f"now() - interval '{signalled_ago.total_seconds()} seconds'"
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO stuck_runs_cancels VALUES ('scrape_runs', :id, now(), 'test', {signalled})"),
            {"id": str(run_id)},
        )


def test_a_request_for_a_run_being_delivered_waits_for_the_next_pass(engine, db_url):
    """A Scrapyd retry whose lease ran out, re-marked by another daemon before this pass: its
    request stays until the delivery ends, then the pass cancels it."""
    now = datetime.now(timezone.utc)
    lease = {"delivering_by": "other host pid 1 delivery abc", "delivering_until": now + timedelta(minutes=5)}
    _, retry = running_retry(engine, handed_off="scrapyd", **lease)
    request(engine, retry)
    fleet = Engine()
    rt = make_runtime(db_url)
    try:
        assert act_on_cancels(rt, fleet, "scrapyd") == 0
        assert requests(rt) == [str(retry)] and fleet.told == [] and status(engine, retry) == "running"
        with engine.begin() as conn:  # the delivery ended: handed over, the mark gone
            conn.execute(sa.text("UPDATE scrape_runs SET delivering_until = NULL, delivering_by = NULL"))
        assert act_on_cancels(rt, fleet, "scrapyd") == 1
    finally:
        rt.close()
    assert fleet.told == [(str(retry), False)] and status(engine, retry) == "cancelled"


def scalar(engine, query: str):
    """`query`'s value read in a transaction of its own (the activity statistics a transaction
    reads are those of its first look)."""
    with engine.connect() as conn:
        return conn.execute(sa.text(query)).scalar_one()


def test_a_run_marked_again_while_the_pass_cancels_it_is_left_to_its_delivery(engine, db_url):
    """The pass read the row with its lease run out; another daemon marks it anew (row locked,
    not committed) before the pass's conditional write: the write waits, then leaves the row to
    the new delivery, and the request stays for the next pass."""
    now = datetime.now(timezone.utc)
    lapsed = {"delivering_by": "dead pid 1 delivery x", "delivering_until": now - timedelta(minutes=1)}
    _, retry = running_retry(engine, handed_off="scrapyd", **lapsed)
    request(engine, retry)
    fleet = Engine()
    rt = make_runtime(db_url)
    remark = engine.connect()
    try:
        remark.execute(
            sa.text("UPDATE scrape_runs SET delivering_until = now() + interval '5 minutes' WHERE id = :id"),
            {"id": retry},
        )
        passed: list[int] = []
        thread = threading.Thread(target=lambda: passed.append(act_on_cancels(rt, fleet, "scrapyd")))
        thread.start()
        blocked = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE%'"
        wait_until(lambda: scalar(engine, blocked) > 0 or not thread.is_alive(), timeout=30)
        remark.commit()
        thread.join(30)
        assert passed == [0] and fleet.told == [] and status(engine, retry) == "running"
        assert requests(rt) == [str(retry)]
    finally:
        remark.close()
        rt.close()


class Unreachable(Engine):
    """An engine that cannot be asked whether its jobs run, nor told to kill them."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[str]] = []

    def still_running(self, runs):
        self.asked.append(sorted(str(run.id) for run in runs))
        return None

    def cancel(self, run, *, kill: bool) -> str:
        raise ConnectionError("broker down")


class KillFails(Engine):
    """An engine that says every job still runs, once for them all, and fails to kill `failing`."""

    def __init__(self, failing) -> None:
        super().__init__()
        self.failing, self.asked = str(failing), 0

    def still_running(self, runs):
        self.asked += 1
        return list(runs)

    def cancel(self, run, *, kill: bool) -> str:
        if str(run.id) == self.failing:
            raise ConnectionError("no answer")
        return super().cancel(run, kill=kill)


def cancelled_retry(engine) -> str:
    """A retry cancelled in its row whose engine was asked to stop it a minute ago."""
    _, retry = running_retry(engine, handed_off="celery")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'cancelled' WHERE id = :id"), {"id": retry})
    request(engine, retry, signalled_ago=timedelta(minutes=1))
    return str(retry)


def test_an_engine_that_cannot_tell_keeps_the_forceful_stop_for_the_next_pass(engine, db_url):
    overdue = sorted(cancelled_retry(engine) for _ in range(2))
    rt = make_runtime(db_url, cancel_timeout=timedelta(seconds=1))
    try:
        down = Unreachable()
        assert act_on_cancels(rt, down, "celery") == 0
        assert down.asked == [overdue] and sorted(requests(rt)) == overdue  # one question for both, both kept
        assert act_on_cancels(rt, down, "celery") == 0 and len(down.asked) == 2  # the next pass asks again
        half = KillFails(failing=overdue[0])
        assert act_on_cancels(rt, half, "celery") == 0
    finally:
        rt.close()
    assert half.asked == 1 and half.told == [(overdue[1], True)]  # one failing kill skips no other
    assert requests(rt) == [overdue[0]]  # the kill the engine did not answer: tried again next pass


def test_a_process_of_one_engine_leaves_another_engines_cancels_to_it(engine, db_url):
    """One table, two engines (a Celery daemon and a Scrapyd one): neither drops nor stops
    through itself what the other was handed."""
    _, fresh = running_retry(engine, handed_off="celery")
    request(engine, fresh)
    overdue = cancelled_retry(engine)  # Celery's, asked a minute ago
    rt = make_runtime(db_url, cancel_timeout=timedelta(seconds=1))
    scrapyd = KillFails(failing=None)
    try:
        assert act_on_cancels(rt, scrapyd, "scrapyd") == 0
    finally:
        rt.close()
    assert scrapyd.asked == 0 and scrapyd.told == []
    assert sorted(requests(rt)) == sorted([str(fresh), overdue]) and status(engine, fresh) == "running"


def test_celery_with_its_broker_down_keeps_the_forceful_stop_and_says_so(engine, db_url):
    pytest.importorskip("celery", reason="missing service: celery (pip install 'stuck-runs[celery]')")
    _, retry = running_retry(engine, handed_off="celery")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": f"redis://:Sekr1t@127.0.0.1:{port}/0",
        "CELERY_TASK": "fleet.scrape",
        "CANCEL_TIMEOUT": "1s",
    }
    asked = cli("cancel", str(retry), env=env)
    assert asked.returncode == 0, asked.stderr
    first = cli("process", env=env)  # cancels the row; the revoke finds no broker
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    assert status(engine, retry) == "cancelled"
    with engine.begin() as conn:  # CANCEL_TIMEOUT has passed since the engine was asked
        conn.execute(sa.text("UPDATE stuck_runs_cancels SET signalled_at = now() - interval '1 minute'"))
    later = cli("process", env=env)
    assert later.returncode == 0 and "Traceback" not in later.stderr, later.stderr
    assert "Sekr1t" not in later.stdout + later.stderr
    assert "the celery engine did not answer whether the cancelled retries still run" in later.stderr
    with engine.connect() as conn:
        kept = conn.execute(
            sa.text("SELECT run_id, signalled_at <= now() - interval '1 second' FROM stuck_runs_cancels")
        )
        assert kept.all() == [(str(retry), True)]  # overdue still: the next pass tries again
