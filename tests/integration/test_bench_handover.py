"""bench/handover.py's fleet: it plays the workers that finish at once, completing the row of each
job the engine took. A fleet that completed a row the engine never got would hide a lost send (and
blame ours for it); one that skipped a job, or died on a deadlock, would leave the cap's slots taken
and the bench measuring a stall."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from bench.handover import QUEUE, finish_taken, tasks_taken
from tests.daemons import wait_until
from tests.services import require_service

# The fleet's first write meets a deadlock (what its UPDATE of many rows met against ours' set-wide
# statements); the writes after it go through.
ONCE_DEADLOCKED = """
CREATE SEQUENCE bench_fleet_writes;
CREATE FUNCTION bench_fleet_once_deadlocked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('bench_fleet_writes') = 1 THEN
        RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER once_deadlocked BEFORE UPDATE ON scrape_runs
    FOR EACH STATEMENT EXECUTE FUNCTION bench_fleet_once_deadlocked();
"""
RUNNING = """INSERT INTO scrape_runs (id, search_query, location_query, status, started_at, handed_off, delivering_by)
VALUES (CAST(:id AS uuid), 'write', 'Belgium', 'running', now(), :mode, :by)"""


class Value:
    value = 0


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    require_service("redis", shutil.which("redis-server") is not None, "apt-get install redis-server")
    pytest.importorskip("redis", reason="missing service: redis (pip install 'stuck-runs[celery]')")
    from tests.integration.test_celery_broker import Broker

    server = Broker()
    server.start()
    yield server.url
    server.kill()


def push(broker_url: str, task_ids: list[str]) -> None:
    """As Celery's Redis transport sends: LPUSH, the newest first."""
    import redis

    store = redis.Redis.from_url(broker_url)
    for task in task_ids:
        store.lpush(QUEUE, json.dumps({"headers": {"id": task}}))


class Fleet:
    """`finish_taken` in a thread, as the bench runs it in a process; `failed` what it raised."""

    def __init__(self, db_url: str, taken: tuple[str, str]) -> None:
        self.ready, self.halt, self.most = threading.Event(), threading.Event(), Value()
        self.failed: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, args=(db_url, taken), daemon=True)

    def run(self, db_url: str, taken: tuple[str, str]) -> None:
        try:
            finish_taken(db_url, taken, self.ready, self.halt, self.most)
        except BaseException as exc:  # noqa: BLE001 - what the test reports
            self.failed.append(exc)

    def __enter__(self) -> Fleet:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.halt.set()
        self.thread.join(30)


def statuses(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {str(i): s for i, s in conn.execute(sa.text("SELECT id, status FROM scrape_runs"))}


def test_the_fleet_completes_only_the_tasks_the_broker_holds_and_goes_on_after_a_deadlock(engine, db_url, broker):
    sent, never_sent, later = (str(uuid.uuid4()) for _ in range(3))
    with engine.begin() as conn:
        conn.exec_driver_sql(ONCE_DEADLOCKED)
        for run_id in (sent, never_sent, later):
            conn.execute(sa.text(RUNNING), {"id": run_id, "mode": "celery", "by": "here"})
    redis_module = pytest.importorskip("redis")
    redis_module.Redis.from_url(broker).delete(QUEUE)  # what another test of the module's broker left
    push(broker, [sent])
    with Fleet(db_url, ("broker", broker)) as fleet:
        # Its first write was ended by a deadlock: the same outcome is written again.
        wait_until(lambda: fleet.failed or statuses(engine)[sent] == "completed", timeout=30)
        assert not fleet.failed, fleet.failed
        push(broker, [later])  # sent after the fleet's first reads
        wait_until(lambda: fleet.failed or statuses(engine)[later] == "completed", timeout=30)
        assert not fleet.failed, fleet.failed
        assert statuses(engine)[never_sent] == "running"  # its task never reached the broker
        assert fleet.most.value == 2  # each task taken once
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT last_value FROM bench_fleet_writes")).scalar_one() >= 3


def test_scrapyds_fleet_completes_only_the_deliveries_answered_ok(engine, db_url):
    confirmed, marked, other_mode = (str(uuid.uuid4()) for _ in range(3))
    with engine.begin() as conn:
        conn.execute(sa.text(RUNNING), {"id": confirmed, "mode": "scrapyd", "by": None})
        conn.execute(sa.text(RUNNING), {"id": marked, "mode": "scrapyd", "by": "a delivery under way"})
        conn.execute(sa.text(RUNNING), {"id": other_mode, "mode": "celery", "by": None})
    with Fleet(db_url, ("confirmed", "scrapyd")) as fleet:
        wait_until(lambda: fleet.failed or statuses(engine)[confirmed] == "completed", timeout=30)
        assert not fleet.failed, fleet.failed
        assert statuses(engine)[marked] == "running"  # Scrapyd has not answered: it may not have the job
        with engine.begin() as conn:  # answered ok: its mark ends
            conn.execute(
                sa.text("UPDATE scrape_runs SET delivering_by = NULL WHERE id = CAST(:id AS uuid)"), {"id": marked}
            )
        wait_until(lambda: fleet.failed or statuses(engine)[marked] == "completed", timeout=30)
        assert not fleet.failed, fleet.failed
        assert statuses(engine)[other_mode] == "running"


def test_the_fleet_reads_each_task_the_broker_holds_once_however_they_arrive(broker):
    import redis

    redis.Redis.from_url(broker).delete(QUEUE)
    take = tasks_taken(broker)
    pushed, read = [], []
    for burst in (3, 0, 1, 50, 2):
        ids = [str(uuid.uuid4()) for _ in range(burst)]
        push(broker, ids)
        pushed += ids
        read += take()
    assert sorted(read) == sorted(pushed) and len(read) == len(set(read)) == 56
    assert take() == []
