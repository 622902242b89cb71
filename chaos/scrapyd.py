"""The Scrapyd fleet of a chaos trial (SPEC §16): a real Scrapyd on loopback (tests/scrapyd_fleet.py
starts it) with the trials' own tiny project deployed (chaos/scrapyd_project: a spider whose fate,
seeded by the trial and the job, is to complete, fail, complete slowly, hang or die), which the
monkey `kill -9`s and restarts on the same port mid-trial.

What Scrapyd reports is watched the whole trial: a thread reads `listjobs.json` every few tenths
of a second, each answer kept with the Scrapyd lifetime it came from (`Sighting`); the auditor
(chaos/audit.py `check_scrapyd`) reads them with the spiders' own log.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import sqlalchemy as sa

from chaos.audit import figures_lines
from chaos.fleets import postponed_due_now
from tests.scrapyd_fleet import PROJECT, Scrapyd, project_egg, start_scrapyd

PROJECT_DIR = Path(__file__).parent / "scrapyd_project"
SPIDER = "fates"
MAX_PROC = 6  # spider processes at once: each costs a second of CPU to start
HANG_SECONDS = "25"  # a hung spider's sleep: past STUCK_AFTER, so the stuck checker fails its row
# Beyond the trials' settings: a spider needs seconds to start on a loaded machine (a CPU second
# each), and a chain of stuck-failed attempts lasts STUCK_AFTER times its retries.
TRIAL_SETTINGS = {"STUCK_AFTER": "12s", "MAX_RETRIES": "2"}
SCRAPYD_IN_FLIGHT = 6  # runs the simulated scraper fleet keeps going at once (30 in other trials)
# A retry whose schedule.json went unanswered (Scrapyd killed, or slow to list its spiders) waits
# out its delivery's lease: 65 s (a 35 s bound and a 30 s margin).
SCRAPYD_SETTLE_TIMEOUT = 200.0
WATCH_EVERY = 0.25


@dataclass(frozen=True)
class Sighting:
    """One job in one `listjobs.json` answer: when, in which Scrapyd lifetime, in which state."""

    at: float  # wall clock
    lifetime: int  # 0 for the first Scrapyd process, 1 after its first restart...
    job: str
    state: str  # pending, running or finished
    listed: int  # how many times this answer listed the job (twice: scheduled twice)


class ScrapydFleet:
    def __init__(self, url: str, work: Path, env: dict[str, str]) -> None:
        self.url, self.work = url, work
        self.spider_log = work / "spiders.log"
        spider_db = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        spider_env = {**env, "CHAOS_SPIDER_LOG": str(self.spider_log), "CHAOS_SPIDER_DB": spider_db}
        spider_env["CHAOS_HANG"] = HANG_SECONDS
        self.scrapyd: Scrapyd = start_scrapyd(
            work / "scrapyd",
            poll_interval=0.2,
            max_proc=MAX_PROC,
            egg=project_egg(PROJECT_DIR, "chaos_spiders"),
            env=spider_env,
            finished_to_keep=100_000,  # every job of one lifetime stays listed: the auditor reads them
            start_timeout=180.0,  # a Python process can take a minute to start on a loaded machine
        )
        self.lifetime = 0
        self.restarts: list[float] = []  # wall clock of each kill -9 of Scrapyd
        self.sightings: list[Sighting] = []
        self._watching = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    @property
    def settings(self) -> dict[str, str]:
        return {
            "SCRAPYD_URL": self.scrapyd.url,
            "SCRAPYD_PROJECT": PROJECT,
            "SCRAPYD_SPIDER": SPIDER,
            **TRIAL_SETTINGS,
        }

    def _watch(self) -> None:
        client = httpx.Client(timeout=2, trust_env=False)
        try:
            while not self._watching.wait(WATCH_EVERY):
                self.observe(client)
        finally:
            client.close()

    def observe(self, client: httpx.Client) -> None:
        lifetime = self.lifetime
        try:
            answer = client.get(f"{self.scrapyd.url}/listjobs.json", params={"project": PROJECT}).json()
        except (httpx.HTTPError, ValueError):
            return  # Scrapyd is down (the monkey) or starting
        if lifetime != self.lifetime:
            return  # restarted while asked: which lifetime answered is unknown
        now = time.time()
        listed: dict[str, int] = {}
        for state in ("pending", "running", "finished"):
            for job in answer.get(state) or ():
                listed[str(job["id"])] = listed.get(str(job["id"]), 0) + 1
        for state in ("pending", "running", "finished"):
            for job in answer.get(state) or ():
                self.sightings.append(Sighting(now, lifetime, str(job["id"]), state, listed[str(job["id"])]))

    def crash(self, rng: random.Random) -> str:
        self.restarts.append(time.time())
        self.lifetime += 1
        self.scrapyd.kill()  # its running spiders go on, orphaned, as under a real crash
        time.sleep(rng.uniform(0.2, 1.5))
        self.scrapyd.start()
        return "kill -9 Scrapyd"

    def settle(self) -> None:
        """What Scrapyd could not take during its outage is due now, as an operator would make it,
        rather than after a postponement's backoff (a minute: longer than a trial)."""
        postponed_due_now(self.url)

    def tend(self) -> None:
        if self.scrapyd.process is None or self.scrapyd.process.poll() is not None:
            self.lifetime += 1
            self.scrapyd.start()

    def stop(self) -> int:
        """Scrapyd stopped, its spiders (orphans of a kill -9 too) ended; how many were left."""
        self._watching.set()
        self._watcher.join(10)
        self.scrapyd.kill()
        left = 0
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if proc.environ().get("CHAOS_SPIDER_LOG") == str(self.spider_log):
                    proc.kill()
                    left += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return left


def append_report(trials: list, argv: list[str], path: Path) -> None:
    """A section of its own at the end of the report (RELIABILITY.md): the command that ran the
    trials, and what they did."""
    from collections import Counter
    from datetime import datetime, timezone

    events = Counter(e for t in trials for e in t.events)
    totals: Counter = Counter()
    for t in trials:
        totals.update({k: v for k, v in t.totals.items() if isinstance(v, int)})
    violations = [(t.seed, v) for t in trials for v in t.violations]
    kinds = Counter(t.kind for t in trials)
    lines = [
        "",
        f"## Trials run with `{' '.join(a for a in argv if a != '--append')}`",
        "",
        "```sh",
        f".venv/bin/python -m chaos {' '.join(argv)}",
        "```",
        "",
        f"**{len(trials)} trials ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), "
        f"{len(violations)} violations** ({datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{sum(t.seconds for t in trials):.0f} s in all, seeds {trials[0].seed}-{trials[-1].seed}).",
        "",
        "Settings as in the trials above, except "
        + ", ".join(f"`{k}={v}`" for k, v in TRIAL_SETTINGS.items())
        + f"; Scrapyd `max_proc={MAX_PROC}`, `poll_interval=0.2`; a hung spider sleeps {HANG_SECONDS} s; "
        f"the simulated scraper fleet keeps {SCRAPYD_IN_FLIGHT} runs going at once; settling lasts up to "
        f"{SCRAPYD_SETTLE_TIMEOUT:.0f} s.",
        "",
        "Scrapyd trials: retries are scheduled on a real Scrapyd on loopback (chaos/scrapyd.py) whose",
        "spiders complete, fail (503, 404), complete slowly, hang or die without writing, each writing",
        "its row's outcome conditionally on `running`; besides the usual chaos the monkey `kill -9`s",
        "Scrapyd and restarts it on its port, and stops daemons with SIGTERM (schedule.json calls in",
        "flight). A thread reads `listjobs.json` every 0.25 s all trial long. The auditor adds: no job",
        "id listed twice in one answer; no job Scrapyd knew (running or finished) seen pending or",
        "running again (scheduled anew); no job run twice by a spider; every job a retry of the table;",
        "no completion a spider wrote overwritten. The one rescheduling SPEC §16 allows (a retry whose",
        "delivering process was killed, whose job a restarted Scrapyd no longer knew) is counted below.",
        "",
        "| | count |",
        "| --- | ---: |",
    ]
    keys = (
        "runs",
        "stuck_failed",
        "retries",
        "handed_off",
        "scrapyd_jobs",
        "spider_runs",
        "spider_completions",
        "rescheduled_after_scrapyd_forgot",
        "completed",
        "fleet_completions",
        "superseded",
        "dead_letters",
    )
    lines += figures_lines(keys, totals, events, violations, "Violations:")
    with path.open("a") as out:
        out.write("\n".join(lines) + "\n")
