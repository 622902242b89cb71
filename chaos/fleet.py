"""The simulated scraper fleet: starts runs, finishes most, abandons some, completes late.

    python -m chaos.fleet URL SEED STOP_FILE LOG_FILE [IN_FLIGHT]

Every completion it commits is logged (`completed <id>`): the auditor checks none of them was
ever turned into a failure.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import sqlalchemy as sa

START = (
    "INSERT INTO scrape_runs (search_query, location_query, status, started_at, config, user_id)"
    " VALUES (:q, :l, 'running', now(), '{\"pages\": 2}', :u) RETURNING id"
)
FINISH = (
    "UPDATE scrape_runs SET status = :status, completed_at = now(), error_message = :error WHERE id = :id RETURNING id"
)


def main(url: str, seed: int, stop_file: str, log_file: str, most_in_flight: int = 30) -> None:
    rng = random.Random(seed)
    engine = sa.create_engine(url, pool_pre_ping=True)
    in_flight: list[tuple[str, float, str]] = []  # (id, finish at, fate)
    with open(log_file, "a", buffering=1) as log:
        while not Path(stop_file).exists():
            completions: list[str] = []
            finishing: list[tuple[str, float, str]] = []
            try:
                with engine.begin() as conn:
                    if len(in_flight) < most_in_flight and rng.random() < 0.7:
                        run_id = str(
                            conn.execute(
                                sa.text(START),
                                {
                                    "q": f"q{rng.randint(1, 99)}",
                                    "l": rng.choice(["Belgium", "Lisbon", "Oslo"]),
                                    "u": rng.randint(1, 9),
                                },
                            ).scalar_one()
                        )
                        fate = rng.choices(["complete", "fail", "abandon", "slow"], [60, 15, 15, 10])[0]
                        delay = {
                            "complete": rng.uniform(0.1, 1.5),
                            "fail": rng.uniform(0.1, 1.5),
                            "abandon": 1e9,
                            "slow": rng.uniform(2.5, 5),
                        }[fate]
                        in_flight.append((run_id, time.monotonic() + delay, fate))
                    now = time.monotonic()
                    for item in [i for i in in_flight if i[1] <= now]:
                        in_flight.remove(item)
                        finishing.append(item)
                        run_id, _, fate = item
                        status = "failed" if fate == "fail" else "completed"
                        error = "scraper crashed: selector not found" if status == "failed" else None
                        # Unconditional, as a real scraper writes its own row: a 'slow' run the
                        # checker failed meanwhile is completed late.
                        done = conn.execute(sa.text(FINISH), {"status": status, "error": error, "id": run_id}).scalar()
                        if done and status == "completed":
                            completions.append(run_id)
                # Logged once committed: a completion lost with its transaction (the database
                # restarted under it) was never the scraper's word.
                for run_id in completions:
                    log.write(f"completed {run_id}\n")
            except sa.exc.OperationalError:
                in_flight.extend(finishing)  # finished again once the database is back, as a scraper retries
                time.sleep(0.2)  # the database is being restarted; a fleet waits too
            time.sleep(rng.uniform(0.01, 0.1))
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], *map(int, sys.argv[5:6]))
