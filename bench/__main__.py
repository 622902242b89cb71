"""`python -m bench`: every benchmark in one run, written to BENCHMARKS.md.

    python -m bench                 # the full run: 1M and 10M rows, K = 1k, 10k, 100k
    python -m bench --quick         # small sizes, for CI and for a first look

On the embedded PostgreSQL by default, or on the server of DATABASE_URL (a role that may
create databases). Wall-clock figures on a shared machine only mean something as ratios
measured in one run, which is what the tables report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

from bench import anatomy, claims, contenders, data, startup
from bench.contenders import FixedClock
from jobs.limits import runtime_judging_params
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.stuck import sweep_stuck_runs

REPO = Path(__file__).resolve().parent.parent
FULL = {
    "repeat": 5,
    "anatomy_repeat": 5,
    "sweep_history": 1_000_000,
    "stuck": [1_000, 10_000, 100_000],
    "row_by_row_up_to": 10_000,
    "idle_sizes": [1_000_000, 10_000_000],
    "claim_retries": 2_000,
    "claim_processes": [1, 4, 8],
    "footprint_minutes": 2.0,
}
QUICK = {
    "repeat": 1,
    "anatomy_repeat": 1,
    "sweep_history": 20_000,
    "stuck": [200, 1_000],
    "row_by_row_up_to": 1_000,
    "idle_sizes": [20_000, 100_000],
    "claim_retries": 300,
    "claim_processes": [1, 4],
    "footprint_minutes": 0.0,
}


def sweeps(server_url: str, config: dict, log: Path) -> list[dict]:
    """K stuck runs in a table of `sweep_history` finished runs: ours, the floor, row by row.

    Each contender runs `repeat` times, the contenders interleaved, each time on a fresh copy;
    the median is reported, so a noisy moment on the machine does not decide a ratio.
    """
    results = []
    for stuck in config["stuck"]:
        now = data.bench_now()
        template = f"bench_tpl_sweep_{stuck}"
        data.build_template(server_url, template, history=config["sweep_history"], stuck=stuck, now=now)
        judge = now + timedelta(minutes=1)
        plan = [
            ("floor", contenders.floor),
            ("ours", contenders.ours),
            ("ours+logs", lambda url, at: contenders.ours(url, at, log_to=str(log))),
            ("command", lambda url, at: contenders.command(url, at, out=str(log.with_suffix(".out")))),
        ]
        if stuck <= config["row_by_row_up_to"]:
            plan.append(("row_by_row", contenders.row_by_row))
            plan.append(("row_by_row_script", contenders.row_by_row_script))
        times: dict[str, list[float]] = {name: [] for name, _ in plan}
        signatures = {}
        for _ in range(config["repeat"]):
            for name, contender in plan:
                if name.startswith("row_by_row") and times[name]:
                    continue  # once is enough to be slow
                url, db = data.copy_of(server_url, template)
                try:
                    timing = contender(url, judge)
                    whole = name in ("command", "row_by_row_script")
                    signature = contenders.outcome_counts if whole else contenders.outcome_signature
                    signatures[name] = signature(url)
                finally:
                    data.drop(server_url, db)
                times[name].append(timing.seconds)
                print(f"  K={stuck:>7}: {name:<11} {timing.seconds:8.3f}s  failed={timing.failed}", flush=True)
        data.drop(server_url, template)
        runs = {name: statistics.median(values) for name, values in times.items()}
        results.append(
            {
                "stuck": stuck,
                "seconds": {k: round(v, 4) for k, v in runs.items()},
                "all_seconds": {k: [round(v, 4) for v in values] for k, values in times.items()},
                "ours_over_floor": round(runs["ours"] / runs["floor"], 2),
                "ours_with_logs_over_floor": round(runs["ours+logs"] / runs["floor"], 2),
                "command_over_floor": round(runs["command"] / runs["floor"], 2),
                "row_by_row_over_ours": round(runs["row_by_row"] / runs["ours"], 1) if "row_by_row" in runs else None,
                "row_by_row_over_command": (
                    round(runs["row_by_row_script"] / runs["command"], 1) if "row_by_row_script" in runs else None
                ),
                "same_outcome": len({v for k, v in signatures.items() if len(v) == 3}) == 1
                and all(v == signatures["ours"][:2] for v in signatures.values() if len(v) == 2),
                "outcome": list(signatures["ours"][:2]),
            }
        )
    return results


def idle(server_url: str, config: dict, repeat: int = 30) -> list[dict]:
    """The sweep with nothing stuck: its time, its plan, and how it grows with the table."""
    results = []
    for size in config["idle_sizes"]:
        now = data.bench_now()
        template = f"bench_tpl_idle_{size}"
        print(f"  building {size:,} rows…", flush=True)
        started = time.perf_counter()
        data.build_template(server_url, template, history=size, stuck=0, now=now)
        built = time.perf_counter() - started
        url, db = data.copy_of(server_url, template)
        try:
            logger.remove()
            rt = Runtime.open(Settings(database_url=url), clock=FixedClock(now + timedelta(minutes=1)))
            sweep_stuck_runs(rt)  # warm the cache, as a daemon's hourly sweep would find it
            walls = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                result = sweep_stuck_runs(rt)
                walls.append(time.perf_counter() - t0)
                assert result.failed == 0
            plan, execution_ms = explain(rt, now + timedelta(minutes=1))
            rt.close()
        finally:
            data.drop(server_url, db)
            data.drop(server_url, template)
        results.append(
            {
                "rows": size + data.LIVE_RUNS,
                "build_seconds": round(built, 1),
                "sweep_ms_median": round(1000 * statistics.median(walls), 3),
                "batch_query_ms": execution_ms,
                "seq_scan_of_scrape_runs": "Seq Scan on scrape_runs" in plan,
                "plan": plan,
            }
        )
        print(
            f"  idle {size:>10,} rows: sweep {results[-1]['sweep_ms_median']} ms, query {execution_ms} ms", flush=True
        )
    return results


def explain(rt: Runtime, now) -> tuple[str, float]:
    statement = rt.queries.stuck_batch.compile(dialect=rt.engine.dialect)
    judging = runtime_judging_params(rt, now=now)  # SPEC §14's limits, as the sweep binds them
    params = {**statement.params, **judging, "sr_cutoff": now - rt.settings.policy.stuck_after, "sr_limit": 1000}
    with rt.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {statement}", params).scalars().all()
        conn.rollback()
    execution = next(float(r.split(":")[1].split()[0]) for r in rows if r.startswith("Execution Time"))
    return "\n".join(rows), execution


def claim_throughput(server_url: str, config: dict, work: Path) -> list[dict]:
    results = []
    template = "bench_tpl_claims"
    data.build_template(server_url, template, history=100_000, stuck=0, now=data.bench_now())
    for processes in config["claim_processes"]:
        url, db = data.copy_of(server_url, template)
        try:
            claims.seed_pending(url, config["claim_retries"])
            result = claims.measure(url, processes, work)
        finally:
            data.drop(server_url, db)
        results.append(result)
        print(f"  claims with {processes} process(es): {result}", flush=True)
    data.drop(server_url, template)
    return results


def footprint(server_url: str, minutes: float) -> dict | None:
    if not minutes:
        return None
    from bench.footprint import measure

    now = data.bench_now()
    template = "bench_tpl_footprint"
    url = data.build_template(server_url, template, history=10_000, stuck=0, now=now)
    try:
        return measure(url.replace("postgresql+psycopg2://", "postgresql://", 1), minutes)
    finally:
        data.drop(server_url, template)


def startup_of_commands(server_url: str, config: dict) -> dict:
    """`--help`, `--version` and an idle `check` as a shell runs them, on the smallest idle table."""
    template = "bench_tpl_startup"
    data.build_template(server_url, template, history=config["idle_sizes"][0], stuck=0, now=data.bench_now())
    url, db = data.copy_of(server_url, template)
    try:
        return startup.measure(url)
    finally:
        data.drop(server_url, db)
        data.drop(server_url, template)


def machine(server_url: str) -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory_kib = int(
        next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    )
    engine = sa.create_engine(server_url)
    with engine.connect() as conn:
        server = conn.exec_driver_sql("SELECT version()").scalar_one().split(" on ")[0]
    engine.dispose()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgresql": server,
    }


def only_adopted(config: dict, out: str | None) -> None:
    """The adopted-table comparison alone, saved as {"adopted": ...} for `--report-from`."""
    from bench import adopted

    work = Path(tempfile.mkdtemp(prefix="stuck-runs-bench-"))
    server_url, server = data.start_server(work)
    try:
        print("the sweep on an adopted table beside the default one", flush=True)
        figures = adopted.compare(
            server_url, history=config["sweep_history"], stuck=config["stuck"][-1], repeat=config["repeat"]
        )
    finally:
        if server is not None:
            server.cleanup()
    figures["when"] = time.strftime("%Y-%m-%d")
    print(json.dumps({k: v for k, v in figures.items() if k != "all_seconds"}, indent=2))
    if out:
        Path(out).write_text(json.dumps({"adopted": figures}, indent=2))


def only_sweeps(config: dict, out: str | None) -> None:
    """The stuck sweeps and start-up alone (floor, command, in-process, row by row), saved as
    {"sweeps": ..., "startup": ...} for `--report-from` over a full run's figures."""
    work = Path(tempfile.mkdtemp(prefix="stuck-runs-bench-"))
    server_url, server = data.start_server(work)
    try:
        figures = {"sweeps": sweeps(server_url, config, work / "sweep.log")}
        figures["startup"] = startup_of_commands(server_url, config)
        figures["remeasured"] = (
            f"the stuck sweeps and start-up re-measured on {time.strftime('%Y-%m-%d')} (`--only sweeps`)"
        )
    finally:
        if server is not None:
            server.cleanup()
    print(json.dumps(figures, indent=2, default=str))
    if out:
        Path(out).write_text(json.dumps(figures, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="where to write the report ('-': nowhere)")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument(
        "--report-from", nargs="+", help="only write the report, from figures saved with --json (merged in order)"
    )
    parser.add_argument(
        "--only", choices=["adopted", "sweeps"], help="run one benchmark, print and save its figures (--json)"
    )
    args = parser.parse_args()
    if args.report_from:
        from bench.report import write

        merged: dict = {}
        for source in args.report_from:
            merged.update(json.loads(Path(source).read_text()))
        write(merged, Path(args.out))
        return
    if args.only == "adopted":
        only_adopted(QUICK if args.quick else FULL, args.json)
        return
    if args.only == "sweeps":
        only_sweeps(QUICK if args.quick else FULL, args.json)
        return
    config = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="stuck-runs-bench-"))
    server_url, server = data.start_server(work)
    try:
        started = time.perf_counter()
        report = {"config": config, "quick": args.quick, "machine": machine(server_url)}
        print("stuck sweeps", flush=True)
        report["sweeps"] = sweeps(server_url, config, work / "sweep.log")
        print("the sweep beside the floor, guarantee by guarantee", flush=True)
        report["anatomy"] = anatomy.measure(
            server_url, history=config["sweep_history"], stuck=config["stuck"][-1], repeat=config["anatomy_repeat"]
        )
        print("idle sweeps", flush=True)
        report["idle"] = idle(server_url, config)
        sizes = report["idle"]
        report["idle_ratio_largest_over_smallest"] = round(
            sizes[-1]["sweep_ms_median"] / sizes[0]["sweep_ms_median"], 2
        )
        print("claims", flush=True)
        report["claims"] = claim_throughput(server_url, config, work)
        print("footprint", flush=True)
        report["footprint"] = footprint(server_url, config["footprint_minutes"])
        print("start-up of whole commands", flush=True)
        report["startup"] = startup_of_commands(server_url, config)
        report["seconds"] = round(time.perf_counter() - started)
    finally:
        if server is not None:
            server.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if args.out != "-":
        from bench.report import write

        write(report, Path(args.out))
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
