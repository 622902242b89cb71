"""Entry points for the real processes race tests start: `python -m tests.procs <role> ...`."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import sqlalchemy as sa


def wait_for(path: str | None) -> None:
    """A start line: every process begins when the file appears."""
    while path and not Path(path).exists():
        time.sleep(0.01)


def ready(path: str | None) -> None:
    """Says this process is at the start line: imports done, runtime open."""
    if path:
        Path(path).touch()


def at_start(argv: list[str]) -> None:
    """`stuck-runs ARGS` through the console script's entry, once the start file appears; READY is
    touched when the imports are done: `python -m tests.procs at_start START READY ARGS...`."""
    start, ready_file, *args = argv
    import scheduler.cli
    from jobs.runtime import Runtime  # noqa: F401 - what the command would import after the start

    scheduler.cli.cli.get_command(None, args[0])  # the command's module
    ready(ready_file)
    wait_for(start)
    scheduler.cli.main(args)


def sweeper(args: argparse.Namespace) -> None:
    from datetime import timedelta

    from jobs.rules import RetryPolicy
    from jobs.stuck import sweep_stuck_runs
    from tests.helpers import make_runtime

    rt = make_runtime(args.url, batch_size=args.batch)
    ready(args.ready)
    wait_for(args.start)
    failed = 0
    for _ in range(args.rounds):
        result = sweep_stuck_runs(rt, RetryPolicy(stuck_after=timedelta(hours=1)), use_lock=not args.no_lock)
        failed += result.failed
    print(json.dumps({"failed": failed}))


def scraper(args: argparse.Namespace) -> None:
    """Completes the given runs one by one, unconditionally, as a scraper finishing late would."""
    engine = sa.create_engine(args.url)
    ids = json.loads(Path(args.ids).read_text())
    random.Random(args.seed).shuffle(ids)
    ready(args.ready)
    wait_for(args.start)
    completed = []
    with engine.connect() as conn:
        for run_id in ids:
            done = conn.execute(
                sa.text(
                    "UPDATE scrape_runs SET status = 'completed', completed_at = now() WHERE id = :id RETURNING id"
                ),
                {"id": run_id},
            ).scalar()
            conn.commit()
            if done:
                completed.append(str(done))
    print(json.dumps({"completed": completed}))


def claim_and_die(args: argparse.Namespace) -> None:
    """Claims a due retry and is killed (SIGKILL) where its scraper would start."""
    import os
    import signal

    from jobs.retries import process_due_retries
    from tests.helpers import ScriptedScraper, make_runtime

    class DiesAtStart(ScriptedScraper):
        def start(self, run):
            os.kill(os.getpid(), signal.SIGKILL)

        def execute(self, run, timeout, cancel):  # where the start happened before claims waited for it
            os.kill(os.getpid(), signal.SIGKILL)

    process_due_retries(make_runtime(args.url, DiesAtStart()))


def main() -> None:
    if sys.argv[1:2] == ["at_start"]:
        return at_start(sys.argv[2:])
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["sweeper", "scraper", "claim_and_die"])
    parser.add_argument("url")
    parser.add_argument("--start")
    parser.add_argument("--ready", help="a file to touch once at the start line")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-lock", action="store_true")
    parser.add_argument("--ids")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"sweeper": sweeper, "scraper": scraper, "claim_and_die": claim_and_die}[args.role](args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
