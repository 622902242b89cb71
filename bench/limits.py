"""SPEC §14's cost in a mass event: 100,000 stuck runs failed with kinds, learned limits and
progress on, against the SQL floor (bench/contenders.py) and the sweep without them.

    python -m bench.limits                          # 100k stuck of 1M, 3 runs each, interleaved
    python -m bench.limits --stuck 10000 --history 100000 --repeat 3
    python -m bench.limits --idle 10000000          # the idle sweep's plan and time on 10M rows
    python -m bench.limits --no-command             # without `stuck-runs check` as a contender

Every run of the table gets a kind (`spider`: four kinds) and a progress counter (`items`), and
`stuck_runs_progress` holds what a sweep ten minutes earlier recorded (as in production, where
the sweep before the event saw the same runs). The limits are chosen so the same runs are stuck
for every contender: jobs_de 55m and sitemap 80m configured, jobs_fr 70m learned, the default 1h
for the fourth kind (live runs are at most 50 minutes old, stuck ones 1.5 to 5 hours). Medians
are printed as JSON, with each contender's ratio to the floor and every run's seconds.

The whole command (`stuck-runs check`, a new process, its output to a file) runs with the same
limits: COLUMN_MAP kind and progress, STUCK_AFTER_BY_KIND for jobs_de and sitemap, LEARN_THRESHOLDS
on with jobs_fr's 70m stored in `stuck_runs_thresholds` just before it starts (fresh, as the hourly
learning leaves it: the command reads the stored limits and does not learn). It judges by the real
clock, so every limit it is given is stretched by how long ago the bench's `now` was
(contenders.command), and it fails the same runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

from bench import contenders, data
from db.layout import Layout, parse_column_map
from jobs.learning import LearnSettings
from jobs.limits import LearnedLimit, Limits, limit_for
from jobs.runtime import Runtime
from jobs.settings import Settings, load_settings
from jobs.stuck import sweep_stuck_runs

TEMPLATE = "bench_tpl_limits"
KINDS = "ARRAY['jobs_de', 'jobs_fr', 'sitemap', 'other']"


def limits(now: datetime) -> Limits:
    return Limits(
        default=timedelta(hours=1),
        configured={"jobs_de": timedelta(minutes=55), "sitemap": timedelta(minutes=80)},
        learned={"jobs_fr": LearnedLimit(timedelta(minutes=70), 412, now)},
    )


# This scenario's own floor: contenders.FLOOR with each run judged by its kind's limit, SPEC §14's
# precedence applied by hand: the run's own max_runtime (none here: the table has no such column),
# else the kind's configured limit, else its learned one, else the default, as a CASE over the kinds
# with a limit of their own. One statement, one transaction; the index's prefilter (`started_at`
# before the smallest limit) is what anyone writing it would add. It reads no progress: with
# STALL_AFTER unset a run stalls only after standing still for its own limit, counted from a record
# made while it ran, so a stalled run is past its limit anyway and stuck (and no counter stood still
# here at all).
def kinds_floor_sql(kinds: list[str]) -> str:
    whens = " ".join(f"WHEN :kind_{i} THEN :limit_{i}" for i in range(len(kinds)))
    judged = f"started_at < :now - :smallest AND started_at < :now - CASE spider {whens} ELSE :default END"
    return contenders.FLOOR.replace("started_at < :cutoff", judged)


def kinds_floor(url: str, now: datetime) -> contenders.Timing:
    """The kinds floor: the same runs failed as ours, by the same limits, nothing else."""
    applied = limits(now)
    kinds = sorted({*applied.configured, *applied.learned})
    by_kind = {kind: limit_for(applied, kind).limit for kind in kinds}
    params = {
        **{f"kind_{i}": kind for i, kind in enumerate(kinds)},
        **{f"limit_{i}": by_kind[kind] for i, kind in enumerate(kinds)},
        "default": applied.default,
        "smallest": min([applied.default, *by_kind.values()]),
    }
    timing = contenders.floor(url, now, kinds_floor_sql(kinds), extra=params)
    return contenders.Timing("floor, kinds", timing.seconds, timing.failed, timing.backend_cpu)


def failed_ids(url: str) -> str:
    """Which runs a contender failed as stuck, as one digest of their ids (the same set, the same digest)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT count(*) || ':' || md5(string_agg(id::text, ',' ORDER BY id)) FROM scrape_runs"
                    " WHERE status = 'failed' AND failure_pattern = 'stuck'"
                )
            ).scalar_one()
    finally:
        engine.dispose()


def build(server_url: str, *, history: int, stuck: int, now: datetime) -> None:
    url = data.build_template(server_url, TEMPLATE, history=history, stuck=stuck, now=now)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN spider TEXT, ADD COLUMN items BIGINT")
        conn.execute(sa.text(f"UPDATE scrape_runs SET spider = ({KINDS})[1 + user_id % 4], items = results_count"))
        conn.execute(
            sa.text(
                "INSERT INTO stuck_runs_progress SELECT 'scrape_runs', id::text, items::text, :seen"
                " FROM scrape_runs WHERE status = 'running'"
            ),
            {"seen": now - timedelta(minutes=10)},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE scrape_runs")
        conn.exec_driver_sql("VACUUM ANALYZE stuck_runs_progress")
    engine.dispose()


def ours(url: str, now: datetime, *, roles: bool) -> contenders.Timing:
    logger.remove()
    layout = Layout(columns=parse_column_map("kind=spider,progress=items")) if roles else Layout()
    rt = Runtime.open(Settings(database_url=url, layout=layout), clock=contenders.FixedClock(now))
    try:
        with rt.engine.connect() as conn:  # the pool's one connection, which the sweep then takes
            pid = contenders.backend_pid(conn)
        cpu = contenders.backend_cpu(pid)
        started = time.perf_counter()
        result = sweep_stuck_runs(rt, limits=limits(now) if roles else None)
        name = "ours, kinds+learned+progress" if roles else "ours, STUCK_AFTER only"
        return contenders.Timing(name, time.perf_counter() - started, result.failed, contenders.cpu_spent(pid, cpu))
    finally:
        rt.close()


COMMAND_ENV = {"COLUMN_MAP": "kind=spider,progress=items", "LEARN_THRESHOLDS": "on", "SCRAPE_RUN_COMMAND": "true"}
STORE_LEARNED = """
INSERT INTO stuck_runs_thresholds (runs_table, kind, runs, p50, p95, p99, longest, "limit", learn_window,
                                   counted_from, counted_until, learned_with, computed_at)
SELECT :table, kind, CASE WHEN kind = 'jobs_fr' THEN 412 ELSE 0 END, NULL, NULL, NULL, NULL,
       CASE WHEN kind = 'jobs_fr' THEN :jobs_fr END, :window, :learned - :window, :learned, :learned_with, :learned
FROM unnest(CAST(:kinds AS text[])) AS kind
"""


def command(url: str, now: datetime, code: Path | None = None, out: str | None = None) -> contenders.Timing:
    """`stuck-runs check` with kinds, learned limits (stored, fresh) and progress on, as cron runs it."""
    late = datetime.now(now.tzinfo) - now
    settings = load_settings({"DATABASE_URL": url, **COMMAND_ENV})
    rt = Runtime.open(settings)
    try:
        with rt.engine.begin() as conn:
            conn.execute(
                sa.text(STORE_LEARNED),
                {
                    "table": rt.runs.canonical_name,
                    "kinds": ["jobs_de", "jobs_fr", "sitemap", "other"],
                    "jobs_fr": limits(now).learned["jobs_fr"].limit + late,
                    "window": settings.learn_window,
                    "learned": datetime.now(now.tzinfo),
                    "learned_with": LearnSettings.of(settings).fingerprint,
                },
            )
    finally:
        rt.close()
    configured = limits(now).configured.items()
    by_kind = ",".join(f"{kind}={(limit + late).total_seconds():.3f}s" for kind, limit in configured)
    env = {**COMMAND_ENV, "STUCK_AFTER_BY_KIND": by_kind}
    timing = contenders.command(url, now, env=env, code=code, out=out)
    return contenders.Timing("command, kinds+learned+progress", timing.seconds, timing.failed)


BEFORE_OURS = """
import json, os, sys
from datetime import datetime
from pathlib import Path
import bench.limits as checkout

def stat(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

spent = []
sweep = checkout.sweep_stuck_runs

def measured(rt, **kwargs):  # the sweep's backend CPU, as `ours` measures it here
    with rt.engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.commit()
    before = stat(pid)
    try:
        return sweep(rt, **kwargs)
    finally:
        spent.append(round(stat(pid) - before, 3))

checkout.sweep_stuck_runs = measured
timing = checkout.ours(sys.argv[1], datetime.fromisoformat(sys.argv[2]), roles=True)
print(json.dumps([timing.seconds, timing.failed, spent[0]]))
"""


def ours_elsewhere(url: str, now: datetime, code: Path) -> contenders.Timing:
    """`ours` with kinds+learned+progress as another checkout (`code`) runs it: in a process of its
    own, timed inside (the sweep alone, as `ours`), to compare two versions in one run."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    argv = [sys.executable, "-c", BEFORE_OURS, url, now.isoformat()]
    done = subprocess.run(argv, env=env, cwd=code, capture_output=True, text=True, check=True)
    seconds, failed, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return contenders.Timing("ours, before", seconds, failed, cpu)


def idle(server_url: str, rows: int, repeat: int) -> dict:
    """The idle sweep with kinds, own max_runtime, learned limits and progress on: its plan (a
    Seq Scan of scrape_runs or not) and its time, whole (`sweep_stuck_runs`, progress upkeep
    included) and the batch statement alone (EXPLAIN ANALYZE)."""
    now = data.bench_now()
    url = data.build_template(server_url, TEMPLATE, history=rows, stuck=0, now=now)
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # constant defaults: no rewrite of the history
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD COLUMN spider TEXT DEFAULT 'other', ADD COLUMN items BIGINT,"
            " ADD COLUMN budget INTERVAL"
        )
        conn.execute(
            sa.text(
                f"UPDATE scrape_runs SET spider = ({KINDS})[1 + user_id % 4], items = user_id,"
                " budget = CASE WHEN user_id % 7 = 0 THEN interval '2 hours' END WHERE status = 'running'"
            )
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE scrape_runs")
    engine.dispose()
    layout = Layout(columns=parse_column_map("kind=spider,max_runtime=budget,progress=items"))
    rt = Runtime.open(Settings(database_url=url, layout=layout), clock=contenders.FixedClock(now))
    logger.remove()
    try:
        sweep_stuck_runs(rt, limits=limits(now))  # the first records every running run's progress
        walls = []
        for _ in range(repeat):
            started = time.perf_counter()
            assert sweep_stuck_runs(rt, limits=limits(now)).failed == 0
            walls.append(time.perf_counter() - started)
        plan = _explain(rt, now)
    finally:
        rt.close()
        data.drop(server_url, TEMPLATE)
    execution = next(float(r.split(":")[1].split()[0]) for r in plan if r.startswith("Execution Time"))
    return {
        "rows": rows + data.LIVE_RUNS,
        "sweep_ms_median": round(1000 * statistics.median(walls), 3),
        "batch_query_ms": execution,
        "seq_scan_of_scrape_runs": any("Seq Scan on scrape_runs" in r for r in plan),
        "plan": plan,
    }


def _explain(rt: Runtime, now: datetime) -> list[str]:
    from db.arrays import ArrayLiteral
    from jobs.limits import runtime_judging_params
    from jobs.stuck import sweep_params

    compiled = rt.queries.stuck_batch.compile(dialect=rt.engine.dialect)
    arrays = {name for name, bind in compiled.binds.items() if isinstance(bind.type, ArrayLiteral)}
    params = {
        **compiled.params,
        **sweep_params(rt.settings.policy),
        **runtime_judging_params(rt, limits(now), now),
        "sr_cutoff": now - rt.settings.policy.stuck_after,
        "sr_limit": 1000,
    }
    params = {k: ArrayLiteral().process_bind_param(v, None) if k in arrays else v for k, v in params.items()}
    with rt.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {compiled}", params).scalars().all()
        conn.rollback()
    return list(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--stuck", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--idle", type=int, default=0, help="measure the idle sweep on this many rows instead")
    parser.add_argument("--no-command", action="store_true", help="leave out `stuck-runs check`")
    parser.add_argument("--no-plain", action="store_true", help="leave out the sweep without limits")
    parser.add_argument("--before", type=Path, help="a checkout of the code before: its sweep and command too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stuck-runs-bench-") as work:
        server_url, server = data.start_server(Path(work))
        try:
            if args.idle:
                print(json.dumps(idle(server_url, args.idle, max(args.repeat, 5)), indent=2))
                return
            now = data.bench_now()
            build(server_url, history=args.history, stuck=args.stuck, now=now)
            judge = now + timedelta(minutes=1)
            out = str(Path(work) / "check.out")  # the command's output, as a user's terminal or cron's mail gets it
            here = Path(__file__).resolve().parent.parent
            plan = {
                "floor": lambda url: contenders.floor(url, judge),
                "floor, kinds": lambda url: kinds_floor(url, judge),
            }
            if not args.no_plain:
                plan["ours, STUCK_AFTER only"] = lambda url: ours(url, judge, roles=False)
            if args.before:
                plan["ours, kinds+learned+progress, before"] = lambda url: ours_elsewhere(url, judge, args.before)
            plan["ours, kinds+learned+progress"] = lambda url: ours(url, judge, roles=True)
            if not args.no_command:
                if args.before:
                    plan["command, kinds+learned+progress, before"] = lambda url: command(url, judge, args.before, out)
                plan["command, kinds+learned+progress"] = lambda url: command(url, judge, here, out)
            rounds(server_url, plan, args)
            data.drop(server_url, TEMPLATE)
        finally:
            if server is not None:
                server.cleanup()


def rounds(server_url: str, plan: dict, args: argparse.Namespace) -> None:
    """Every contender once per round, in turn, each on a fresh copy; medians, each beside both
    floors, and which runs each failed (one digest of their ids: the same for all, or it says so)."""
    seconds: dict[str, list[float]] = {name: [] for name in plan}
    cpu: dict[str, list[float]] = {name: [] for name in plan}
    failed: dict[str, set[str]] = {name: set() for name in plan}
    loads = [os.getloadavg()]
    for _ in range(args.repeat):
        for name, run in plan.items():
            url, db = data.copy_of(server_url, TEMPLATE)
            try:
                timing = run(url)
                failed[name].add(failed_ids(url))
            finally:
                data.drop(server_url, db)
            seconds[name].append(timing.seconds)
            if timing.backend_cpu is not None:
                cpu[name].append(timing.backend_cpu)
            spent = "" if timing.backend_cpu is None else f"  (server CPU {timing.backend_cpu:.3f} s)"
            print(f"  {name:<42} {timing.seconds:7.3f} s  {timing.failed:,} failed{spent}", flush=True)
        loads.append(os.getloadavg())
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    digests = {digest for found in failed.values() for digest in found}
    print(
        json.dumps(
            {
                "history": args.history,
                "stuck": args.stuck,
                "repeat": args.repeat,
                "same_runs_failed_by_all": len(digests) == 1,
                "failed_ids": {name: sorted(found) for name, found in failed.items()},
                "median_seconds": {name: round(m, 3) for name, m in medians.items()},
                "ratio_to_kinds_floor": {name: round(m / medians["floor, kinds"], 2) for name, m in medians.items()},
                "ratio_to_plain_floor": {name: round(m / medians["floor"], 2) for name, m in medians.items()},
                "every_run_seconds": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
                # The server backend's CPU seconds (the command's is not read: another process's).
                "median_server_cpu_seconds": {name: round(statistics.median(c), 3) for name, c in cpu.items() if c},
                "every_run_server_cpu_seconds": {name: c for name, c in cpu.items() if c},
                "load_average_1_5_15_after_each_round": [[round(x, 2) for x in load] for load in loads],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
