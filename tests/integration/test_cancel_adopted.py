"""Cancelling running retries (SPEC §16) on every adopted table shape, and the dispatcher pass that
stops a retry handed to an engine (`Cancels`), in-process: the engine is a stand-in that records
what it was told; the database is real."""

from __future__ import annotations

import threading
from datetime import timedelta

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

    def still_running(self, run) -> bool:
        return not any(kill for _, kill in self.told)


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
