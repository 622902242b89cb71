"""The Celery executor (SPEC §16) against a real Redis (Debian's redis-server) and a real Celery
worker process, one of each for the module, started here; the worker's task writes its run's
outcome (tests/celery_fleet.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.layout import Layout, parse_column_map
from jobs.executors import celery as celery_executor
from jobs.retries import process_due_retries
from tests.conftest import REPO, Databases
from tests.daemons import DaemonProcess, wait_until
from tests.helpers import insert_due_retry, insert_run, make_runtime, row
from tests.integration.test_cli import cli, one_line_error
from tests.services import require_service

pytestmark = pytest.mark.slow
TASK = "fleet.scrape"
PASSWORD = "Br0ker-s3cret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    server = shutil.which("redis-server")
    require_service("redis", server is not None, "apt-get install redis-server")
    pytest.importorskip("celery", reason="missing service: celery (pip install 'stuck-runs[celery]')")
    port = free_port()
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            PASSWORD,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(answers, timeout=20, every=0.05)
    yield f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def fleet_db(server_url, templates):
    dbs = Databases(server_url)
    url = dbs.create(templates["text_tz"])
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE celery_seen (task_id TEXT, run_id TEXT, search_query TEXT, pid INT, priority INT)"
        )
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN urgency SMALLINT")
    engine.dispose()
    yield url
    dbs.drop_all()


@pytest.fixture(scope="module")
def worker(redis_url, fleet_db):
    log = tempfile.TemporaryFile("w+")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": fleet_db, "FLEET_BROKER_URL": redis_url}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_fleet",
            "worker",
            "--pool=prefork",
            "-c",
            "2",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
            "-n",
            f"fleet-{uuid.uuid4().hex[:6]}@%h",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a group of its own: the pool's children end with it
    )

    def ready() -> bool:
        log.seek(0)
        return "ready." in log.read()

    wait_until(ready, timeout=60, every=0.1)
    yield proc
    with contextlib.suppress(ProcessLookupError):  # the worker and its pool's children: none outlives the module
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    log.close()


@pytest.fixture
def engine(fleet_db, worker):
    engine = make_engine(fleet_db)
    with engine.begin() as conn:  # each test on a table of its own rows
        conn.exec_driver_sql("DELETE FROM scrape_runs; DELETE FROM celery_seen; DELETE FROM stuck_runs_cancels")
    yield engine
    engine.dispose()


def celery_env(redis_url: str, **more: str) -> dict[str, str]:
    return {"CELERY_BROKER_URL": redis_url, "CELERY_TASK": TASK, **more}


def runtime(db_url: str, redis_url: str, **settings):
    return make_runtime(db_url, celery_broker_url=redis_url, celery_task=TASK, **settings)


def status(engine, run_id) -> str:
    with engine.connect() as conn:
        return row(conn, run_id)["status"]


def seen(engine) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT task_id, run_id, search_query FROM celery_seen ORDER BY 1")).all()


def test_a_due_retry_is_sent_as_a_task_whose_worker_writes_the_outcome(engine, fleet_db, redis_url):
    with engine.begin() as conn:
        _, retry = insert_due_retry(conn, search_query="Welder", urgency=8)
    rt = runtime(fleet_db, redis_url, layout=Layout(columns=parse_column_map("priority=urgency")))
    try:
        result = process_due_retries(rt)
    finally:
        rt.close()
    assert result.handed_off == 1
    wait_until(lambda: status(engine, retry) == "completed", timeout=30)
    with engine.connect() as conn:
        done = row(conn, retry)
    assert done["handed_off"] == "celery" and done["delivering_by"] is None
    assert seen(engine) == [(str(retry), str(retry), "Welder")]  # task_id = the retry's id; the inputs as kwargs
    with engine.connect() as conn:  # priority 8 of 0..9, higher first, on Redis's scale (0 first): 1
        assert conn.execute(sa.text("SELECT priority FROM celery_seen")).scalar_one() == 1


def test_three_processes_at_once_send_each_retry_exactly_once(engine, fleet_db, redis_url):
    with engine.begin() as conn:
        retries = [insert_due_retry(conn, search_query=f"q{n}")[1] for n in range(30)]
    env = celery_env(redis_url, MAX_CONCURRENT_RETRIES="40", SCRAPE_RUN_COMMAND="")
    procs = [DaemonProcess(fleet_db, sys.executable, "-m", "scheduler", "process", **env) for _ in range(3)]
    try:
        for proc in procs:
            assert proc.proc.wait(60) == 0, proc.output()
    finally:
        logs = [proc.stop() for proc in procs]

    def all_completed() -> bool:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'completed'")).scalar() == 30

    wait_until(all_completed, timeout=60)
    executions = seen(engine)
    assert sorted(task for task, _, _ in executions) == sorted(str(r) for r in retries), logs  # once each
    assert "Traceback" not in "".join(logs) and PASSWORD not in "".join(logs)


class ReplyLosingProxy:
    """Between stuck-runs and Redis: it passes the first LPUSH on and Redis queues it, but Redis's
    answer never reaches the client (a network, or a broker, failing between taking a task and
    answering): the client's read times out, the connection still open."""

    def __init__(self, redis_url: str) -> None:
        target = urlsplit(redis_url)
        self.upstream = (target.hostname, target.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = redis_url.replace(f":{target.port}/", f":{self.listener.getsockname()[1]}/")
        self.lost = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                threading.Thread(target=self.relay, args=(client,), daemon=True).start()

    def relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as upstream:
            threading.Thread(target=self.answers, args=(upstream, client), daemon=True).start()
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    upstream.sendall(data)
                    if b"LPUSH" in data:
                        self.lost.set()  # the answers stop here

    def answers(self, upstream: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if self.lost.is_set():
                    return
                client.sendall(data)

    def close(self) -> None:
        self.listener.close()


def test_a_task_whose_reply_was_lost_is_never_sent_again(engine, fleet_db, redis_url, monkeypatch):
    """The broker took the task and its answer never came: postponed, the retry would be sent a
    second time (two tasks of one id, two scrapes). Counted handed over, it is sent once; had the
    broker lost it, the stuck checker would find the run like any lost task (SPEC §16)."""
    import redis

    with engine.begin() as conn:
        _, retry = insert_due_retry(conn)
    queue = f"lost-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    proxy = ReplyLosingProxy(redis_url)
    monkeypatch.setattr(celery_executor, "CONNECT_TIMEOUT", timedelta(seconds=1))  # its read times out sooner
    rt = runtime(fleet_db, proxy.url, celery_queue=queue)
    try:
        first = process_due_retries(rt)
        second = process_due_retries(rt)
    finally:
        rt.close()
        proxy.close()
    assert proxy.lost.is_set() and [o.status for o in first.executed] == ["handed_off"] and not second.executed
    store = redis.Redis.from_url(redis_url)
    assert store.llen(queue) == 1
    store.delete(queue)
    with engine.connect() as conn:
        handed = row(conn, retry)
    assert (handed["status"], handed["handed_off"], handed["delivering_by"]) == ("running", "celery", None)


def test_an_unreachable_broker_puts_the_retry_back_with_no_budget_spent(engine, fleet_db):
    with engine.begin() as conn:
        _, retry = insert_due_retry(conn)
    dead = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    rt = runtime(fleet_db, dead)
    try:
        result = process_due_retries(rt)
    finally:
        rt.close()
    assert result.postponed == 1 and PASSWORD not in str(result)
    with engine.connect() as conn:
        back = row(conn, retry)
    assert back["status"] == "pending_retry" and back["postponements"] == 1 and back["retry_count"] == 1
    assert back["next_retry_at"] > datetime.now(timezone.utc) and back["handed_off"] is None
    assert seen(engine) == []


def test_a_task_whose_sending_process_died_is_never_sent_again(engine, fleet_db, redis_url):
    """Its mark's lease ran out: a webhook would be delivered again; a Celery task may be queued
    already, so it is left to the stuck checker."""
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=now - timedelta(hours=3))
        lost = insert_run(
            conn,
            status="running",
            started_at=now - timedelta(minutes=5),
            retry_count=1,
            is_retry=True,
            original_run_id=root,
            handed_off="celery",
            delivering_by="dead pid 1 delivery x",
            delivering_until=now - timedelta(minutes=1),
        )
    rt = runtime(fleet_db, redis_url)
    try:
        result = process_due_retries(rt)
    finally:
        rt.close()
    assert result.handed_off == 0 and status(engine, lost) == "running" and seen(engine) == []


def test_a_running_task_is_revoked_and_terminated_by_cancel(engine, fleet_db, redis_url):
    with engine.begin() as conn:
        _, retry = insert_due_retry(conn, search_query="hang forever")
    rt = runtime(fleet_db, redis_url, cancel_timeout=timedelta(seconds=2))
    try:
        process_due_retries(rt)
        wait_until(lambda: seen(engine), timeout=30)  # the worker runs it
        asked = cli("cancel", str(retry), env={"DATABASE_URL": fleet_db, **celery_env(redis_url)})
        assert asked.returncode == 0, asked.stderr
        assert (
            "requested: the daemon tells the engine it was handed to within DISPATCH_POLL (5s); with no daemon running, the next `process` does"
            in asked.stdout
        )
        process_due_retries(rt)  # a dispatcher pass: revoke, terminate
        assert status(engine, retry) == "cancelled"
        cancelled = _run(rt, retry)
        wait_until(lambda: rt.executor.still_running([cancelled]) == [], timeout=30)  # terminated in the worker
    finally:
        rt.close()
    with engine.connect() as conn:
        done = row(conn, retry)
    assert done["error_message"] == "Cancelled by operator" and done["max_retries"] == 4


def _run(rt, run_id):
    from jobs.manual import chain_history

    return next(a for a in chain_history(rt, run_id).attempts if a.id == run_id)


def test_doctor_checks_the_broker_answers(fleet_db, redis_url):
    env = {"DATABASE_URL": fleet_db, **celery_env(redis_url)}
    ok = cli("doctor", env=env)
    assert "Celery broker redis://127.0.0.1" in ok.stdout and "answers" in ok.stdout and PASSWORD not in ok.stdout
    dead = cli("doctor", env={**env, "CELERY_BROKER_URL": f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"})
    assert dead.returncode != 0 and "does not answer" in dead.stdout + dead.stderr
    assert PASSWORD not in dead.stdout + dead.stderr


def test_a_broker_that_refuses_the_credentials_leaves_the_retry_untouched_and_exits_2(engine, fleet_db, redis_url):
    with engine.begin() as conn:
        _, retry = insert_due_retry(conn)
        due = row(conn, retry)["next_retry_at"]
    wrong = redis_url.replace(PASSWORD, "not-the-password")
    result = cli("process", env={"DATABASE_URL": fleet_db, **celery_env(wrong)})
    said = result.stdout + result.stderr
    assert result.returncode == 2 and "refused the credentials: check the user and password in CELERY_BROKER_URL" in (
        one_line_error(result)
    )
    assert "not-the-password" not in said and "Traceback" not in said
    with engine.connect() as conn:  # not postponed: a password is not fixed by waiting
        back = row(conn, retry)
    assert back["status"] == "pending_retry" and back["postponements"] == 0 and back["next_retry_at"] == due
    assert back["handed_off"] is None and back["retry_count"] == 1


def test_doctor_says_the_broker_refused_the_credentials_not_that_it_is_down(fleet_db, redis_url):
    wrong = redis_url.replace(PASSWORD, "not-the-password")
    result = cli("doctor", env={"DATABASE_URL": fleet_db, **celery_env(wrong)})
    said = result.stdout + result.stderr
    assert result.returncode != 0 and "refused the credentials" in said and "does not answer" not in said
    assert "not-the-password" not in said


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"CELERY_TASK": TASK}, "CELERY_TASK is set but CELERY_BROKER_URL is not"),
        ({"CELERY_BROKER_URL": f"redis://:{PASSWORD}@h:1/0"}, "CELERY_BROKER_URL is set but CELERY_TASK is not"),
        ({"CELERY_BROKER_URL": f"http://:{PASSWORD}@h/", "CELERY_TASK": TASK}, "is not a broker URL"),
        ({"CELERY_BROKER_URL": f"redis://:{PASSWORD}@h:99999/0", "CELERY_TASK": TASK}, "has a port that is not"),
        ({"CELERY_BROKER_URL": f"redis://:{PASSWORD}@h:abc/0", "CELERY_TASK": TASK}, "has a port that is not"),
        (  # Celery's failover list, its second URL with no host
            {"CELERY_BROKER_URL": f"redis://:{PASSWORD}@h1:6379/0;redis://:{PASSWORD}@:6379/0", "CELERY_TASK": TASK},
            "is not a broker URL",
        ),
        (
            {"CELERY_BROKER_URL": f"redis://:{PASSWORD}@h:1/0", "CELERY_TASK": TASK, "SCRAPE_RUN_COMMAND": "true"},
            "SCRAPE_RUN_COMMAND and CELERY_BROKER_URL are both set",
        ),
    ],
)
def test_bad_celery_settings_are_one_line_and_exit_2(db_url, env, says):
    result = cli("process", env={"DATABASE_URL": db_url, **env})
    assert result.returncode == 2 and says in one_line_error(result) and PASSWORD not in result.stderr


def test_a_list_of_sentinels_is_a_broker_url_shown_without_its_passwords():
    from jobs.executors.celery import redacted
    from jobs.settings.engine_parsers import parse_broker_url

    url = f"sentinel://:{PASSWORD}@h1:26379;sentinel://:{PASSWORD}@h2:26380"
    assert parse_broker_url(url, "CELERY_BROKER_URL") == url
    assert redacted(url) == "sentinel://h1:26379;sentinel://h2:26380"


def test_without_celery_installed_the_line_names_the_extra(db_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "celery", None)
    result = cli("process", env={"DATABASE_URL": db_url, "CELERY_BROKER_URL": "redis://h:1/0", "CELERY_TASK": TASK})
    assert result.returncode == 2
    assert "Celery is not installed here: pip install 'stuck-runs[celery]'" in one_line_error(result)


def test_a_send_runs_in_the_lane_that_delivers_it_with_no_thread_of_its_own(redis_url):
    import threading

    import redis

    from jobs.executors.celery import CeleryExecutor
    from jobs.executors.outcome import HandedOver
    from jobs.model import Run

    queue = f"lanes-{uuid.uuid4().hex[:8]}"  # no worker consumes it: what was sent stays there
    executor = CeleryExecutor(redis_url, TASK, queue)
    store = redis.Redis.from_url(redis_url)
    try:
        sent = executor.deliver(Run(id=str(uuid.uuid4()), status="running", what="q"), threading.Event())
        assert isinstance(sent, HandedOver) and store.llen(queue) == 1
        # Sent by the lane itself: no thread started for it (a hand-off to another thread and back
        # for each send cost more than the send).
        assert not [t for t in threading.enumerate() if t.name.startswith("celery-send")]
    finally:
        store.delete(queue)
        executor.close()


def test_on_redis_a_retry_with_no_priority_is_queued_after_every_prioritised_one(redis_url):
    """Redis runs priority 0 first, and kombu sends a task with no priority option at 0: a retry
    with none (SPEC §16: none last) goes at 9, the bottom; with no priority column mapped there is
    nothing to order by, and no priority option is sent. kombu keeps one Redis list a priority:
    `queue` for 0, then `queue\\x06\\x16<n>`."""
    import threading

    import redis

    from jobs.executors.celery import CeleryExecutor
    from jobs.model import Run

    queue = f"order-{uuid.uuid4().hex[:8]}"  # no worker consumes it: what was sent stays there
    store = redis.Redis.from_url(redis_url)

    def lists_after_sending(priority_column, *urgencies) -> dict[str, int]:
        executor = CeleryExecutor(redis_url, TASK, queue, priority_column=priority_column)
        try:
            for urgency in urgencies:
                run = Run(id=str(uuid.uuid4()), status="running", what="q", inputs={"urgency": urgency})
                executor.deliver(run, threading.Event())
            lists = {key.decode().removeprefix(queue): store.llen(key) for key in store.keys(f"{queue}*")}
        finally:
            store.delete(*store.keys(f"{queue}*"))
            executor.close()
        return {name.replace("\x06\x16", "priority "): count for name, count in lists.items()}

    assert lists_after_sending("urgency", None) == {"priority 9": 1}
    assert lists_after_sending("urgency", float("nan"), 9, 0) == {"": 1, "priority 9": 2}
    assert lists_after_sending(None, None, 9) == {"": 2}
