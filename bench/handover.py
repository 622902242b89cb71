"""Retries handed over to Scrapyd, Celery and a webhook (SPEC §12, §16), each beside the same
engine driven directly by a bare client at the same concurrency (the floor), in one run.

    python -m bench.handover [--engines scrapyd celery webhook] [--plan 100:10000 1:1000 256:1000]
                             [--rounds 1] [--whole] [--json PATH]

Every engine is real and on loopback, and its fleet "finishes at once", so the hand-over is what
is measured, not the fleet:
- Scrapyd (tests/scrapyd_fleet.py's tiny project) queues the jobs and starts none (a poll interval
  of an hour);
- Celery sends to a real redis-server; no worker consumes (one would share the machine's two
  cores with both contenders and measure its own pool; its task writing the row is the fleet);
- for both, a process plays the workers, every 5 ms: it completes the row of each job the engine
  took, conditionally on `running`, as a spider or a task writing its outcome would, so the cap's
  slots come free at once; never a row whose job the engine does not hold (a send that failed is
  put back and sent again, as in a fleet). Celery's jobs are read from the broker's list; Scrapyd's
  are the deliveries it answered ok to (their marks ended): reading its queue, a SQLite file, from
  another process would take the file's locks against Scrapyd's one writer, whose busy handler
  then sleeps (BENCHMARKS.md, "a fleet that finishes only what the engine took");
- the webhook's receiver is tests/receiver.py in fleet mode with `--at-once` (bench/receiver.py:
  with a real server's listen backlog): it writes the row `completed` (conditionally on
  `running`) before it answers.

For each engine and each `cap:retries` of the plan, `--rounds` times, interleaved:
- the floor: `cap` threads handing `retries` fresh ids to the engine and nothing else (no database,
  no mark, no confirm), the best a bare client does: Scrapyd's schedule.json POSTs and the
  receiver's POSTs through a client per thread (one connection kept alive each: httpx's pool shared
  by 100 threads spends more CPU walking its connections than sending), Celery's `send_task`
  through one app whose pool holds a connection per thread; the same request as ours (form, body,
  headers, timeouts), written here and not imported, so the floor stays independent of the code
  it judges;
- ours: `process_due_retries` (what `stuck-runs process` runs) at MAX_CONCURRENT_RETRIES=`cap`
  over `retries` due retries, in passes until none is pending; beside it, the most sessions the
  process held at one time, sampled from pg_stat_activity every 5 ms; and that the engine
  received each retry exactly once (Scrapyd's queue, the broker's list, the receiver's log);
- the whole command (`--whole`): `stuck-runs process` as a user runs it, one process a pass until
  none is pending, the same settings from the environment, its output (a line per retry on stdout,
  the log on stderr) written to files: start-up, imports and output included; exactly once too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa
from loguru import logger

from bench.data import admin, database_url, start_server
from db.engine import make_engine
from db.errors import DatabaseUnavailable
from db.migrate import migrate
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.runtime import Runtime
from jobs.settings import Settings

NAME = "bench_handover"
ENGINES = ("scrapyd", "celery", "webhook")
PLAN = ("100:10000", "1:1000", "256:1000")
TASK = "fleet.scrape"
TABLE = """CREATE TABLE scrape_runs (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), search_query TEXT NOT NULL,
 location_query TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'running', error_message TEXT, started_at TIMESTAMPTZ,
 completed_at TIMESTAMPTZ, config JSONB NOT NULL DEFAULT '{}', user_id INTEGER)"""
DUE = """
WITH roots AS (
    INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at, next_retry_at)
    SELECT 'write', 'Belgium', 'failed', now() - interval '2 hours', now() - interval '1 hour',
           now() - interval '1 minute'
    FROM generate_series(1, :n) RETURNING id
)
INSERT INTO scrape_runs (search_query, location_query, status, is_retry, original_run_id, retry_count, next_retry_at)
SELECT 'write', 'Belgium', 'pending_retry', true, id, 1, now() - interval '1 minute' FROM roots
"""
FINISH = "UPDATE scrape_runs SET status = 'completed', completed_at = now() WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'running'"
FINISH_CONFIRMED = """UPDATE scrape_runs SET status = 'completed', completed_at = now()
WHERE status = 'running' AND handed_off = :mode AND delivering_by IS NULL"""
QUEUE = "celery"  # Celery's default queue: a Redis list, the newest task first (LPUSH)
SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND application_name LIKE 'stuck-runs%'"
PENDING = "SELECT count(*) FROM scrape_runs WHERE status = 'pending_retry'"
HANDED = "SELECT count(*) FROM scrape_runs WHERE is_retry AND handed_off = :mode AND status <> 'pending_retry'"
MISSING = "SELECT * FROM scrape_runs WHERE id::text = ANY(:ids)"
HANDED_IDS = "SELECT id FROM scrape_runs WHERE is_retry AND handed_off = :mode AND status <> 'pending_retry'"


def poll(url: str, sql: str, params: dict, ready, halt, most) -> None:
    """Runs `sql` over and over (every 5 ms) until `halt` is set; `most` keeps the largest number
    it returned; `ready` once it ran once."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        while not halt.is_set():
            most.value = max(most.value, conn.execute(sa.text(sql), params).scalar_one())
            conn.commit()
            ready.set()
            halt.wait(0.005)
    engine.dispose()


def tasks_taken(broker_url: str) -> Callable[[], list[str]]:
    """`take()`: the ids of the tasks the broker received since the last call, as Celery's workers
    would find them in its list. Nothing is consumed: `Engine.received` counts them all."""
    import redis

    store, seen = redis.Redis.from_url(broker_url), 0

    def take() -> list[str]:
        nonlocal seen
        # All but the `seen` oldest (at the tail), in one command: a task pushed meanwhile is in it
        # or in the next read, never skipped.
        messages = store.lrange(QUEUE, 0, -(seen + 1))
        seen += len(messages)
        return [json.loads(message)["headers"]["id"] for message in messages]

    return take


def finish_taken(url: str, taken: tuple[str, str], ready, halt, most) -> None:
    """The fleet that finishes at once: every 5 ms until `halt`, the rows of the jobs the engine
    took completed, conditionally on `running`, as a spider or a task writing its outcome does:
    with `("broker", URL)` the tasks read from Celery's list since (`most` counts them), with
    `("confirmed", mode)` the retries of that mode whose delivery was answered ok (their marks
    ended). `ready` once it wrote once."""
    kind, where = taken
    take, waiting = (tasks_taken(where) if kind == "broker" else None), []
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        while not halt.is_set():
            if take is not None:
                waiting += (tasks := take())
                most.value += len(tasks)
            try:
                if take is None:
                    conn.execute(sa.text(FINISH_CONFIRMED), {"mode": where})
                elif waiting:
                    conn.execute(sa.text(FINISH), {"ids": waiting})
                conn.commit()
                waiting = []
            except sa.exc.OperationalError as exc:
                # Ending many rows in one statement can deadlock with ours' set-wide marks and
                # confirms: PostgreSQL ends one of the two. A fleet writes the same outcomes again.
                if getattr(exc.orig, "pgcode", None) != "40P01":
                    raise
                conn.rollback()
                continue
            ready.set()
            halt.wait(0.005)
    engine.dispose()


class Background:
    """`target(*args, ready, halt, most)` (`poll`, `finish_taken`) in a process of its own, as the
    fleet and a monitoring query are: not in the process measured, whose interpreter it would share
    (a thread there took a quarter of its GIL)."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self.ready, self.halt, self.most = context.Event(), context.Event(), context.Value("q", 0)
        self.process = context.Process(target=target, args=(*args, self.ready, self.halt, self.most), daemon=True)

    def start(self) -> None:
        self.process.start()
        if not self.ready.wait(60):
            raise SystemExit(f"the bench's poller did not start (exit code {self.process.exitcode})")

    def stop(self) -> int:
        self.halt.set()
        self.process.join(30)
        return self.most.value


@dataclass
class Engine:
    """One engine on loopback: the settings that hand retries to it, a bare client's hand-over
    of one fresh id (`client(cap)` opens it, yields `send`), and how the process playing the fleet
    that finishes at once knows the jobs the engine took (`finish_taken`; None: the receiver
    finishes its rows itself)."""

    name: str
    settings: dict
    client: Callable[[int], object]  # a context manager yielding send(i) -> bool
    received: Callable[[], list[str]]  # the ids the engine received since `reset`, one per request
    taken_from: tuple[str, str] | None = None
    reset: Callable[[], None] = lambda: None  # between runs: what the engine received forgotten
    stops: list[Callable[[], None]] = field(default_factory=list)


@contextmanager
def client_per_thread(make: Callable[[], httpx.Client]) -> Iterator[Callable[[], httpx.Client]]:
    """`get()`: the calling thread's own client, made on its first call; all closed at the end. A
    bare client's best at 100 threads: httpcore's pool, shared, walks all its connections at each
    request and answer (for each idle one, all of them again)."""
    local, made, lock = threading.local(), [], threading.Lock()

    def get() -> httpx.Client:
        http = getattr(local, "http", None)
        if http is None:
            http = local.http = make()
            with lock:
                made.append(http)
        return http

    try:
        yield get
    finally:
        for http in made:
            http.close()


ONE_CONNECTION = httpx.Limits(max_connections=1, max_keepalive_connections=1)  # one call at a time a thread


def start_scrapyd_engine(work: Path, url: str) -> Engine:
    from jobs.settings.scrapyd_parsers import ScrapydUrl
    from tests.scrapyd_fleet import PROJECT, start_scrapyd

    scrapyd = start_scrapyd(work / "scrapyd", poll_interval=3600, max_proc=1)
    queue = work / "scrapyd" / "dbs" / f"{PROJECT}.db"  # Scrapyd's pending jobs (SQLite), never started

    @contextmanager
    def client(cap: int) -> Iterator[Callable[[int], bool]]:
        timeout = httpx.Timeout(30, connect=5)  # ours: 30 s to read, 5 to connect
        make = lambda: httpx.Client(timeout=timeout, limits=ONE_CONNECTION, follow_redirects=False, trust_env=False)  # noqa: E731
        with client_per_thread(make) as http:

            def send(_: int) -> bool:
                form = {"mode": "write", "project": PROJECT, "spider": "rows", "jobid": str(uuid.uuid4())}
                try:
                    return http().post(f"{scrapyd.url}/schedule.json", data=form).json()["status"] == "ok"
                except httpx.HTTPError:  # Scrapyd's listen backlog (50) overflows past ~100 at once: reset
                    return False

            yield send

    def queued(sql: str) -> list:
        with sqlite3.connect(queue, timeout=30) as db:  # Scrapyd writes it from its one thread
            return db.execute(sql).fetchall()

    def reset() -> None:
        # Every run starts on an empty queue: a queue of the runs before would make each later
        # run's inserts (and ours' listjobs.json) slower than the first's.
        queued("DELETE FROM spider_queue")

    def received() -> list[str]:
        return [json.loads(message)["_job"] for (message,) in queued("SELECT message FROM spider_queue")]

    settings = {
        "scrapyd_url": ScrapydUrl(scrapyd.url),
        "scrapyd_project": PROJECT,
        "scrapyd_spider": "rows",
        "scrapyd_args": (("mode", "{search_query}"),),
    }
    with client(1) as send:  # warm-up: the project's spider list, read once by Scrapyd (and its queue made)
        for i in range(5):
            send(i)
    return Engine("scrapyd", settings, client, received, ("confirmed", "scrapyd"), reset, [scrapyd.stop])


def start_celery_engine(work: Path, url: str) -> Engine:
    import celery
    import kombu.pools
    import redis

    from tests.scrapyd_fleet import free_port

    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    broker = f"redis://127.0.0.1:{port}/0"
    store = redis.Redis.from_url(broker)
    deadline = time.monotonic() + 30
    while True:
        try:
            store.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)

    @contextmanager
    def client(cap: int) -> Iterator[Callable[[int], bool]]:
        # One app, as a producer has: its pool holds a connection for each of the `cap` threads
        # (its default, 10, would have 90 of 100 wait for one), the broker's timeouts as ours
        # (retries off). send_task, nothing else; the same keyword arguments as ours.
        app = celery.Celery("bench-floor", broker=broker, set_as_current=False)
        timeouts = {"socket_connect_timeout": 5, "socket_timeout": 5, "max_retries": 0}
        app.conf.update(
            broker_connection_retry=False,
            broker_connection_timeout=5,
            broker_transport_options=timeouts,
            task_create_missing_queues=True,
            result_backend=None,
            broker_pool_limit=cap,
        )

        def send(_: int) -> bool:
            run_id = str(uuid.uuid4())
            kwargs = {"search_query": "write", "location_query": "Belgium", "config": {}, "user_id": None}
            app.send_task(TASK, task_id=run_id, kwargs={**kwargs, "run_id": run_id}, retry=False)
            return True

        try:
            yield send
        finally:
            app.close()
            # kombu keeps its connection and producer pools in process-wide registries keyed by
            # the broker's URL: ours' app, opened next in this process, would take over the
            # floor's pools (closed with the app above) instead of its own.
            kombu.pools.reset()

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    def received() -> list[str]:
        # The tasks waiting in Celery's default queue (a Redis list): nobody consumes them.
        return [json.loads(message)["headers"]["id"] for message in store.lrange(QUEUE, 0, -1)]

    settings = {"celery_broker_url": broker, "celery_task": TASK}
    return Engine("celery", settings, client, received, ("broker", broker), store.flushdb, [stop])


def start_webhook_engine(work: Path, url: str) -> Engine:
    from bench.receiver import start

    receiver = start(work, url.replace("postgresql+psycopg2://", "postgresql://", 1), "scrape_runs")

    @contextmanager
    def client(cap: int) -> Iterator[Callable[[int], bool]]:
        timeout = httpx.Timeout(30, connect=5)  # ours' default: SCRAPE_RUN_TIMEOUT 30 s, 5 to connect
        make = lambda: httpx.Client(timeout=timeout, limits=ONE_CONNECTION, follow_redirects=False, trust_env=False)  # noqa: E731
        with client_per_thread(make) as http:

            def send(_: int) -> bool:
                run_id = str(uuid.uuid4())
                fields = {"search_query": "write", "location_query": "Belgium", "config": {}, "user_id": None}
                body = {**fields, "id": run_id, "retry_count": 1, "max_retries": 4, "original_run_id": run_id}
                headers = {"Content-Type": "application/json", "Idempotency-Key": run_id}
                try:
                    return http().post(f"{receiver.url}/runs", content=json.dumps(body), headers=headers).is_success
                except httpx.TransportError:  # what ours would postpone
                    return False

            yield send

    def reset() -> None:
        receiver.log.write_text("")  # its log of every request, so it does not grow across runs

    def received() -> list[str]:
        return [request["key"] for request in receiver.requests() if request["method"] == "POST"]

    return Engine("webhook", {"webhook": f"{receiver.url}/runs"}, client, received, None, reset, [receiver.stop])


STARTS = {"scrapyd": start_scrapyd_engine, "celery": start_celery_engine, "webhook": start_webhook_engine}


def seed(url: str, retries: int) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE scrape_runs"))
        conn.execute(sa.text(DUE), {"n": retries})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE scrape_runs")
    engine.dispose()


def create_database(server_url: str) -> str:
    """The bench's database, its table migrated (empty); its URL."""
    with admin(server_url).connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {NAME}")
    url = database_url(server_url, NAME)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TABLE)
    migrate(engine, "scrape_runs")
    engine.dispose()
    return url


def floor(engine: Engine, retries: int, cap: int) -> dict:
    """`cap` threads sending `retries` fresh ids, each taking the next number as it is free (no
    futures, no queue: a number is handed out by one call of the iterator, atomic under the GIL)."""
    engine.reset()
    numbers = iter(range(retries))
    handed = [0] * cap

    def thread(slot: int) -> None:
        handed[slot] = sum(send(i) for i in numbers)

    with engine.client(cap) as send:
        threads = [threading.Thread(target=thread, args=(slot,), name=f"floor-{slot}") for slot in range(cap)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
    done = sum(handed)
    received = engine.received()
    return {
        "handed": done,
        "refused": retries - done,
        "seconds": round(seconds, 2),
        "per_second": done / seconds,
        "received": len(received),
    }


def handed_ids(check: sa.Engine, mode: str) -> list[str]:
    with check.connect() as conn:
        rows = conn.execute(sa.text(HANDED_IDS), {"mode": mode})
        return [str(row[0]) for row in rows]


def exactly_once(engine: Engine, check: sa.Engine) -> dict:
    """Whether the engine received each handed retry once and nothing else (by its id)."""
    received = Counter(engine.received())
    handed = set(handed_ids(check, engine.name))
    missing = sorted(handed - set(received))
    rows = []
    if missing:  # what the database says of a retry the engine never received
        with check.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(sa.text(MISSING), {"ids": missing[:5]})]
    return {
        "received": sum(received.values()),
        "received_twice": sum(1 for n in received.values() if n > 1),
        "not_received": [{k: str(v) for k, v in row.items()} for row in rows] + missing[5:6],
        "exactly_once": set(received) == handed and all(n == 1 for n in received.values()),
    }


def passes_until_none_pending(engine: Engine, url: str, check: sa.Engine, one_pass) -> dict:
    """`one_pass` over and over until no retry is pending, timed, with the fleet finishing what is
    handed and the sessions sampled beside it; `check` asks whether any is pending and counts."""
    fleet = Background(finish_taken, url, engine.taken_from) if engine.taken_from else None
    sessions = Background(poll, url, SESSIONS, {"db": NAME})
    if fleet:
        fleet.start()
    sessions.start()
    passes = 0
    started = time.perf_counter()
    try:
        while True:
            passes += 1
            one_pass()
            with check.connect() as conn:
                if not conn.execute(sa.text(PENDING)).scalar():
                    break
        seconds = time.perf_counter() - started
        with check.connect() as conn:  # a pass that ended on an error left its marked retries handed
            handed = conn.execute(sa.text(HANDED), {"mode": engine.name}).scalar_one()
    finally:
        if fleet:
            fleet.stop()
    return {
        "handed": handed,
        "seconds": round(seconds, 2),
        "per_second": handed / seconds,
        "passes": passes,
        "peak_sessions": sessions.stop(),
    }


def ours(engine: Engine, url: str, retries: int, cap: int) -> dict:
    seed(url, retries)
    engine.reset()
    settings = Settings(
        database_url=url, policy=RetryPolicy(), max_concurrent_retries=cap, log_level="WARNING", **engine.settings
    )
    rt = Runtime.open(settings, executes=True)
    errors: list[str] = []
    not_handed: Counter[str] = Counter()

    def one_pass() -> None:
        try:
            result = process_due_retries(rt)
        except DatabaseUnavailable as exc:  # the pass ends on it; a daemon's next poll goes on
            errors.append(str(exc).split(" at postgresql")[0])
            return
        # Every delivery that did not end handed over (postponed, released, ...), and why: each is
        # due again, and received once all the same, or the check below says which was not.
        not_handed.update(f"{o.status}: {o.message or ''}" for o in result.executed if o.status != "handed_off")

    try:
        figures = passes_until_none_pending(engine, url, rt.engine, one_pass)
        return {**figures, "pass_errors": errors, "not_handed": dict(not_handed), **exactly_once(engine, rt.engine)}
    finally:
        rt.close()


def command_environment(engine: Engine, url: str, cap: int) -> dict[str, str]:
    """The environment a user's `stuck-runs process` reads the engine's settings from."""
    names = {
        "webhook": "SCRAPE_RUN_WEBHOOK",
        "scrapyd_url": "SCRAPYD_URL",
        "scrapyd_project": "SCRAPYD_PROJECT",
        "scrapyd_spider": "SCRAPYD_SPIDER",
        "celery_broker_url": "CELERY_BROKER_URL",
        "celery_task": "CELERY_TASK",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCRAPYD_", "CELERY_", "SCRAPE_RUN_"))}
    env.update(DATABASE_URL=url, MAX_CONCURRENT_RETRIES=str(cap))
    for name, value in engine.settings.items():
        if name == "scrapyd_args":
            env["SCRAPYD_ARGS"] = ",".join(f"{arg}={template}" for arg, template in value)
        else:
            env[names[name]] = str(value)
    return env


def whole(engine: Engine, url: str, retries: int, cap: int, work: Path) -> dict:
    """`stuck-runs process` as a user runs it, a process a pass until none is pending."""
    seed(url, retries)
    engine.reset()
    command = [str(Path(sys.executable).with_name("stuck-runs")), "process"]
    env = command_environment(engine, url, cap)
    failed = lines = 0

    def one_pass() -> None:
        nonlocal failed, lines
        with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
            failed += subprocess.run(command, env=env, stdout=out, stderr=err, check=False).returncode != 0
        lines += sum(1 for _ in open(work / "stdout"))

    check = make_engine(url)
    try:
        figures = passes_until_none_pending(engine, url, check, one_pass)
        return {**figures, "failed_passes": failed, "stdout_lines": lines, **exactly_once(engine, check)}
    finally:
        check.dispose()


def measure(engine: Engine, url: str, cap: int, retries: int, rounds: int, work: Path | None = None) -> dict:
    """`rounds` times the floor, ours and (with `work`) the whole command, interleaved; the medians,
    and every run."""
    floors, ourses, wholes = [], [], []
    for _ in range(rounds):
        at = f"{time.strftime('%H:%M:%S')}, load {load()}"
        floors.append(floor(engine, retries, cap))
        ourses.append(ours(engine, url, retries, cap))
        print(
            f"  {engine.name:<8} cap {cap:>3}, {retries:>6,} retries ({at}): floor {floors[-1]['per_second']:8.1f}/s "
            f"ours {ourses[-1]['per_second']:8.1f}/s = {floors[-1]['per_second'] / ourses[-1]['per_second']:.2f}x "
            f"(peak sessions {ourses[-1]['peak_sessions']}, {ourses[-1]['handed']:,} handed, "
            f"{'each received once' if ourses[-1]['exactly_once'] else 'NOT each received once'}, "
            f"{len(ourses[-1]['pass_errors'])} pass(es) ended on an error)",
            flush=True,
        )
        if not ourses[-1]["exactly_once"] or ourses[-1]["not_handed"]:
            shown = {k: ourses[-1][k] for k in ("not_handed", "received", "received_twice", "not_received")}
            print(f"    ours: {json.dumps(shown, default=str)}", flush=True)
        if work is not None:
            wholes.append(whole(engine, url, retries, cap, work))
            print(
                f"  {engine.name:<8} cap {cap:>3}, {retries:>6,} retries: whole command "
                f"{wholes[-1]['per_second']:8.1f}/s = {floors[-1]['per_second'] / wholes[-1]['per_second']:.2f}x "
                f"({wholes[-1]['passes']} pass(es), {wholes[-1]['handed']:,} handed, "
                f"{'each received once' if wholes[-1]['exactly_once'] else 'NOT each received once'}, "
                f"{wholes[-1]['stdout_lines']:,} lines out, peak sessions {wholes[-1]['peak_sessions']}, "
                f"{wholes[-1]['failed_passes']} failed; load {load()})",
                flush=True,
            )
    floor_rate = statistics.median(f["per_second"] for f in floors)
    our_rate = statistics.median(o["per_second"] for o in ourses)
    whole_figures = {}
    if wholes:
        whole_rate = statistics.median(w["per_second"] for w in wholes)
        whole_figures = {
            "whole_per_second": round(whole_rate, 1),
            "whole_ratio": round(floor_rate / whole_rate, 2),
            "whole_all_handed": all(w["handed"] == retries for w in wholes),
            "whole_peak_sessions": max(w["peak_sessions"] for w in wholes),
            "whole_exactly_once": all(w["exactly_once"] for w in wholes),
        }
    return {
        "engine": engine.name,
        "cap": cap,
        "retries": retries,
        "floor_per_second": round(floor_rate, 1),
        "ours_per_second": round(our_rate, 1),
        "ratio": round(floor_rate / our_rate, 2),
        "peak_sessions": max(o["peak_sessions"] for o in ourses),
        "floor_refused": sum(f["refused"] for f in floors),
        "all_handed": all(o["handed"] == retries for o in ourses),
        "exactly_once": all(o["exactly_once"] for o in ourses),  # the engine received each retry once
        "floor_received": all(f["received"] == f["handed"] for f in floors),
        "pass_errors": sum(len(o["pass_errors"]) for o in ourses),
        **whole_figures,
        "runs": {"floor": floors, "ours": ourses, "whole": wholes},
    }


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextmanager
def engines_on_a_server(prefix: str, names: list[str]) -> Iterator[tuple[Path, str, list[Engine]]]:
    """A work directory, a PostgreSQL server with the bench's database (its URL) and the named
    engines started on loopback; all stopped, and the directory removed, on leaving."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    server_url, server = start_server(work)
    try:
        url = create_database(server_url)
        with ExitStack() as stack:
            started = []
            for name in names:
                started.append(STARTS[name](work, url))
                for stop in started[-1].stops:
                    stack.callback(stop)
            yield work, url, started
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def run(engines: list[str], plan: list[tuple[int, int]], rounds: int, whole_command: bool = False) -> dict:
    results: dict = {"plan": plan, "rounds": rounds, "load_before": load(), "results": []}
    with engines_on_a_server("stuck-runs-bench-handover-", engines) as (work, url, started):
        for cap, retries in plan:  # the plan's first cap for every engine first: it is what counts
            for engine in started:
                results["results"].append(measure(engine, url, cap, retries, rounds, work if whole_command else None))
        results["load_after"] = load()
    return results


def parse_plan(items: list[str]) -> list[tuple[int, int]]:
    return [(int(cap), int(retries)) for cap, _, retries in (item.partition(":") for item in items)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.handover", description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--plan", nargs="+", default=list(PLAN), help="CAP:RETRIES pairs")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--whole", action="store_true", help="also time `stuck-runs process` as a user runs it")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    logger.remove()  # a line per retry on a terminal would be measured too
    logger.add(sys.stderr, level="WARNING")
    results = run(args.engines, parse_plan(args.plan), args.rounds, args.whole)
    summary = [{k: v for k, v in r.items() if k != "runs"} for r in results["results"]]
    print(json.dumps({**{k: v for k, v in results.items() if k != "results"}, "results": summary}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
