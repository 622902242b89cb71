"""Start-up as an operator meets it: whole commands from a shell, output included.

`stuck-runs --help`, `--version` and `check` on an idle table (an index probe), each timed as a
child process, median of `repeat` runs; beside them what `python -X importtime` says the
imports cost. Run alone: `python -m bench.startup DATABASE_URL`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


if __name__ == "__main__":
    import json

    print(json.dumps(measure(sys.argv[1]), indent=2))
