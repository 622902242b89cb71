"""Retries handed to a real Scrapyd (SPEC §16), beside the same Scrapyd driven by a bare client,
with where the CPU goes: Scrapyd's, the hand-over process's and the machine's, per job.

    python -m bench.scrapyd [--retries 10000] [--cap 100] [--rounds 3]

The Scrapyd column of bench/handover.py (`python -m bench.handover --engines scrapyd`) is the
figure that counts; this one runs its floor and ours, interleaved, on one Scrapyd and adds the CPU
each side spent for a job (from /proc): Scrapyd is one Twisted thread on the same two cores as
everything else, so what a hand-over costs beside it is what it takes from Scrapyd.
"""

from __future__ import annotations

import argparse
import os
import resource
from collections.abc import Callable
from pathlib import Path

from bench import handover

TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process `pid` spent so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> float:
    """CPU seconds every core spent busy so far (all processes: other users' too)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICKS  # minus idle and iowait


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def scrapyd_pid() -> int:
    """The Scrapyd the bench started: this process's child running `-m scrapyd`."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat[1] == me and b"scrapyd" in command:
            return int(entry.name)
    raise SystemExit("the bench's Scrapyd was not found")


def costed(run: Callable[[], dict], pid: int) -> dict:
    """`run()`'s figures with the CPU milliseconds Scrapyd, this process and the machine spent a job."""
    before = process_cpu(pid), own_cpu(), machine_busy()
    figures = run()
    after = process_cpu(pid), own_cpu(), machine_busy()
    jobs = max(1, figures["handed"])
    spent = [round((b - a) * 1000 / jobs, 2) for a, b in zip(before, after)]
    return {**figures, "scrapyd_ms_a_job": spent[0], "handing_ms_a_job": spent[1], "machine_ms_a_job": spent[2]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scrapyd")
    parser.add_argument("--retries", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    handover.logger.remove()
    with handover.engines_on_a_server("stuck-runs-bench-scrapyd-", ["scrapyd"]) as (_, url, (engine,)):
        pid = scrapyd_pid()
        for _ in range(args.rounds):
            sides = {
                "floor": lambda: handover.floor(engine, args.retries, args.cap),
                "ours": lambda: handover.ours(engine, url, args.retries, args.cap),
            }
            for side, run in sides.items():
                figures = costed(run, pid)
                print(
                    f"{side:<5} {figures['per_second']:7.1f}/s  {figures['handed']:,} handed; CPU a job: "
                    f"Scrapyd {figures['scrapyd_ms_a_job']} ms, handing {figures['handing_ms_a_job']} ms, "
                    f"machine {figures['machine_ms_a_job']} ms"
                    + (f"; peak sessions {figures['peak_sessions']}" if "peak_sessions" in figures else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
