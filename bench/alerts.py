"""What watching costs (SPEC §15): one tick of a process that sends notifications, on a table of a
year's history and a busy hour.

    python -m bench.alerts [--history 1000000] [--hour 20000] [--repeat 30]

The table: `--history` finished runs over a year (bench/data.py), then `--hour` retries that ended
in the last hour (60 % failed, over ten places). Measured, each `--repeat` times, medians and p95:
what a tick reads (`conditions`: the failure rate overall and for the worst target, the checker's
last finished run), a tick with nothing due (the reads and four claims that find nothing), and a
tick that sends a message to a receiver on loopback through Apprise's json:// URL. Prints the plan
of the failure-rate statement (which index it reads) and JSON of the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.data import PLACES, bench_now, build_template, copy_of, drop, start_server
from jobs import alerting
from jobs.alert_urls import parse_alert_urls
from jobs.rules import RetryPolicy
from jobs.runtime import Runtime
from jobs.settings import Settings
from tests.alert_receiver import Receiver

TEMPLATE = "bench_alerts_tpl"
BUSY_HOUR = """
WITH roots AS (
    INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at, failure_pattern)
    SELECT 'Data Engineer', (:places)[1 + g % 10], 'failed',
           :now - interval '5 hours', :now - interval '4 hours', 'stuck'
    FROM generate_series(1, :n) g RETURNING id, location_query
)
INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at, is_retry,
                         original_run_id, retry_count)
SELECT 'Data Engineer', location_query, CASE WHEN random() < 0.6 THEN 'failed' ELSE 'completed' END,
       :now - interval '50 minutes', :now - make_interval(secs => random() * 3500), true, id, 1
FROM roots
"""


def timed(work, repeat: int) -> dict:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    return {
        "median_ms": round(statistics.median(seconds) * 1000, 2),
        "p95_ms": round(seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))] * 1000, 2),
        "runs": repeat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.alerts")
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--hour", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stuck-runs-bench-alerts-"))
    server_url, server = start_server(work)
    now = bench_now()
    build_template(server_url, TEMPLATE, history=args.history, stuck=0, now=now)
    url, name = copy_of(server_url, TEMPLATE)
    receiver = Receiver()
    try:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text(BUSY_HOUR), {"places": PLACES, "now": now, "n": args.hour})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE scrape_runs")
        engine.dispose()
        settings = Settings(
            database_url=url, policy=RetryPolicy(), alert_urls=parse_alert_urls(receiver.url(), "ALERT_URLS")
        )
        rt = Runtime.open(settings)
        target = lambda t: t.c.location_query  # noqa: E731 - what TARGET will name
        params = {"sr_since": now - timedelta(hours=1), "sr_min": 10}
        with rt.engine.connect() as conn:
            statement = rt.queries.retry_failures().compile(dialect=rt.engine.dialect)
            explain = f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {statement}"
            plan = conn.exec_driver_sql(explain, {**statement.params, **params}).scalars().all()
            ended, failed = conn.execute(rt.queries.retry_failures(), params).one()
        started = rt.clock.now()
        results = {
            "rows": args.history + 300 + 2 * args.hour,
            "retries_ended_in_the_hour": ended,
            "failed": failed,
            "conditions": timed(lambda: alerting.conditions(rt, rt.clock.now(), started, target), args.repeat),
        }
        alerting.tick(rt, started, target)  # the rate message goes out; its period starts
        results["tick_nothing_due"] = timed(lambda: alerting.tick(rt, started, target), args.repeat)

        def sending_tick() -> None:
            with rt.engine.begin() as conn:  # the period ended: the next tick sends
                conn.exec_driver_sql("UPDATE stuck_runs_alerts SET last_sent_at = last_sent_at - interval '1 day'")
            alerting.tick(rt, started, target)

        results["tick_sending_one_message"] = timed(sending_tick, args.repeat)
        results["messages_received"] = len(receiver.received)
        rt.close()
        print("\n".join(plan), file=sys.stderr)
        print(json.dumps(results, indent=2))
    finally:
        receiver.close()
        drop(server_url, name)
        drop(server_url, TEMPLATE)
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
