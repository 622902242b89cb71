"""Claim throughput: P processes claiming M due retries at once; none may be claimed twice.

    python -m bench.claims worker URL SLOTS START_FILE OUT_FILE   (one claiming process)

Each worker runs `process_due_retries` with MAX_CONCURRENT_RETRIES=SLOTS and an executor that
does nothing, so what is measured is claim + record, the processor's own cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

from jobs.executors.inprocess import InProcess
from jobs.executors.outcome import Completed, RanHere
from jobs.model import Run
from jobs.settings import Settings

REPO = Path(__file__).resolve().parent.parent

PENDING = """
INSERT INTO scrape_runs (search_query, location_query, status, retry_count, max_retries, next_retry_at,
                         original_run_id, is_retry, config)
SELECT 'q' || g, 'Belgium', 'pending_retry', 1, 4, now() - interval '1 minute', gen_random_uuid(), true, '{}'
FROM generate_series(1, :n) g
"""


class NoScrape(InProcess):
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> RanHere:
        with self.lock:
            self.ids.append(str(run.id))
        return Completed()


def worker(url: str, slots: int, start_file: str, out_file: str) -> None:
    from jobs.retries import process_due_retries
    from jobs.runtime import Runtime

    logger.remove()
    executor = NoScrape()
    rt = Runtime.open(Settings(database_url=url, max_concurrent_retries=slots), executor=executor)
    while not Path(start_file).exists():
        time.sleep(0.001)
    started = time.time()
    process_due_retries(rt)
    ended = time.time()
    Path(out_file).write_text(json.dumps({"ids": executor.ids, "started": started, "ended": ended}))
    rt.close()


def seed_pending(url: str, count: int) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(PENDING), {"n": count})
    engine.dispose()


def measure(url: str, processes: int, workdir: Path) -> dict:
    """Starts `processes` workers sharing `processes` slots, releases them together."""
    start = workdir / f"start-{processes}"
    outs = [workdir / f"claims-{processes}-{i}.json" for i in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.claims", "worker", url, str(processes), str(start), str(out)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for out in outs
    ]
    time.sleep(3)  # imports and connections, before the start line
    start.touch()
    for proc in procs:
        if proc.wait(600) != 0:
            raise RuntimeError(f"claim worker exited {proc.returncode}")
    results = [json.loads(out.read_text()) for out in outs]
    ids = [i for r in results for i in r["ids"]]
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {
        "processes": processes,
        "claimed": len(ids),
        "unique": len(set(ids)),
        "seconds": round(seconds, 3),
        "per_second": round(len(ids) / seconds, 1) if seconds else None,
    }


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
