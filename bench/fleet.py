"""The fleet's own writes during a mass event (issue 21): while the sweep, with kinds, learned
limits and progress on, fails 100,000 stuck runs of a 1M-row table, N writer processes play the
scrapers: each repeatedly updates its own healthy running runs' progress counter and heartbeat,
one single-row UPDATE at a time (autocommit), and times every write.

    python -m bench.fleet                      # 100k stuck of 1M, 4 writers, 3 rounds
    python -m bench.fleet --stuck 10000 --history 100000 --writers 2 --repeat 1

Each round measures, each on a fresh copy of one template (bench/limits.py's table and limits):
- **idle**: the writers on the healthy runs, no sweep, for as long as the round's sweep took;
- **sweep**: the same writers during the sweep;
- **finishers**: the same number of writers finishing stuck runs (`status = 'completed'` where
  still running, as a scraper that was slow, not dead, does) during the sweep: the runs the sweep
  is failing, so a write may wait for the batch that holds its run.
Beside them, the sweep's per-batch lock time: how long each batch's transaction (BATCH_SIZE 1000)
was open, from its first statement to its commit, which is as long as it holds its runs locked.

Writers pace themselves (`--pause`, 5 ms between writes each: a busy fleet, not a flood), and only
writes started inside the measured span count. Latencies are printed as p50/p99/max per phase, per
round and pooled over the rounds, with the load average.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

from bench import contenders, data
from bench import limits as mass
from db.layout import Layout, parse_column_map
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.stuck import sweep_stuck_runs

HEALTHY = "UPDATE scrape_runs SET items = items + 1, updated_at = now() WHERE id = %s AND status = 'running'"
FINISH = (
    "UPDATE scrape_runs SET status = 'completed', completed_at = now(), updated_at = now()"
    " WHERE id = %s AND status = 'running'"
)


def writer(dsn: str, sql: str, ids: list[str], pause: float, ready, stop, out) -> None:
    """One scraper process: UPDATE its runs in turn until `stop`; puts (start, seconds) of each write."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    timings = []
    ready.release()
    i = 0
    while not stop.is_set():
        run_id = ids[i % len(ids)]
        i += 1
        started = time.monotonic()
        cur.execute(sql, (run_id,))
        timings.append((started, time.monotonic() - started))
        time.sleep(pause)
    conn.close()
    out.put(timings)


def _dsn(url: str) -> str:
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _ids(url: str, *, stuck: bool) -> list[str]:
    """The healthy running runs (started within 55 minutes) or the stuck ones (over 90 minutes ago)."""
    age = "started_at < :newest - interval '90 minutes'" if stuck else "started_at > :newest - interval '55 minutes'"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        newest = conn.exec_driver_sql("SELECT max(started_at) FROM scrape_runs WHERE status = 'running'").scalar_one()
        sql = f"SELECT id::text FROM scrape_runs WHERE status = 'running' AND {age} ORDER BY id"
        rows = conn.execute(sa.text(sql), {"newest": newest}).scalars().all()
    engine.dispose()
    return list(rows)


class Fleet:
    """N writer processes over `ids` (dealt out among them), started and stopped together."""

    def __init__(self, url: str, sql: str, ids: list[str], writers: int, pause: float) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.stop, self.out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        random.Random(7).shuffle(ids)
        self.procs = [
            ctx.Process(target=writer, args=(_dsn(url), sql, ids[i::writers], pause, self.ready, self.stop, self.out))
            for i in range(writers)
        ]

    def __enter__(self) -> Fleet:
        for p in self.procs:
            p.start()
        for _ in self.procs:
            self.ready.acquire()
        time.sleep(0.5)  # every writer past its first writes (connections warm)
        return self

    def finish(self) -> list[tuple[float, float]]:
        self.stop.set()
        timings = [t for _ in self.procs for t in self.out.get()]
        for p in self.procs:
            p.join()
        return timings

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=10)


def sweep(url: str, now) -> tuple[float, int, list[float]]:
    """The sweep with kinds, learned limits and progress on; its seconds, runs failed and each
    batch's lock time (its transaction's first statement to commit)."""
    logger.remove()
    layout = Layout(columns=parse_column_map("kind=spider,progress=items"))
    rt = Runtime.open(Settings(database_url=url, layout=layout), clock=contenders.FixedClock(now))
    held: list[float] = []

    @sa.event.listens_for(rt.engine, "before_cursor_execute")
    def _mark(conn, cursor, statement, *_):
        if "batch_failed" in statement and "sr_batch_started" not in conn.info:
            conn.info["sr_batch_started"] = time.monotonic()

    @sa.event.listens_for(rt.engine, "commit")
    def _held(conn):
        started = conn.info.pop("sr_batch_started", None)
        if started is not None:
            held.append(time.monotonic() - started)

    try:
        started = time.monotonic()
        result = sweep_stuck_runs(rt, limits=mass.limits(now))
        return time.monotonic() - started, result.failed, held
    finally:
        rt.close()


def spread(latencies: list[float]) -> dict:
    ms = sorted(1000 * x for x in latencies)
    if not ms:
        return {"writes": 0}
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 2)  # noqa: E731
    return {"writes": len(ms), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(ms[-1], 2)}


def round_of(server_url: str, judge, writers: int, pause: float) -> dict:
    result: dict = {"load_before": os.getloadavg()[0]}
    url, db = data.copy_of(server_url, mass.TEMPLATE)
    try:
        healthy, stuck = _ids(url, stuck=False), _ids(url, stuck=True)
        with Fleet(url, HEALTHY, healthy, writers, pause) as fleet:
            began = time.monotonic()
            seconds, failed, held = sweep(url, judge)
            ended = time.monotonic()
            during = [d for s, d in fleet.finish() if began <= s < ended]
        result["sweep"] = {"seconds": round(seconds, 3), "failed": failed, **spread(during)}
        result["batch_lock_ms"] = {
            "batches": len(held),
            "median": round(1000 * statistics.median(held), 1),
            "max": round(1000 * max(held), 1),
            "all": [round(1000 * h, 1) for h in held],
        }
    finally:
        data.drop(server_url, db)
    url, db = data.copy_of(server_url, mass.TEMPLATE)
    try:
        with Fleet(url, HEALTHY, _ids(url, stuck=False), writers, pause) as fleet:
            began = time.monotonic()
            time.sleep(seconds)
            ended = time.monotonic()
            idle = [d for s, d in fleet.finish() if began <= s < ended]
        result["idle"] = spread(idle)
    finally:
        data.drop(server_url, db)
    url, db = data.copy_of(server_url, mass.TEMPLATE)
    try:
        with Fleet(url, FINISH, stuck, writers, pause) as fleet:
            began = time.monotonic()
            f_seconds, f_failed, f_held = sweep(url, judge)
            ended = time.monotonic()
            finishing = [d for s, d in fleet.finish() if began <= s < ended]
        result["finishers"] = {
            "seconds": round(f_seconds, 3),
            "failed": f_failed,
            "batch_lock_median_ms": round(1000 * statistics.median(f_held), 1),
            **spread(finishing),
        }
        result["_latencies"] = {"idle": idle, "sweep": during, "finishers": finishing, "held": held + f_held}
    finally:
        data.drop(server_url, db)
    result["load_after"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--stuck", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.005, help="seconds each writer rests between writes")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stuck-runs-fleet-") as work:
        server_url, server = data.start_server(Path(work))
        try:
            now = data.bench_now()
            mass.build(server_url, history=args.history, stuck=args.stuck, now=now)
            judge = now + timedelta(minutes=1)
            rounds = []
            for n in range(args.repeat):
                rounds.append(round_of(server_url, judge, args.writers, args.pause))
                shown = {k: v for k, v in rounds[-1].items() if k != "_latencies"}
                shown["batch_lock_ms"] = {k: v for k, v in shown["batch_lock_ms"].items() if k != "all"}
                print(f"round {n + 1}: {json.dumps(shown)}", flush=True)
            pooled = {
                phase: spread([x for r in rounds for x in r["_latencies"][phase]])
                for phase in ("idle", "sweep", "finishers")
            }
            held = [x for r in rounds for x in r["_latencies"]["held"]]
            pooled["batch_lock"] = {
                "batches": len(held),
                "median_ms": round(1000 * statistics.median(held), 1),
                "p99_ms": round(1000 * sorted(held)[int(0.99 * len(held))], 1),
                "max_ms": round(1000 * max(held), 1),
            }
            print(
                json.dumps(
                    {
                        "history": args.history,
                        "stuck": args.stuck,
                        "writers": args.writers,
                        "pause_s": args.pause,
                        "repeat": args.repeat,
                        "pooled": pooled,
                    },
                    indent=2,
                )
            )
            data.drop(server_url, mass.TEMPLATE)
        finally:
            if server is not None:
                server.cleanup()


if __name__ == "__main__":
    main()
