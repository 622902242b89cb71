"""The Celery executor (SPEC §16) when its broker dies mid-run and comes back: nothing sent twice,
nothing stranded. A Redis of this module's own (Debian's redis-server, no persistence: killed, it
forgets every queued task, the hardest case) that the test `kill -9`s and restarts on its port,
and a real Celery worker process (tests/celery_fleet.py's task, which records each execution).

1. No worker yet: due retries are sent (queued in Redis), then Redis is killed: their tasks are
   lost with it, their rows `running`.
2. Redis down: due retries are put back pending, one postponement each, no budget spent.
3. Redis back, a worker up, three stuck-runs processes at once: each postponed retry is sent once
   and its task runs once; the lost ones are the stuck checker's (failed as stuck, retried, sent
   once, run once). Every chain ends completed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa

from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.stuck import sweep_stuck_runs
from tests.conftest import REPO
from tests.daemons import DaemonProcess, wait_until
from tests.helpers import insert_due_retry, make_runtime
from tests.integration.test_celery import PASSWORD, TASK, free_port
from tests.integration.test_celery import fleet_db as fleet_db  # a module fixture, shared
from tests.services import require_service

pytestmark = pytest.mark.slow
POLICY = RetryPolicy(stuck_after=timedelta(seconds=1), retry_delay=timedelta(0))


class Broker:
    """redis-server on a port of its own, killed and restarted on it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), *args, "--requirepass", PASSWORD],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, timeout=30, every=0.05)

    def answers(self) -> bool:
        import redis

        try:
            return redis.Redis(port=self.port, password=PASSWORD, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def broker():
    require_service("redis", shutil.which("redis-server") is not None, "apt-get install redis-server")
    pytest.importorskip("celery", reason="missing service: celery (pip install 'stuck-runs[celery]')")
    server = Broker()
    server.start()
    yield server
    server.kill()


@contextlib.contextmanager
def celery_worker(broker_url: str, db_url: str):
    log = tempfile.TemporaryFile("w+")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": db_url, "FLEET_BROKER_URL": broker_url}
    args = ["-A", "tests.celery_fleet", "worker", "--pool=solo", "--without-gossip", "--without-mingle"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", *args, "--loglevel=INFO", "-n", f"broker-{uuid.uuid4().hex[:6]}@%h"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def ready() -> bool:
        log.seek(0)
        return "ready." in log.read()

    try:
        wait_until(ready, timeout=90, every=0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()


def states(engine, ids) -> dict[str, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id::text, status, retry_count, postponements FROM scrape_runs WHERE id::text = ANY(:ids)"),
            {"ids": [str(i) for i in ids]},
        ).all()
    return {r[0]: tuple(r[1:]) for r in rows}


def executions(engine) -> Counter:
    with engine.connect() as conn:
        return Counter(conn.execute(sa.text("SELECT task_id FROM celery_seen")).scalars())


def test_the_broker_killed_mid_run_and_restarted_sends_nothing_twice_and_strands_nothing(fleet_db, broker):
    engine = sa.create_engine(fleet_db)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM scrape_runs; DELETE FROM celery_seen")
        lost = [insert_due_retry(conn, search_query=f"lost{n}")[1] for n in range(6)]
    settings = {"celery_broker_url": broker.url, "celery_task": TASK, "max_concurrent_retries": 40}
    rt = make_runtime(fleet_db, policy=POLICY, **settings)
    try:
        assert process_due_retries(rt).handed_off == 6  # queued in Redis; no worker takes them yet
    finally:
        rt.close()
    broker.kill()  # the queue dies with it
    with engine.begin() as conn:
        postponed = [insert_due_retry(conn, search_query=f"later{n}")[1] for n in range(6)]
    rt = make_runtime(fleet_db, policy=POLICY, **settings)
    try:
        assert process_due_retries(rt).postponed == 6
    finally:
        rt.close()
    assert set(states(engine, postponed).values()) == {("pending_retry", 1, 1)}  # no budget spent
    assert set(states(engine, lost).values()) == {("running", 1, 0)}

    broker.start()
    with engine.begin() as conn:  # the outage is over: due now, as an operator makes it (the backoff is a minute)
        conn.execute(sa.text("UPDATE scrape_runs SET next_retry_at = now() WHERE status = 'pending_retry'"))
    with celery_worker(broker.url, fleet_db):
        env = {"CELERY_BROKER_URL": broker.url, "CELERY_TASK": TASK, "MAX_CONCURRENT_RETRIES": "40"}
        env |= {"SCRAPE_RUN_COMMAND": "", "LOG_LEVEL": "WARNING"}
        procs = [DaemonProcess(fleet_db, sys.executable, "-m", "scheduler", "process", **env) for _ in range(3)]
        try:
            for proc in procs:
                assert proc.proc.wait(120) == 0, proc.output()
        finally:
            logs = [proc.stop() for proc in procs]
        assert PASSWORD not in "".join(logs)
        wait_until(lambda: set(states(engine, postponed).values()) == {("completed", 1, 1)}, timeout=90)
        # The lost tasks' rows: stuck, failed by the checker, retried, sent once each.
        rt = make_runtime(fleet_db, policy=POLICY, **settings)
        try:
            wait_until(lambda: sweep_stuck_runs(rt).failed == 0 and _all_lost_failed(engine, lost), timeout=60)
            assert process_due_retries(rt).handed_off == 6
        finally:
            rt.close()

        def chains_ended() -> bool:
            with engine.connect() as conn:
                return not conn.execute(
                    sa.text("SELECT count(*) FROM scrape_runs WHERE status IN ('running', 'pending_retry')")
                ).scalar()

        wait_until(chains_ended, timeout=90)
    with engine.connect() as conn:
        retries_of_lost = conn.execute(
            sa.text("SELECT id::text, status FROM scrape_runs WHERE retry_count = 2 AND search_query LIKE 'lost%'")
        ).all()
    engine.dispose()
    assert len(retries_of_lost) == 6 and {s for _, s in retries_of_lost} == {"completed"}
    ran = executions(engine)
    expected = {str(i) for i in postponed} | {i for i, _ in retries_of_lost}
    assert set(ran) == expected and set(ran.values()) == {1}  # each sent and run once; the lost never ran
    assert set(states(engine, lost).values()) == {("failed", 1, 0)}


def _all_lost_failed(engine, lost) -> bool:
    return all(status == "failed" for status, _, _ in states(engine, lost).values())
