"""Where a hand-over's time goes (bench/handover.py's `ours`, timed phase by phase).

    python -m bench.handover_phases ENGINE [--cap 100] [--retries 2000]

Wraps, for one run of `ours` after its floor: jobs/delivery.py's `mark` (step 1, wait for a
session and the cap's lock included) and `settle` (step 3), the executor's `deliver` (step 2),
each wait for a pooled session, and the time the cap's lock is held (from the advisory lock's
statement to the commit). Each phase: how many, their sum over all threads, p50, p90, max.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import defaultdict

import sqlalchemy as sa
from loguru import logger
from sqlalchemy.pool import QueuePool

from bench import handover
from jobs import delivery
from jobs.executors.celery import CeleryExecutor
from jobs.executors.scrapyd import ScrapydExecutor
from jobs.executors.webhook import WebhookExecutor

TIMES: dict[str, list[float]] = defaultdict(list)
LOCK = threading.Lock()


def note(phase: str, seconds: float) -> None:
    with LOCK:
        TIMES[phase].append(seconds)


def timed(owner: type, name: str, phase: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            note(phase, time.perf_counter() - started)

    setattr(owner, name, wrapper)


def instrument() -> None:
    timed(delivery.Deliveries, "mark", "mark (waits included)")
    timed(delivery.Deliveries, "settle", "settle (waits included)")
    for executor in (CeleryExecutor, ScrapydExecutor, WebhookExecutor):
        timed(executor, "deliver", "deliver")
    timed(QueuePool, "_do_get", "wait for a pooled session")
    locked: dict[int, float] = {}

    @sa.event.listens_for(sa.engine.Engine, "after_cursor_execute")
    def lock_taken(conn, cursor, statement, params, context, executemany) -> None:
        if "pg_advisory_xact_lock" in statement:
            locked[id(conn)] = time.perf_counter()

    @sa.event.listens_for(sa.engine.Engine, "commit")
    def lock_released(conn) -> None:
        taken = locked.pop(id(conn), None)
        if taken is not None:
            note("the cap's lock held", time.perf_counter() - taken)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.handover_phases")
    parser.add_argument("engine", choices=handover.ENGINES)
    parser.add_argument("--cap", type=int, default=100)
    parser.add_argument("--retries", type=int, default=2000)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with handover.engines_on_a_server("stuck-runs-bench-phases-", [args.engine]) as (_, url, (engine,)):
        floor = handover.floor(engine, args.retries, args.cap)
        instrument()
        ours = handover.ours(engine, url, args.retries, args.cap)
    print(f"{args.engine}, cap {args.cap}, {args.retries:,} retries, load {handover.load()}")
    print(f"floor {floor['per_second']:.1f}/s, ours {ours['per_second']:.1f}/s over {ours['seconds']} s")
    for phase, values in TIMES.items():
        values.sort()
        ms = [1000 * values[int(len(values) * q)] for q in (0.5, 0.9)]
        print(
            f"  {phase:<28} {len(values):>6} × sum {sum(values):8.2f} s  p50 {ms[0]:7.2f} ms  "
            f"p90 {ms[1]:7.2f} ms  max {1000 * values[-1]:7.1f} ms"
        )


if __name__ == "__main__":
    main()
