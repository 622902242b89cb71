"""Retries handed to a real Scrapyd (SPEC §16), beside the same Scrapyd driven by a bare client.

    python -m bench.scrapyd [--retries 10000] [--cap 100]

Scrapyd on loopback with the tests' tiny project (tests/scrapyd_fleet.py), queueing jobs and
starting none (a poll interval of an hour): the hand-over is measured, not the spiders. The fleet
"finishes at once": a thread completes every handed-over row the moment it reads `running`, as a
spider writing its outcome conditionally on `running` would, so the cap's slots come free at once.

- ours: `process_due_retries` (what `stuck-runs process` runs) over `--retries` due retries at
  MAX_CONCURRENT_RETRIES=`--cap`, in passes until none is pending; the most sessions the process
  held at one time, sampled from pg_stat_activity;
- the floor: `--cap` threads POSTing schedule.json for as many job ids through one pooled client,
  nothing else (no database, no mark, no confirm).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import sqlalchemy as sa
from loguru import logger

from bench.data import admin, database_url, start_server
from db.engine import make_engine
from db.migrate import migrate
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.settings.scrapyd_parsers import ScrapydUrl
from tests.scrapyd_fleet import PROJECT, start_scrapyd

NAME = "bench_scrapyd"
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
FINISH = "UPDATE scrape_runs SET status = 'completed', completed_at = now() WHERE status = 'running' AND handed_off = 'scrapyd'"
SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND application_name LIKE 'stuck-runs%'"


class Background(threading.Thread):
    """Runs `step` over and over until stopped; `most` keeps the largest number it returned."""

    def __init__(self, url: str, sql: str, params: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        self.sql, self.params, self.most, self.halt = sa.text(sql), params or {}, 0, threading.Event()

    def run(self) -> None:
        with self.engine.connect() as conn:
            while not self.halt.is_set():
                result = conn.execute(self.sql, self.params)
                self.most = max(self.most, result.scalar_one() if result.returns_rows else 0)
                conn.commit()
                self.halt.wait(0.005)

    def stop(self) -> int:
        self.halt.set()
        self.join()
        self.engine.dispose()
        return self.most


def ours(url: str, scrapyd_url: str, retries: int, cap: int) -> dict:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE scrape_runs"))
        conn.execute(sa.text(DUE), {"n": retries})
    engine.dispose()
    settings = Settings(
        database_url=url,
        policy=RetryPolicy(),
        max_concurrent_retries=cap,
        scrapyd_url=ScrapydUrl(scrapyd_url),
        scrapyd_project=PROJECT,
        scrapyd_spider="rows",
        scrapyd_args=(("mode", "{search_query}"),),
        log_level="WARNING",
    )
    fleet = Background(url, FINISH)
    sessions = Background(url, SESSIONS, {"db": NAME})
    fleet.start()
    sessions.start()
    rt = Runtime.open(settings, executes=True)
    started = time.perf_counter()
    handed = passes = 0
    try:
        while True:
            passes += 1
            handed += process_due_retries(rt).handed_off
            with rt.engine.connect() as conn:
                left = conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'pending_retry'")).scalar()
            if not left:
                break
        seconds = time.perf_counter() - started
    finally:
        rt.close()
        fleet.stop()
    return {
        "handed": handed,
        "seconds": round(seconds, 2),
        "per_second": round(handed / seconds, 1),
        "passes": passes,
        "peak_sessions": sessions.stop(),
    }


def floor(scrapyd_url: str, retries: int, cap: int) -> dict:
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    with httpx.Client(limits=limits, timeout=30, trust_env=False) as client:

        def schedule(_: int) -> bool:
            form = {"project": PROJECT, "spider": "rows", "jobid": str(uuid.uuid4()), "mode": "write"}
            try:
                return client.post(f"{scrapyd_url}/schedule.json", data=form).json()["status"] == "ok"
            except httpx.HTTPError:  # Scrapyd's listen backlog (50) overflows past ~100 at once: reset
                return False

        started = time.perf_counter()
        with ThreadPoolExecutor(cap) as pool:
            done = sum(pool.map(schedule, range(retries)))
        seconds = time.perf_counter() - started
    return {
        "scheduled": done,
        "refused": retries - done,
        "seconds": round(seconds, 2),
        "per_second": round(done / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scrapyd")
    parser.add_argument("--retries", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=100)
    args = parser.parse_args()
    logger.remove()  # a line per retry on a terminal would be measured too
    logger.add(sys.stderr, level="WARNING")
    work = Path(tempfile.mkdtemp(prefix="stuck-runs-bench-scrapyd-"))
    server_url, server = start_server(work)
    scrapyd = start_scrapyd(work / "scrapyd", poll_interval=3600, max_proc=1)
    try:
        with admin(server_url).connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {NAME}")
        url = database_url(server_url, NAME)
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql(TABLE)
        migrate(engine, "scrape_runs")
        engine.dispose()
        floor(scrapyd.url, 200, args.cap)  # warm-up: the project's spider list, read once by Scrapyd
        results = {"retries": args.retries, "cap": args.cap}
        results["floor"] = floor(scrapyd.url, args.retries, args.cap)
        results["ours"] = ours(url, scrapyd.url, args.retries, args.cap)
        results["ratio"] = round(results["floor"]["per_second"] / results["ours"]["per_second"], 2)
        print(json.dumps(results, indent=2))
    finally:
        scrapyd.stop()
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
