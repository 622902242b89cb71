"""The scraper stuck-runs executes for retries in chaos trials (SCRAPE_RUN_COMMAND).

    python -m chaos.executor RUN_ID

Logs `start <id> <pid>` and `end <id> <pid> <outcome>` to $CHAOS_EXEC_LOG, then does what a
scraper does at random (seeded by $CHAOS_SEED and the run): succeed, fail with a 503 or a 404,
hang past the timeout, or write its own status to its row first.
"""

from __future__ import annotations

import os
import random
import sys
import time
import zlib


def main(run_id: str) -> int:
    log = os.environ["CHAOS_EXEC_LOG"]
    rng = random.Random(zlib.crc32(f"{os.environ.get('CHAOS_SEED', '0')}:{run_id}".encode()))
    fate = rng.choices(["ok", "503", "404", "hang", "own_completed", "own_failed", "slow"], [50, 20, 5, 8, 6, 6, 5])[0]
    with open(log, "a", buffering=1) as out:
        out.write(f"start {run_id} {os.getpid()} {fate}\n")
    if fate == "hang":
        time.sleep(3600)
    if fate == "slow":
        time.sleep(rng.uniform(0.5, 1.2))
    if fate.startswith("own_"):
        import sqlalchemy as sa  # only here: a scraper process starts in milliseconds otherwise

        engine = sa.create_engine(os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg2://", 1))
        status = fate.removeprefix("own_")
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE scrape_runs SET status = :s, completed_at = now(), error_message = :e WHERE id = :id"),
                {"s": status, "e": "captcha wall" if status == "failed" else None, "id": run_id},
            )
        engine.dispose()
    code = {"ok": 0, "slow": 0, "own_completed": 0, "503": 1, "404": 1, "own_failed": 1}[fate]
    if fate == "503":
        print("requests.exceptions.HTTPError: 503 Server Error: Service Unavailable", file=sys.stderr)
    if fate == "404":
        print("HTTP Error 404: Not Found", file=sys.stderr)
    with open(log, "a", buffering=1) as out:
        out.write(f"end {run_id} {os.getpid()} {fate}\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
