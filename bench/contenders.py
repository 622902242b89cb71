"""The three ways of failing K stuck runs that the benchmark compares, on identical copies.

- `ours`: `sweep_stuck_runs`, batches of BATCH_SIZE, per-row decisions from the rules.
- `floor`: the one-statement SQL floor, an UPDATE ... RETURNING feeding an INSERT ... SELECT,
  with the message built in SQL; nothing can do the same work in fewer round trips.
- `row_by_row`: what a naive script does: select the stuck runs, then update and insert one run
  at a time, committing each.
"""

from __future__ import annotations

import compileall
import functools
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

from jobs.rules import STUCK_PATTERN, RetryPolicy, chain_budget, decide_failure, stuck_error
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.stuck import sweep_stuck_runs

POLICY = RetryPolicy()
INPUTS = "search_query, location_query, config, user_id, results_count, proxy_pool, priority"

FLOOR = f"""
WITH failed AS (
    UPDATE scrape_runs
    SET status = 'failed', completed_at = :now, max_retries = :budget, next_retry_at = :due,
        failure_pattern = 'stuck',
        error_message = 'Run stuck for '
            || to_char(round((extract(epoch FROM :now - started_at) / 3600)::numeric, 1), 'FM999990.0')
            || 'h - retry ' || (retry_count + 1) || '/' || :budget || ' scheduled'
    WHERE status = 'running' AND started_at < :cutoff
    RETURNING *
)
INSERT INTO scrape_runs ({INPUTS}, status, retry_count, max_retries, next_retry_at, original_run_id, is_retry,
                         updated_at)
SELECT {INPUTS}, 'pending_retry', retry_count + 1, max_retries, next_retry_at, coalesce(original_run_id, id), true,
       :now
FROM failed
"""

ROW_FAIL = """
UPDATE scrape_runs SET status = 'failed', completed_at = :now, max_retries = :budget, next_retry_at = :due,
    failure_pattern = 'stuck', error_message = :message
WHERE id = :id AND status = 'running'
"""
ROW_RETRY = f"""
INSERT INTO scrape_runs ({INPUTS}, status, retry_count, max_retries, next_retry_at, original_run_id, is_retry,
                         updated_at)
SELECT {INPUTS}, 'pending_retry', retry_count + 1, max_retries, next_retry_at, coalesce(original_run_id, id), true,
       :now
FROM scrape_runs WHERE id = :id
"""


class FixedClock:
    """Every contender judges stuck-ness at the same instant."""

    def __init__(self, now: datetime) -> None:
        self._now = now

    def now(self) -> datetime:
        return self._now

    def real(self, duration: timedelta) -> timedelta:
        return duration


@dataclass(frozen=True)
class Timing:
    contender: str
    seconds: float
    failed: int
    # The CPU seconds the database server's backend spent on it (None where it cannot be read):
    # on a shared machine a steadier measure of the work than the wall clock.
    backend_cpu: float | None = None


def backend_pid(conn: sa.Connection) -> int:
    pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    conn.commit()
    return pid


def backend_cpu(pid: int) -> float | None:
    """User and system CPU seconds of a server backend on this machine (None: not readable here)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_spent(pid: int, before: float | None) -> float | None:
    after = backend_cpu(pid)
    return None if before is None or after is None else round(after - before, 3)


def ours(url: str, now: datetime, *, batch_size: int = 1000, log_to: str | None = None) -> Timing:
    logger.remove()
    if log_to:
        logger.add(log_to, level="INFO")  # what a production sweep writes to its journal
    rt = Runtime.open(Settings(database_url=url, batch_size=batch_size), clock=FixedClock(now))
    try:
        started = time.perf_counter()
        result = sweep_stuck_runs(rt)
        return Timing("ours" if not log_to else "ours+logs", time.perf_counter() - started, result.failed)
    finally:
        rt.close()
        logger.remove()


@functools.cache
def compiled(tree: Path) -> None:
    """The tree's modules compiled to bytecode once, as an installed copy ships them: where
    PYTHONDONTWRITEBYTECODE is set (this machine sets it) a tree without `__pycache__` (a fresh
    clone or `git archive`) compiled every module again in every run of the command, about 0.1 s
    of each (BENCHMARKS.md, the start of 2026-12-06), which is not what users run."""
    for package in ("db", "jobs", "scheduler"):
        compileall.compile_dir(tree / package, quiet=1)


def command(
    url: str,
    now: datetime,
    *,
    out: str | None = None,
    env: dict[str, str] | None = None,
    count: Callable[[str], int] | None = None,
    code: Path | None = None,
) -> Timing:
    """`stuck-runs check` as an operator or cron runs it: a new process, its output to a file.

    It judges by the real clock (nothing in the product takes another one): its STUCK_AFTER is
    stretched by however long ago `now` was, so its cutoff, and the runs it fails, are the
    others'. Its messages' hours differ, so the bench compares its counts, not its messages.
    With `code` (a checkout), that checkout's command runs (what its `stuck-runs` script runs),
    so two versions compare in one run.
    """
    argv = [str(Path(sys.executable).with_name("stuck-runs")), "check"]
    compiled(code or Path(__file__).resolve().parents[1])
    late = datetime.now(timezone.utc) - now
    stuck_after = (POLICY.stuck_after + late).total_seconds()
    environment = {**os.environ, **(env or {}), "DATABASE_URL": url, "STUCK_AFTER": f"{stuck_after:.6f}s"}
    if code is not None:
        argv = [sys.executable, "-c", "import sys; from scheduler.cli import main; sys.exit(main())", "check"]
        environment["PYTHONPATH"] = str(code)
    with open(out or os.devnull, "w") as stdout:
        started = time.perf_counter()
        subprocess.run(argv, env=environment, stdout=stdout, stderr=subprocess.STDOUT, check=True, cwd=code)
        seconds = time.perf_counter() - started
    return Timing("command", seconds, (count or failed_as_stuck)(url))


def floor(url: str, now: datetime, sql: str = FLOOR, extra: dict | None = None) -> Timing:
    """The floor's statement (or a variant of it, bench/anatomy.py, bench/limits.py: `extra` binds
    its own parameters) in one transaction."""
    engine = sa.create_engine(url)
    params = {
        "now": now,
        "cutoff": now - POLICY.stuck_after,
        "due": now + POLICY.retry_delay,
        "budget": POLICY.max_retries,
        **(extra or {}),
    }
    try:
        with engine.connect() as conn:
            pid = backend_pid(conn)
            cpu = backend_cpu(pid)
            started = time.perf_counter()
            with conn.begin():
                failed = conn.execute(sa.text(sql), params).rowcount
            seconds = time.perf_counter() - started
        return Timing("floor", seconds, failed, cpu_spent(pid, cpu))
    finally:
        engine.dispose()


def row_by_row(url: str, now: datetime) -> Timing:
    engine = sa.create_engine(url)
    cutoff = now - POLICY.stuck_after
    try:
        started = time.perf_counter()
        with engine.connect() as conn:
            stuck = conn.execute(
                sa.text(
                    "SELECT id, started_at, retry_count, is_retry, max_retries FROM scrape_runs"
                    " WHERE status = 'running' AND started_at < :cutoff"
                ),
                {"cutoff": cutoff},
            ).all()
            conn.commit()
            failed = 0
            for run_id, since, retry_count, is_retry, max_retries in stuck:
                outcome = decide_failure(
                    error=stuck_error(since, now),
                    pattern=STUCK_PATTERN,
                    retry_count=retry_count,
                    budget=chain_budget(is_retry, max_retries, POLICY),
                    now=now,
                    policy=POLICY,
                    rng=random.Random(),
                )
                params = {
                    "id": run_id,
                    "now": now,
                    "budget": outcome.budget,
                    "due": outcome.retry_due,
                    "message": outcome.message,
                }
                with conn.begin():
                    failed += conn.execute(sa.text(ROW_FAIL), params).rowcount
                    conn.execute(sa.text(ROW_RETRY), params)
        return Timing("row_by_row", time.perf_counter() - started, failed)
    finally:
        engine.dispose()


def row_by_row_script(url: str, now: datetime) -> Timing:
    """`row_by_row` as the script an operator would otherwise run: its own process, timed from
    outside (interpreter and imports included), beside `command`."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bench.contenders", url, now.isoformat()],
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    return Timing("row_by_row_script", seconds, failed_as_stuck(url))


def failed_as_stuck(url: str) -> int:
    """How many runs a contender in another process failed as stuck."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'failed' AND failure_pattern = 'stuck'")
            ).scalar_one()
    finally:
        engine.dispose()


def outcome_counts(url: str) -> tuple:
    """The counts of `outcome_signature`, without the messages' digest."""
    return outcome_signature(url)[:2]


def outcome_signature(url: str) -> tuple:
    """What a sweep left behind, to prove the contenders did the same work."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return tuple(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FILTER (WHERE status = 'failed' AND failure_pattern = 'stuck'),"
                        " count(*) FILTER (WHERE status = 'pending_retry'),"
                        " md5(string_agg(error_message, '|' ORDER BY error_message) FILTER (WHERE failure_pattern = 'stuck'))"
                        " FROM scrape_runs"
                    )
                ).one()
            )
    finally:
        engine.dispose()


if __name__ == "__main__":  # the row-by-row script: python -m bench.contenders URL NOW
    print(row_by_row(sys.argv[1], datetime.fromisoformat(sys.argv[2])))
