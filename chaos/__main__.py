"""`python -m chaos`: randomized trials with real processes; the auditor must find nothing.

    python -m chaos --trials 102 --seed 1 --quick   # writes RELIABILITY.md
    python -m chaos --trials 3 --quick              # a short run (CI): one trial of each kind

Each trial, on its own PostgreSQL (so it can be restarted) and a fresh database: three daemons
(replicas) with seconds-long intervals, a simulated scraper fleet starting, finishing, failing,
abandoning and late-completing runs, and a monkey that `kill -9`s daemons and `fix` scripts at
random moments and restarts the database. Trials take turns at how retries run: executed here by
a scraper that succeeds, fails (503, 404), hangs or writes its own status (`command`); POSTed to
a webhook receiver that runs them, which the monkey crashes and which answers 429s, 503s, 500s,
404s, resets and answers later than the daemons wait (`webhook`); or handed to two workers
polling the queued value, which the monkey kills mid-run (`handoff`); or scheduled on a real
Scrapyd whose spiders complete, fail, hang or die, which the monkey kills and restarts, while it
also stops daemons with SIGTERM mid-delivery (`scrapyd`, asked for with `--kinds scrapyd`). Then
the scrapers stop,
the daemons settle every chain, stop gracefully, and the auditor checks the invariants
(chaos/audit.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil
import sqlalchemy as sa

from chaos.audit import Disruptions, ScrapydSeen, audit, figures_lines
from chaos.fleets import WebhookFleet, WorkerFleet
from chaos.scrapyd import SCRAPYD_IN_FLIGHT, SCRAPYD_SETTLE_TIMEOUT, ScrapydFleet, append_report
from chaos.server import OwnServer
from db.engine import make_engine
from db.migrate import migrate

REPO = Path(__file__).resolve().parent.parent
TABLE = """CREATE TABLE scrape_runs (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), search_query TEXT NOT NULL,
 location_query TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'running', error_message TEXT, started_at TIMESTAMPTZ,
 completed_at TIMESTAMPTZ, config JSONB NOT NULL DEFAULT '{}', user_id INTEGER)"""
SETTINGS = {
    "STUCK_AFTER": "2s",
    "CHECK_INTERVAL": "1s",
    "PROCESS_INTERVAL": "1s",
    "DISPATCH_POLL": "0.3s",
    "RETRY_DELAY": "1s",
    "MAX_RETRIES": "3",
    "EXECUTION_TIMEOUT": "1.5s",
    "MAX_CONCURRENT_RETRIES": "3",
    "LOG_LEVEL": "WARNING",
}
SETTLE_TIMEOUT = 90.0
FLEET_CONCURRENCY = "6"  # a fleet takes more retries at once than one host runs
# Trial n runs its retries the n-th way: here (a command), by webhook, or by hand-off (SPEC §12);
# on Scrapyd (SPEC §16) when asked for: its spiders cost a second of CPU each.
KINDS = ("command", "webhook", "handoff", "scrapyd")
DEFAULT_KINDS = KINDS[:3]


@dataclass
class Trial:
    seed: int
    chaos_seconds: float
    kind: str = "command"  # how retries run: command (here); webhook, handoff (SPEC §12) or scrapyd (§16)
    events: list[str] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)  # pids the monkey sent kill -9
    restarts: list[tuple[float, float]] = field(default_factory=list)  # database down, wall clock
    violations: list[str] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    seconds: float = 0.0


class Processes:
    """The daemons and scripts of one trial."""

    def __init__(self, url: str, env: dict[str, str], work: Path) -> None:
        self.url, self.env, self.work = url, env, work
        self.daemons: list[subprocess.Popen | None] = [None, None, None]
        self.scripts: list[subprocess.Popen] = []

    def _spawn(self, *args: str) -> subprocess.Popen:
        log = open(self.work / "processes.log", "a")  # noqa: SIM115 - kept open for the child
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=self.env, stdout=log, stderr=log)

    def start_daemon(self, index: int) -> None:
        self.daemons[index] = self._spawn("-m", "scheduler", "daemon")

    def start_script(self) -> subprocess.Popen:
        script = self._spawn("scripts/fix_stuck_runs_with_retry.py")
        self.scripts.append(script)
        return script

    def stop_all(self) -> None:
        for proc in [*self.daemons, *self.scripts]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.daemons, *self.scripts]:
            if proc is not None:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def kill_leftover_scrapers(exec_log: Path) -> int:
    """Scrapers orphaned by a `kill -9` of their daemon go on; end them with the trial."""
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "chaos.executor" in " ".join(proc.info["cmdline"] or []) and proc.environ().get("CHAOS_EXEC_LOG") == str(
                exec_log
            ):
                proc.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return killed


def open_runs(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT count(*) FROM scrape_runs WHERE status IN ('running', 'pending_retry', 'pending')")
            ).scalar_one()
    except sa.exc.OperationalError:
        return -1
    finally:
        engine.dispose()


def run_trial(server: OwnServer, seed: int, chaos_seconds: float, work: Path, kind: str = "command") -> Trial:
    rng = random.Random(seed)
    trial = Trial(seed, chaos_seconds, kind)
    started = time.monotonic()
    name = f"chaos_{seed}"
    admin = sa.create_engine(server.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    url = sa.engine.make_url(server.url).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TABLE)
        # A crashed scraper host left runs stuck before the trial.
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, started_at)"
                " SELECT 'stuck ' || g, 'Belgium', now() - interval '1 hour' FROM generate_series(1, :n) g"
            ),
            {"n": rng.randint(2, 6) if kind == "scrapyd" else rng.randint(50, 400)},
        )
    migrate(engine, "scrape_runs")
    engine.dispose()

    trial_dir = work / name
    trial_dir.mkdir()
    exec_log, fleet_log, stop_file = trial_dir / "executions.log", trial_dir / "fleet.log", trial_dir / "stop"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": url,
        **SETTINGS,
        "BATCH_SIZE": str(rng.choice([5, 20, 100])),
        "CHAOS_EXEC_LOG": str(exec_log),
        "CHAOS_SEED": str(seed),
    }
    fleet: WebhookFleet | WorkerFleet | ScrapydFleet | None = None
    if kind == "webhook":
        fleet = WebhookFleet(url, trial_dir, rng, env)
    elif kind == "handoff":
        fleet = WorkerFleet(url, trial_dir, seed, env)
    elif kind == "scrapyd":
        fleet = ScrapydFleet(url, trial_dir, env)
    if fleet is None:
        env["SCRAPE_RUN_COMMAND"] = f"{sys.executable} -m chaos.executor {{run_id}}"
    else:
        env.update(fleet.settings, MAX_CONCURRENT_RETRIES=FLEET_CONCURRENCY)
    procs = Processes(url, env, trial_dir)
    for index in range(3):
        procs.start_daemon(index)
    scrapers = subprocess.Popen(
        [sys.executable, "-m", "chaos.fleet", url, str(seed), str(stop_file), str(fleet_log)]
        + ([str(SCRAPYD_IN_FLIGHT)] if kind == "scrapyd" else []),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    restarts_left = rng.choice([0, 1, 1, 2])
    deadline = time.monotonic() + chaos_seconds
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 1.5))
        actions = {"kill_daemon": 30, "script": 20, "kill_script": 15, "restart_db": 5, "nothing": 30}
        if fleet is not None:
            actions["crash_fleet"] = 15
        if kind == "scrapyd":  # a daemon stopped with schedule.json calls in flight (SPEC §16)
            actions["term_daemon"] = 15
        action = rng.choices(list(actions), list(actions.values()))[0]
        if action == "kill_daemon":
            index = rng.randrange(3)
            proc = procs.daemons[index]
            if proc is not None and proc.poll() is None:
                trial.killed.add(proc.pid)
                proc.kill()
                proc.wait()
                trial.events.append("kill -9 daemon")
            time.sleep(rng.uniform(0, 1))
            procs.start_daemon(index)
        elif action == "term_daemon":
            index = rng.randrange(3)
            proc = procs.daemons[index]
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
                trial.events.append("SIGTERM daemon")
            procs.start_daemon(index)
        elif action == "script":
            procs.start_script()
            trial.events.append("fix script")
        elif action == "kill_script":
            script = procs.start_script()
            time.sleep(rng.uniform(0.2, 1.5))
            if script.poll() is None:
                trial.killed.add(script.pid)
                script.kill()
                script.wait()
                trial.events.append("kill -9 fix script")
        elif action == "crash_fleet" and fleet is not None:
            trial.events.append(fleet.crash(rng))
        elif action == "restart_db" and restarts_left:
            restarts_left -= 1
            stopped = time.time()
            server.stop()
            time.sleep(rng.uniform(0.5, 2.0))
            server.start()
            trial.restarts.append((stopped, time.time()))
            trial.events.append("database restart")
    stop_file.touch()
    scrapers.wait(60)
    if fleet is not None:
        fleet.settle()
    for index, proc in enumerate(procs.daemons):  # every replica up for the settling
        if proc is None or proc.poll() is not None:
            procs.start_daemon(index)
    settle_deadline = time.monotonic() + (SCRAPYD_SETTLE_TIMEOUT if kind == "scrapyd" else SETTLE_TIMEOUT)
    while open_runs(url) != 0 and time.monotonic() < settle_deadline:
        if fleet is not None:
            fleet.tend()
        time.sleep(0.5)
    procs.stop_all()
    kill_leftover_scrapers(exec_log)
    if fleet is not None:
        fleet.stop()
    seen = None
    if isinstance(fleet, ScrapydFleet):
        seen = ScrapydSeen(fleet.spider_log, tuple(fleet.sightings))
    result = audit(
        url,
        fleet_log,
        exec_log,
        receiver_log=fleet.log if isinstance(fleet, WebhookFleet) else None,
        worker_logs=fleet.logs if isinstance(fleet, WorkerFleet) else (),
        disruptions=Disruptions(frozenset(trial.killed), tuple(trial.restarts)),
        scrapyd=seen,
    )
    trial.violations, trial.totals = result.violations, result.totals
    trial.seconds = round(time.monotonic() - started, 1)
    if not trial.violations:
        admin = sa.create_engine(server.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()
    return trial


def write_report(trials: list[Trial], seed: int, quick: bool, path: Path) -> None:
    from collections import Counter

    events = Counter(e for t in trials for e in t.events)
    totals = Counter()
    for t in trials:
        totals.update({k: v for k, v in t.totals.items() if isinstance(v, int)})
    violations = [(t.seed, v) for t in trials for v in t.violations]
    lines = [
        "# Reliability",
        "",
        "Reproduce with one command:",
        "",
        "```sh",
        f".venv/bin/python -m chaos --trials {len(trials)} --seed {seed}" + (" --quick" if quick else ""),
        "```",
        "",
        f"**{len(trials)} trials, {len(violations)} violations** "
        f"({datetime.now(timezone.utc):%Y-%m-%d}, {sum(t.seconds for t in trials):.0f} s in all).",
        "",
        "## A trial",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in SETTINGS.items()) + ", `BATCH_SIZE` 5, 20 or 100; "
        f"webhook and hand-off trials: `MAX_CONCURRENT_RETRIES={FLEET_CONCURRENCY}`, `WEBHOOK_TIMEOUT=1s`.",
        "",
        "## What the auditor checks after every trial",
        "",
        "- no run the scraper completed was turned into anything else (the fleet logs every",
        "  completion it committed; a completion a scraper wrote during an execution stands too);",
        "- no retry was executed twice (the executed scraper logs every start);",
        "- every failed attempt stuck-runs scheduled a retry for has exactly one retry row, every",
        "  retry row was scheduled by its predecessor, and no chain has two retries with one number;",
        "- every chain stuck-runs ended spent its budget or hit a permanent error, and has its dead letter;",
        "- every cancelled (superseded) retry belongs to a chain that completed;",
        "- nothing is left `running`, `pending_retry` or queued (`pending`) once the daemons settle;",
        "- the counts add up: as many retry rows as retries scheduled;",
        "- webhook trials: no retry the receiver took (a 2xx that went out in full within the daemons'",
        "  timeout: the receiver logs each answer once sent) was delivered again unless that delivery's",
        "  process was killed or the database restarted before its confirm (only a lease that ran out",
        "  redelivers, with the same `Idempotency-Key`); no retry was delivered twice at once (by two",
        "  daemons, or to two receivers behind one URL) unless the first delivery's process was killed",
        "  (its pid is in the User-Agent) or the database restarted under it; every delivery the receiver",
        "  acknowledged with a 2xx ended (completed, failed or cancelled; failed by the stuck checker",
        "  counts); no outcome the receiver's fleet wrote was overwritten; no running retry is",
        "  still being delivered once the daemons settle (postponed retries are made due at settling:",
        "  their backoff is minutes; a mark left on a row the fleet ended is inert);",
        "- hand-off trials: no retry was taken by two workers, every retry a worker took ended, and no",
        "  completion a worker wrote was overwritten.",
        "",
        "## What the trials did",
        "",
        "| | count |",
        "| --- | ---: |",
    ]
    kinds = Counter(t.kind for t in trials)
    lines.append(f"| trials: {', '.join(f'{kind} {n}' for kind, n in sorted(kinds.items()))} | {len(trials):,} |")
    keys = (
        "runs",
        "stuck_failed",
        "retries",
        "executions",
        "handed_off",
        "deliveries",
        "acknowledged",
        "worker_claims",
        "completed",
        "fleet_completions",
        "superseded",
        "dead_letters",
    )
    lines += figures_lines(keys, totals, events, violations, "## Violations")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="shorter chaos per trial")
    parser.add_argument(
        "--kinds", default=",".join(DEFAULT_KINDS), help=f"how retries run, in turns: some of {', '.join(KINDS)}"
    )
    parser.add_argument(
        "--append", action="store_true", help="append the trials as a section of the report, not rewrite it"
    )
    parser.add_argument("--out", default=str(REPO / "RELIABILITY.md"), help="the report ('-': none)")
    args = parser.parse_args()
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds: use some of {', '.join(KINDS)}")
    work = Path(tempfile.mkdtemp(prefix="stuck-runs-chaos-"))
    server = OwnServer(work)
    trials = []
    try:
        for number in range(args.trials):
            seed = args.seed * 1000 + number
            trial = run_trial(server, seed, 6.0 if args.quick else 15.0, work, kinds[number % len(kinds)])
            trials.append(trial)
            print(
                json.dumps(
                    {
                        "seed": seed,
                        "kind": trial.kind,
                        "seconds": trial.seconds,
                        "events": len(trial.events),
                        "event_counts": dict(Counter(trial.events)),
                        "violations": trial.violations,
                        **trial.totals,
                    },
                    default=str,
                ),
                flush=True,
            )
    finally:
        server.cleanup()
    if args.out != "-" and args.append:
        append_report(trials, sys.argv[1:], Path(args.out))
    elif args.out != "-":
        write_report(trials, args.seed, args.quick, Path(args.out))
    sys.exit(1 if any(t.violations for t in trials) else 0)


if __name__ == "__main__":
    main()
