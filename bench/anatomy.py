"""Where the sweep's time goes beyond the SQL floor: the floor with each guarantee added in turn.

    python -m bench.anatomy                 # K = 100,000 stuck runs in a 1M-row table (python -m bench runs it)
    python -m bench.anatomy --stuck 10000 --history 200000 --repeat 3

The floor (bench/contenders.py) fails the stuck runs and inserts their retries in one statement,
and nothing more. The real sweep must also claim its rows with `FOR UPDATE SKIP LOCKED` (a scraper
or another sweep may hold one), tolerate a retry that already exists (`ON CONFLICT DO NOTHING`,
so one odd row cannot wedge every sweep), commit every BATCH_SIZE rows, and report each run.
Each variant runs `repeat` times, interleaved, on its own copy of one template; medians are
printed as JSON, with each variant's ratio to the floor.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
from datetime import timedelta
from pathlib import Path

from bench import contenders, data

BATCH_SIZES = (250, 1000, 5000, 20000)  # the default, and around it: commits against lock time

LOCKED = """
WITH stuck AS MATERIALIZED (
    SELECT ctid FROM scrape_runs WHERE status = 'running' AND started_at < :cutoff
    ORDER BY started_at FOR UPDATE SKIP LOCKED
),"""


def variants() -> dict[str, str]:
    """The floor's SQL with the sweep's guarantees added one at a time."""
    floor = contenders.FLOOR
    locked = floor.replace(
        "WHERE status = 'running' AND started_at < :cutoff",
        "WHERE ctid = ANY (array(SELECT ctid FROM stuck)) AND status = 'running'",
    ).replace("WITH", LOCKED, 1)
    assert locked != floor and "FOR UPDATE SKIP LOCKED" in locked
    conflict = " ON CONFLICT DO NOTHING"
    return {
        "floor": floor,
        "+ on conflict": floor + conflict,
        "+ skip locked": locked,
        "+ both": locked + conflict,
    }


def measure(server_url: str, *, history: int, stuck: int, repeat: int) -> dict:
    now = data.bench_now()
    judge = now + timedelta(minutes=1)
    data.build_template(server_url, "bench_tpl_anatomy", history=history, stuck=stuck, now=now)
    plan = {name: functools.partial(contenders.floor, now=judge, sql=sql) for name, sql in variants().items()}
    plan["ours, one batch"] = functools.partial(contenders.ours, now=judge, batch_size=stuck)
    for size in BATCH_SIZES:
        plan[f"ours, BATCH_SIZE {size}"] = functools.partial(contenders.ours, now=judge, batch_size=size)
    seconds: dict[str, list[float]] = {name: [] for name in plan}
    try:
        for _ in range(repeat):
            for name, contender in plan.items():
                url, db = data.copy_of(server_url, "bench_tpl_anatomy")
                try:
                    timing = contender(url)
                finally:
                    data.drop(server_url, db)
                if timing.failed != stuck:
                    raise SystemExit(
                        f"{name} handled {timing.failed} runs, not {stuck}: the variants are not comparable"
                    )
                seconds[name].append(timing.seconds)
                print(f"  {name:<22} {timing.seconds:7.3f}s", flush=True)
    finally:
        data.drop(server_url, "bench_tpl_anatomy")
    floor = statistics.median(seconds["floor"])
    batches = {"ours, one batch": 1} | {f"ours, BATCH_SIZE {n}": -(-stuck // n) for n in BATCH_SIZES}
    return {
        "history": history,
        "stuck": stuck,
        "repeat": repeat,
        "variants": [
            {
                "name": name,
                "median_s": round(statistics.median(values), 3),
                "over_floor": round(statistics.median(values) / floor, 2),
                "all_s": [round(value, 3) for value in values],
                # How long one transaction holds its runs locked (a scraper finishing one waits).
                "ms_per_batch": round(1000 * statistics.median(values) / batches[name]) if name in batches else None,
            }
            for name, values in seconds.items()
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--stuck", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stuck-runs-anatomy-") as work:
        server_url, server = data.start_server(Path(work))
        try:
            result = measure(server_url, history=args.history, stuck=args.stuck, repeat=args.repeat)
        finally:
            if server is not None:
                server.cleanup()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
