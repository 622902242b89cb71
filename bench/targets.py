"""`stuck-runs stats --by target` on a ten-million-row table: p50 / p95 over a 7-day window, and
the plan PostgreSQL uses for it.

    python -m bench.targets [--rows 10000000] [--repeat 30] [--json FILE]

The table is the benchmark's `scrape_runs` (bench/data.py's columns, a year of history, a tenth
failed with one of five patterns, one in twenty a retry) with a `start_url` on one of 500 sites
(`www.` on a third of them), so `TARGET=host(start_url)` has real URLs to take apart. Each
variant runs the service `stats --by` calls (jobs.targets.stats_by, in this process, after a
warm-up) `repeat` times one after the other; the plan is EXPLAIN (ANALYZE, BUFFERS) of the
very statement. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from bench import data
from bench.web import percentile
from db.engine import make_engine
from db.migrate import migrate
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.targets import grouping, stats_by

WINDOW = timedelta(days=7)
PATTERNS = ["server_error", "timeout", "stuck", "rate_limited", "not_found"]

HISTORY = """
INSERT INTO scrape_runs (search_query, location_query, status, error_message, started_at, completed_at,
                         user_id, proxy_pool, updated_at, retry_count, max_retries, original_run_id, is_retry,
                         failure_pattern, start_url)
SELECT (:queries)[1 + g % 10], (:places)[1 + (g / 10) % 10],
       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'completed' END,
       CASE WHEN g % 10 = 0 THEN 'HTTP 503 Service Unavailable' END,
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '2 hours',
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '1 hour',
       g % 997, 'eu-' || g % 3,
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '1 hour',
       CASE WHEN g % 20 = 0 THEN 1 ELSE 0 END, 4,
       CASE WHEN g % 20 = 0 THEN gen_random_uuid() END, g % 20 = 0,
       CASE WHEN g % 10 = 0 THEN (:patterns)[1 + (g / 10) % 5] END,
       'https://' || CASE WHEN (g::bigint * 7919) % 500 % 3 = 0 THEN 'www.' ELSE '' END
           || 'site' || (g::bigint * 7919) % 500 || '.example.com/search?q=' || g
FROM generate_series(1, :n) g
"""


def build(server_url: str, rows: int) -> str:
    name = "bench_targets"
    with data.admin(server_url).connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = data.database_url(server_url, name)
    engine = make_engine(url)
    params = {"queries": data.QUERIES, "places": data.PLACES, "patterns": PATTERNS, "now": data.bench_now(), "n": rows}
    with engine.begin() as conn:
        conn.exec_driver_sql(data.TABLE)
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN start_url TEXT")
        conn.execute(sa.text(HISTORY), params)
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD PRIMARY KEY (id)")
    migrate(engine, "scrape_runs")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE scrape_runs")
    engine.dispose()
    return url


def indexes_in(plan: object) -> list[str]:
    """The indexes a JSON plan reads, in the order it names them."""
    found: list[str] = []
    if isinstance(plan, dict):
        if "Index Name" in plan:
            found.append(plan["Index Name"])
        for value in plan.values():
            found += indexes_in(value)
    elif isinstance(plan, list):
        for value in plan:
            found += indexes_in(value)
    return found


def explain(rt: Runtime, by: str) -> dict:
    from db.queries.groups import stats_by_group

    key, _ = grouping(rt, by)
    statement = stats_by_group(rt.queries, key)
    params = {"sr_since": rt.clock.now() - WINDOW, "sr_limit": 20}
    compiled = statement.compile(rt.engine, compile_kwargs={"render_postcompile": True})
    with rt.engine.connect() as conn:
        plan = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + str(compiled), compiled.construct_params(params)
        ).scalar_one()
    top = plan[0]
    return {
        "indexes": sorted(set(indexes_in(top["Plan"]))),
        "execution_ms": round(top["Execution Time"], 1),
        "rows_read": top["Plan"].get("Actual Rows"),
    }


def measure(url: str, repeat: int) -> dict:
    settings = Settings(database_url=url, target="host(start_url)")
    rt = Runtime.open(settings)
    results = {}
    try:
        for label, by in (("by target, host(start_url)", "target"), ("by column, location_query", "location_query")):
            for _ in range(3):
                stats_by(rt, by, WINDOW)  # warm: plans, the window's pages in memory
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                grouped = stats_by(rt, by, WINDOW)
                times.append((time.perf_counter() - started) * 1000)
            results[label] = {
                "p50_ms": round(statistics.median(times), 1),
                "p95_ms": round(percentile(times, 0.95), 1),
                "groups_shown": len(grouped.groups),
                "runs_in_window": None,
                **explain(rt, by),
            }
            with rt.engine.connect() as conn:
                results[label]["runs_in_window"] = conn.execute(
                    sa.text("SELECT count(*) FROM scrape_runs WHERE started_at >= now() - interval '7 days'")
                ).scalar_one()
            print(label, results[label], flush=True)
    finally:
        rt.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stuck-runs-bench-targets-"))
    server_url, server = data.start_server(work)
    try:
        started = time.perf_counter()
        url = build(server_url, args.rows)
        print(f"built {args.rows:,} rows in {time.perf_counter() - started:.0f}s", flush=True)
        figures = {
            "rows": args.rows,
            "repeat": args.repeat,
            "when": time.strftime("%Y-%m-%d"),
            **measure(url, args.repeat),
        }
    finally:
        if server is not None:
            server.cleanup()
    text = json.dumps({"targets": figures}, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
