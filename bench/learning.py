"""`python -m bench.learning [ROWS]`: learning limits over ten million completed runs, all inside
the window (SPEC §14's bar: under a second, an index that serves it).

One table of ROWS (default 10,000,000) completed runs of twenty spiders, from two minutes to six
hours long, all completed within the last 30 days, and 300 running; the migrations' learning indexes
(0007's `(completed_at) INCLUDE (kind, started_at)` for the hourly ranges, 0010's `(kind, whole
seconds run) INCLUDE (completed_at, started_at)` for the first count), both over completed runs;
VACUUM ANALYZE (a table that has been
vacuumed, as autovacuum keeps a real one, so the scan reads the index only). Then, medians of
five: the statement that learns (jobs.learning.compute, in-process), the whole recomputation as a
process needing the limits does it (lock, compute, store), the plan (EXPLAIN ANALYZE BUFFERS), and
`stuck-runs thresholds` as an operator runs it (the evidence reads every completed run of the window).

`python -m bench.learning --profile [ROWS]`: the first count alone, beside what bounds it from
below, each timed (median of 3) and its plan printed: the counting statement as learning runs it,
and bare statements over the same window of the learning index: the index-only count of its
entries (the floor), with and without parallel workers, and the count by kind.

`python -m bench.learning --first [ROWS]`: SPEC §14's bar, the first learning of a window holding
every run, beside the floor, interleaved rounds (medians of 5), the machine's load before and after:
the floor (the bare index-only count of the window's entries, no workers), the first count alone,
the whole first learning in-process (`learned()`: lock, count, store); and as a user runs it,
`stuck-runs check --dry-run` needing the limits first (nothing stored: it learns) beside the same
command with them stored and fresh. The command runs on the real clock, so its window is made a
day longer than the table's history (LEARN_WINDOW=31d): every run still inside it.

On the embedded PostgreSQL, or DATABASE_URL's server (a role that may create databases).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from bench import data
from db.engine import make_engine
from db.layout import Layout
from db.migrate import migrate
from db.queries.thresholds import ThresholdStatements
from jobs import learning
from jobs.learning import LearnSettings
from jobs.limits import learning_rule
from jobs.runtime import Runtime
from jobs.settings import load_settings

SPIDERS = 20
ENV = {"COLUMN_MAP": "kind=spider", "LEARN_THRESHOLDS": "on", "SCRAPE_RUN_COMMAND": "true"}
# Spider s runs 2 minutes times 1.35^s (2 minutes to about six hours), give or take a third.
HISTORY = """
INSERT INTO scrape_runs (search_query, location_query, status, spider, started_at, completed_at)
SELECT 'crawl', 'web', 'completed', 'spider_' || lpad((g % {spiders})::text, 2, '0'),
       :now - make_interval(secs => g * :span / :n)
            - make_interval(secs => 120 * power(1.35, g % {spiders}) * (0.67 + (g % 97) / 145.0)),
       :now - make_interval(secs => g * :span / :n)
FROM generate_series(1, :n) g
"""


def build(server_url: str, name: str, rows: int, now) -> str:
    with data.admin(server_url).connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = data.database_url(server_url, name)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(data.TABLE)
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN spider TEXT")
        conn.execute(sa.text(HISTORY.format(spiders=SPIDERS)), {"now": now, "n": rows, "span": 2592000.0})
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, spider, started_at)"
                " SELECT 'live', 'web', 'running', 'spider_' || lpad((g % 20)::text, 2, '0'),"
                " :now - g * interval '10 seconds' FROM generate_series(1, 300) g"
            ),
            {"now": now},
        )
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD PRIMARY KEY (id)")
    migrate(engine, "scrape_runs", layout=Layout(columns={"kind": "spider"}))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE scrape_runs")
    engine.dispose()
    return url


def timed(action, repeat: int = 5) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


class Clock:
    def __init__(self, now: datetime) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at


# Bare statements over the window of the learning index (`:since`, `:until`): what bounds the count.
WINDOW = "FROM scrape_runs WHERE status = 'completed' AND completed_at >= :since AND completed_at < :until"
FLOORS = {
    "bare count of the window, the planner's choice": f"SELECT count(*) {WINDOW}",
    "bare index-only count of the window (the floor; seq scan off)": f"SELECT count(*) {WINDOW}",
    "bare index-only count, no parallel workers (seq scan off)": f"SELECT count(*) {WINDOW}",
    "count by kind and whole second, date_part (double precision)": (
        "SELECT spider, floor(date_part('epoch', completed_at - started_at))::int AS s, count(*)"
        f" {WINDOW} AND started_at IS NOT NULL GROUP BY 1, 2"
    ),
    "count by kind and whole second, extract (numeric, as before)": (
        "SELECT spider, floor(extract(epoch FROM completed_at - started_at))::int AS s, count(*)"
        f" {WINDOW} AND started_at IS NOT NULL GROUP BY 1, 2"
    ),
}


def profile(rt: Runtime, now: datetime, learn: LearnSettings) -> None:
    """The first count (from scratch, rolled back) and the floors beside it: plans and medians of 3."""
    q = ThresholdStatements(rt.runs)
    fresh = learning.counting_plan(None, now, learn.window)
    window = {"since": now - learn.window, "until": now}
    first = q.first_count().compile(dialect=rt.engine.dialect)  # 0010's index, in its order
    moved = q.runtimes().compile(dialect=rt.engine.dialect)  # the statement that moves counts on
    variants = {"the first count as learning runs it (first_count)": (str(first), {**first.params, **fresh})}
    variants |= {"the first count, no parallel workers": variants["the first count as learning runs it (first_count)"]}
    variants |= {"the hourly statement (runtimes) over the whole window": (str(moved), {**moved.params, **fresh})}
    variants |= {name: (sql, window) for name, sql in FLOORS.items()}
    for name, (sql, params) in variants.items():
        with rt.engine.connect() as conn:
            if "no parallel" in name:
                conn.exec_driver_sql("SET max_parallel_workers_per_gather = 0")
            if "seq scan off" in name:
                conn.exec_driver_sql("SET enable_seqscan = off")
            conn.commit()  # session settings, kept past the rollbacks below
            text = sa.text(sql) if ":since" in sql else None
            run = (
                (lambda: conn.execute(text, params))
                if text is not None
                else (lambda: conn.exec_driver_sql(sql, params))
            )
            run()  # warm
            conn.rollback()
            times = []
            for _ in range(3):
                started = time.perf_counter()
                run()
                times.append(time.perf_counter() - started)
                conn.rollback()
            explain = f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}"
            plan = conn.execute(sa.text(explain), params) if text is not None else conn.exec_driver_sql(explain, params)
            plan = plan.scalars().all()
            conn.rollback()
        print(f"\n== {name}: median {statistics.median(times):.3f} s of {[round(t, 3) for t in times]}")
        print("\n".join(plan), flush=True)


def first_learning(rt: Runtime, now: datetime, learn: LearnSettings, rounds: int = 5) -> None:
    """The first learning beside the floor, interleaved rounds: each figure and its medians."""
    q = ThresholdStatements(rt.runs)
    window = {"since": now - learn.window, "until": now}
    count = q.first_count().compile(dialect=rt.engine.dialect)
    fresh = {**count.params, **learning.counting_plan(None, now, learn.window)}
    rule = learning_rule(learn)
    env = {**os.environ, "DATABASE_URL": rt.settings.database_url, **ENV, "LEARN_WINDOW": "31d"}
    check = [str(Path(sys.executable).with_name("stuck-runs")), "check", "--dry-run"]

    def forget() -> None:
        with rt.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM stuck_runs_thresholds")

    def floor() -> None:
        with rt.engine.connect() as conn:
            conn.exec_driver_sql("SET max_parallel_workers_per_gather = 0")
            conn.exec_driver_sql("SET enable_seqscan = off")
            conn.execute(sa.text(FLOORS["bare index-only count, no parallel workers (seq scan off)"]), window)
            conn.rollback()

    def first_count() -> None:
        with rt.engine.connect() as conn:
            conn.exec_driver_sql(str(count), fresh).all()
            conn.rollback()

    def learned() -> None:
        found = learning.learned(rt, learn, rule)
        assert found.computed and sum(k.runs for k in found.kinds) == rows  # every run inside the window

    def command() -> None:
        subprocess.run(check, env=env, check=True, capture_output=True)

    with rt.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT count(*) FROM scrape_runs WHERE status = 'completed'").scalar_one()
    contenders = {
        "floor: bare index-only count of the window, no workers": (floor, None),
        "the first count alone (first_count)": (first_count, None),
        "the whole first learning, in-process (learned())": (learned, forget),
        "`stuck-runs check --dry-run`, nothing stored: it learns first": (command, forget),
        # right after it: what it stored is fresh (the same settings, within the hour)
        "`stuck-runs check --dry-run`, limits stored and fresh": (command, None),
    }
    print(f"before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    for action, setup in contenders.values():  # warm, as a server serving the table has it
        if setup:
            setup()
        action()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (action, setup) in contenders.items():
            if setup:
                setup()
            started = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - started)
    print(f"after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    base = statistics.median(times["floor: bare index-only count of the window, no workers"])
    for name, taken in times.items():
        median = statistics.median(taken)
        print(f"{name}: median {median:.3f} s ({median / base:.2f}x the floor) of {[round(t, 3) for t in taken]}")


def main() -> None:
    args = [a for a in sys.argv[1:] if a not in ("--profile", "--first")]
    rows = int(args[0]) if args else 10_000_000
    name = f"bench_learning_{rows}"
    work = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    server_url, server = data.start_server(work)
    now = data.bench_now()
    url = data.database_url(server_url, name)
    if os.environ.get("BENCH_KEEP") != "1":  # else reuse the table an earlier run built
        started = time.perf_counter()
        url = build(server_url, name, rows, now)
        print(f"built {rows:,} runs in {time.perf_counter() - started:.0f} s", flush=True)
    engine = make_engine(url)
    with engine.connect() as conn:  # the table's own now: just after its newest completion (a kept table
        # was built earlier), so the window [now - 30 days, now) holds every run of the table
        now = conn.exec_driver_sql("SELECT max(completed_at) FROM scrape_runs").scalar_one() + timedelta(microseconds=1)
    engine.dispose()
    clock = Clock(now)
    rt = Runtime.open(load_settings({"DATABASE_URL": url, **ENV}), clock=clock)
    learn = LearnSettings.of(rt.settings)
    rule = learning_rule(learn)
    if "--profile" in sys.argv or "--first" in sys.argv:
        (profile if "--profile" in sys.argv else first_learning)(rt, now, learn)
        rt.close()
        if server is not None:
            server.cleanup()
        return
    q = ThresholdStatements(rt.runs)

    def from_scratch() -> None:
        with rt.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM stuck_runs_thresholds")
        found = learning.learned(rt, learn, rule)
        assert found.computed and sum(k.runs for k in found.kinds) >= 0.99 * rows  # a month of them

    hour = timedelta(hours=1)
    per_hour = rows * 3600 // 2_592_000

    def an_hour_later() -> float:
        """An hour of the fleet's runs completes (not timed); then the next process needing the limits
        moves the counts on (timed)."""
        with rt.engine.begin() as conn:
            an_hour = {"now": clock.at + hour, "n": per_hour, "span": 3600.0}
            conn.execute(sa.text(HISTORY.format(spiders=SPIDERS)), an_hour)
        clock.at += hour
        started = time.perf_counter()
        found = learning.learned(rt, learn, rule)
        took = time.perf_counter() - started
        assert found.computed
        return took

    from_scratch()  # warm the cache, as a server that serves the table has it
    scratch_times = timed(from_scratch, repeat=3)
    hourly_times = [an_hour_later() for _ in range(5)]
    with rt.engine.connect() as conn:
        found = learning.stored(conn, q)
        moved = learning.counting_plan(found, clock.at + hour, learn.window)
        statement = q.runtimes().compile(dialect=rt.engine.dialect)
        plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", {**statement.params, **moved})
        plan = plan.scalars().all()
    env = {**os.environ, "DATABASE_URL": url, **ENV, "COLUMNS": "200"}
    command = [str(Path(sys.executable).with_name("stuck-runs")), "thresholds"]
    command_times = timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True), repeat=3)
    rt.close()
    print("\n".join(plan))
    print(f"counted from scratch (first learning): median {statistics.median(scratch_times):.3f} s of {scratch_times}")
    print(f"an hour later, counts moved on: median {statistics.median(hourly_times):.3f} s of {hourly_times}")
    print(f"`stuck-runs thresholds`, whole command: median {statistics.median(command_times):.3f} s of {command_times}")
    if server is not None:
        server.cleanup()


if __name__ == "__main__":
    main()
