"""Start-up as an operator meets it: whole commands from a shell, output included.

`stuck-runs --help`, `--version` and `check` on an idle table (an index probe), each timed as a
child process, median of `repeat` runs; beside them what `python -X importtime` says the
imports cost. Run alone: `python -m bench.startup DATABASE_URL`.

`python -m bench.startup DATABASE_URL --before CHECKOUT [--repeat N]`: each command as this
checkout runs it and as CHECKOUT (another version's tree) does, alternating run by run, both
through `python -c "...main()"` with the tree on PYTHONPATH (what bench.contenders.command runs).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.contenders import compiled

COMMANDS = {"--help": ["--help"], "--version": ["--version"], "check (idle)": ["check"]}
# The module each command imports before it does its work.
IMPORTS = {"--help": "scheduler.cli", "check (idle)": "scheduler.cli.runs"}


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("stuck-runs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "scheduler"]


def _seconds(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def _import_ms(module: str) -> float:
    """Cumulative import time of `module` in a fresh interpreter, from -X importtime."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    )
    for line in result.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1000
    raise RuntimeError(f"no import time for {module}")


def measure(url: str, repeat: int = 7) -> dict:
    env = {**os.environ, "DATABASE_URL": url, "LOG_LEVEL": "WARNING"}
    script = console_script()
    figures = {}
    for name, args in COMMANDS.items():
        _seconds([*script, *args], env)  # warm the page cache
        times = sorted(_seconds([*script, *args], env) for _ in range(repeat))
        figures[name] = {"median_s": round(statistics.median(times), 3), "min_s": round(times[0], 3)}
        if name in IMPORTS:
            figures[name]["import_ms"] = round(_import_ms(IMPORTS[name]), 1)
    return {"repeat": repeat, "commands": figures}


RUN_MAIN = "import sys; from scheduler.cli import main; sys.exit(main())"


def _wall_and_cpu(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and the child's CPU seconds (user + system): on a shared machine the CPU a
    command spends moves far less with the load than its wall time does."""
    spent = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = _seconds(argv, env)
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (now.ru_utime - spent.ru_utime) + (now.ru_stime - spent.ru_stime)


def compare(url: str, before: Path, repeat: int = 7) -> dict:
    """Each command, this tree and `before` alternating, `repeat` runs each: medians of the wall
    time and of the process's CPU time, and the load."""
    here = Path(__file__).resolve().parent.parent
    trees = {"before": before.resolve(), "after": here}
    for tree in trees.values():
        compiled(tree)  # as installed: bytecode cached (bench.contenders.compiled says why)
    env = {"DATABASE_URL": url, "LOG_LEVEL": "WARNING"}
    figures: dict = {}
    loads = [os.getloadavg()]
    for name, args in COMMANDS.items():
        times: dict[str, list[tuple[float, float]]] = {side: [] for side in trees}
        for side, tree in trees.items():  # warm the page cache
            _seconds([sys.executable, "-c", RUN_MAIN, *args], {**os.environ, **env, "PYTHONPATH": str(tree)})
        for _ in range(repeat):
            for side, tree in trees.items():
                argv = [sys.executable, "-c", RUN_MAIN, *args]
                times[side].append(_wall_and_cpu(argv, {**os.environ, **env, "PYTHONPATH": str(tree)}))
        figures[name] = {
            f"{side}_{what}": round(statistics.median(t[i] for t in runs), 4)
            for side, runs in times.items()
            for i, what in enumerate(("wall_s", "cpu_s"))
        }
        figures[name]["every_run_wall_cpu"] = {
            side: [(round(w, 4), round(c, 4)) for w, c in t] for side, t in times.items()
        }
        loads.append(os.getloadavg())
    return {
        "repeat": repeat,
        "commands": figures,
        "load_average_after_each": [[round(x, 2) for x in la] for la in loads],
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--before", type=Path, help="another checkout: its commands alternate with this one's")
    parser.add_argument("--repeat", type=int, default=7)
    options = parser.parse_args()
    result = (
        compare(options.url, options.before, options.repeat) if options.before else measure(options.url, options.repeat)
    )
    print(json.dumps(result, indent=2))
