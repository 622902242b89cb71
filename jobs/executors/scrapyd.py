"""SCRAPYD_URL (SPEC §16): a due retry is scheduled on Scrapyd (`schedule.json`), the fleet's own
engine, with the retry's id as the job's id; the spider writes the outcome into the row.

It delivers one retry at a time (`Delivers`, jobs/executors/base.py) through §12's hand-over
(jobs/delivery.py): committed `running` and marked, scheduled, confirmed or put back. Scrapyd
accepts a repeated `jobid`, so exactly once is the hand-over's: a retry whose delivering process
died is scheduled again only when Scrapyd knows no job of its id (`has_job`). What Scrapyd answers:
- `{"status": "ok"}`: handed over; the row is `running` and the spider's.
- unreachable, a timeout, HTTP 5xx: put back pending, no budget spent (a postponement's backoff).
- `{"status": "error"}` with HTTP 200 (an unknown project or spider, a refused argument), or an
  answer that is not Scrapyd's (401, 404): a configuration error (`Misconfigured`), said once, the
  retry put back as it was, untouched: not failed, and not postponed further and further (it
  goes the pass after the configuration is fixed).
A job Scrapyd reports finished, or no longer knows, while its row is still `running` is a failed
attempt (`ended_jobs`, one `listjobs.json` a pass for them all: jobs/fleet_jobs.py). A job is
cancelled with `cancel.json` (`Cancels`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import httpx

from jobs.executors.base import Strategies, T
from jobs.executors.outcome import (
    DeliveryOutcome,
    HandedOver,
    Misconfigured,
    OutcomeUnknown,
    Postponed,
    Released,
    clean,
)
from jobs.executors.senders import ClientPerThread, Senders, answer_within
from jobs.executors.webhook import ONE_AT_A_TIME
from jobs.model import Run, RunId
from jobs.rules import known_priority

MODE = "scrapyd"  # the `handed_off` value of a retry scheduled on Scrapyd
CONNECT_TIMEOUT = timedelta(seconds=5)
READ_TIMEOUT = timedelta(seconds=30)  # schedule.json lists the project's spiders (a process) the first time
MESSAGE_CHARS = 200  # of Scrapyd's error message, kept in a log line


def ended_message(job_id: object) -> str:
    """The failed attempt of a job that ended without its spider writing the row (SPEC §16)."""
    return f"Scrapyd job {job_id} finished without writing the run's status"


class Unanswered(Exception):
    """Scrapyd could not be asked (unreachable, a timeout, 5xx): why, in one line."""


class Refused(Exception):
    """Scrapyd (or what answers at SCRAPYD_URL) refused the request: a configuration error."""


class ScrapydExecutor:
    """Schedules, lists and cancels jobs, a client per calling thread (`ClientPerThread`)."""

    mode = MODE
    lanes = None  # a schedule.json waits for Scrapyd's answer: one lane per slot of the cap
    sends_again = True  # a lapsed mark is scheduled again only when Scrapyd knows no job of its id (has_job)

    def __init__(
        self,
        base: str,
        project: str,
        spider: str,
        args: tuple[tuple[str, str], ...] = (),
        auth: tuple[str, str] | None = None,
        priority: str | None = None,
    ) -> None:
        self.base, self.project, self.spider, self.args, self.priority = base, project, spider, args, priority
        self.senders = Senders("scrapyd-schedule")
        # As the webhook's: one pooled client shared by a pass's 100 senders spent more of the
        # process's CPU in httpcore's pool bookkeeping than in the calls (bench/scrapyd.py: 2.2-2.9
        # ms a job against 1.2 for a client per thread), and that CPU is taken from Scrapyd's.
        timeout = httpx.Timeout(READ_TIMEOUT.total_seconds(), connect=CONNECT_TIMEOUT.total_seconds())
        self.clients = ClientPerThread(
            lambda: httpx.Client(
                timeout=timeout,
                auth=auth,
                limits=ONE_AT_A_TIME,
                follow_redirects=False,
                trust_env=False,  # no proxy from the environment: it would see every job and the credentials
            )
        )
        self.bound = CONNECT_TIMEOUT + READ_TIMEOUT  # the longest one delivery lasts: its lease is this plus a margin

    @classmethod
    def from_settings(cls, settings: Any) -> ScrapydExecutor:
        url = settings.scrapyd_url
        user = settings.scrapyd_username or url.username
        password = settings.scrapyd_password or url.password
        return cls(
            url.base,
            settings.scrapyd_project,
            settings.scrapyd_spider,
            settings.scrapyd_args,
            (user, password or "") if user else None,
            settings.layout.columns.get("priority"),  # its real name: the run's inputs are keyed so
        )

    def dispatch_with(self, strategies: Strategies[T]) -> T:
        return strategies.deliver(self)

    # --- what a job is scheduled with --------------------------------------------------------

    def job(self, run: Run) -> dict[str, str]:
        """schedule.json's form: the project, the spider and its arguments from the run's columns,
        `jobid` = the retry's id, `priority` from the run's when COLUMN_MAP maps one."""
        values = {name: "" if value is None else str(value) for name, value in run.inputs.items()}
        values["run_id"] = str(run.id)
        form = {name: template.format_map(values) for name, template in self.args}
        form |= {"project": self.project, "spider": self.spider.format_map(values), "jobid": str(run.id)}
        if self.priority is not None and known_priority(run.inputs.get(self.priority)) is not None:
            form["priority"] = str(run.inputs[self.priority])
        return form

    # --- Delivers --------------------------------------------------------------------------

    def deliver(self, run: Run, stop: threading.Event) -> DeliveryOutcome:
        """schedule.json for `run`, given up when `stop` is set or past `bound`."""
        if stop.is_set():
            return Released()
        answered = self._bounded(lambda: self.schedule(run), stop, "schedule.json")
        # Given up in flight: Scrapyd may have the job. Not `stopping`: a release counts no
        # postponement, and only a postponed (or lapsed) retry's next delivery asks Scrapyd first
        # (`has_job`); Scrapyd would take the same jobid as a second job.
        return answered[0] if answered else OutcomeUnknown(self._given_up("schedule.json", stop))

    def schedule(self, run: Run) -> HandedOver | Postponed | Misconfigured:
        try:
            self._call("POST", "schedule.json", data=self.job(run))
        except Unanswered as exc:
            return Postponed(str(exc))
        except Refused as exc:
            return Misconfigured(str(exc))
        return HandedOver(MODE)

    def has_job(self, run: Run, stop: threading.Event | None = None) -> DeliveryOutcome | None:
        """For a retry that may have reached Scrapyd already (its delivering process died, or a
        schedule.json went unanswered): handed over when Scrapyd knows a job of its id (pending,
        running or finished), None when it knows none (schedule it). One status.json (Scrapyd
        1.5+), else the project's listjobs.json: both within one `bound` (its lease covers that and
        a schedule.json, jobs/delivery.py), given up at `stop`; not asked: postponed (asked again)."""
        answered = self._bounded(lambda: self.ask_job(run), stop or threading.Event(), "status.json")
        return answered[0] if answered else Postponed(self._given_up("status.json", stop))

    def ask_job(self, run: Run) -> DeliveryOutcome | None:
        try:
            try:
                state = self._call("GET", "status.json", params={"project": self.project, "job": str(run.id)})
                known = state.get("currstate") is not None
            except Refused:  # an older Scrapyd, or an unknown project (then listjobs.json says so too)
                known = str(run.id) in self.jobs()
        except Unanswered as exc:
            return Postponed(str(exc))
        except Refused:
            return None  # an unknown project knows no job: schedule.json says what is wrong
        return HandedOver(MODE) if known else None

    # --- KnowsItsJobs: the watch of handed-over jobs ----------------------------------------

    def jobs(self) -> dict[str, str]:
        """Every job Scrapyd knows in the project: its id → pending, running or finished."""
        answer = self._call("GET", "listjobs.json", params={"project": self.project})
        known: dict[str, str] = {}
        for state in ("finished", "running", "pending"):  # a job listed twice: the liveliest state wins
            for job in answer.get(state) or ():
                known[str(job.get("id"))] = state
        return known

    def ended_jobs(self, runs: list[Run]) -> dict[RunId, str] | None:
        """Of `runs` (scheduled, still `running`), those whose job finished or Scrapyd no longer
        knows (it keeps finished jobs in memory, the last `finished_to_keep`): one listjobs.json."""
        try:
            known = self.jobs()
        except (Unanswered, Refused):
            return None
        return {run.id: ended_message(run.id) for run in runs if known.get(str(run.id)) in (None, "finished")}

    # --- Cancels ---------------------------------------------------------------------------

    def cancel(self, run: Run, *, kill: bool) -> str:
        """cancel.json for the run's job (`kill`: signal=KILL); what Scrapyd answered. Raises
        `Unanswered` or `Refused` when Scrapyd was not told (the caller says so; a forceful stop
        is tried again at the next pass)."""
        form = {"project": self.project, "job": str(run.id), **({"signal": "KILL"} if kill else {})}
        answer = self._call("POST", "cancel.json", data=form)
        return f"Scrapyd cancelled job {run.id}{' with SIGKILL' if kill else ''} (it was {answer.get('prevstate')})"

    def still_running(self, runs: list[Run]) -> list[Run] | None:
        """Those of `runs` whose job Scrapyd still has pending or running: one listjobs.json for
        them all. None when Scrapyd cannot be asked (nothing says they stopped)."""
        try:
            known = self.jobs()
        except (Unanswered, Refused):
            return None
        return [run for run in runs if known.get(str(run.id)) in ("pending", "running")]

    # --- doctor ----------------------------------------------------------------------------

    def health(self) -> tuple[bool, str, str | None]:
        """(ok, what was found, the fix): Scrapyd answers, knows the project and the spider."""
        try:
            status = self._call("GET", "daemonstatus.json")
            projects = self._call("GET", "listprojects.json").get("projects") or []
            if self.project not in projects:
                listed = ", ".join(map(str, projects)) or "none"
                return (
                    False,
                    f"Scrapyd at {self.base} has no project {self.project!r} (it has {listed})",
                    ("deploy the project (scrapyd-deploy), or fix SCRAPYD_PROJECT"),
                )
            spiders = self._call("GET", "listspiders.json", params={"project": self.project}).get("spiders") or []
        except Unanswered as exc:
            return False, str(exc), "start Scrapyd, or check SCRAPYD_URL's host, port and scheme"
        except Refused as exc:
            return False, str(exc), "check SCRAPYD_URL and the credentials"
        node = status.get("node_name") or "?"
        if "{" not in self.spider and self.spider not in spiders:
            listed = ", ".join(map(str, spiders)) or "none"
            return (
                False,
                f"Scrapyd's project {self.project!r} has no spider {self.spider!r} (it has {listed})",
                ("deploy the spider, or fix SCRAPYD_SPIDER"),
            )
        return (
            True,
            (
                f"Scrapyd at {self.base} (node {node}) answers; project {self.project!r} has spider(s) "
                f"{', '.join(map(str, spiders))}"
            ),
            None,
        )

    # --- the HTTP calls ----------------------------------------------------------------------

    def _call(self, method: str, endpoint: str, **request: Any) -> Mapping[str, Any]:
        """One call of Scrapyd's API: its JSON when `status` is ok; `Unanswered` or `Refused`."""
        url = f"{self.base}/{endpoint}"
        try:
            response = self.clients.get().request(method, url, **request)
        except httpx.TimeoutException:
            raise Unanswered(f"Scrapyd did not answer {endpoint} in time") from None
        except httpx.TransportError as exc:  # refused, reset, DNS, TLS: it may be back later
            raise Unanswered(f"Scrapyd unreachable: {type(exc).__name__}: {clean(str(exc))}"[:300]) from None
        if response.status_code >= 500:
            raise Unanswered(f"Scrapyd answered HTTP {response.status_code} to {endpoint}")
        if response.status_code in (401, 403):
            raise Refused(
                f"Scrapyd refused the credentials (HTTP {response.status_code}): "
                "set SCRAPYD_USERNAME and SCRAPYD_PASSWORD (or user:password@ in SCRAPYD_URL)"
            )
        try:
            answer = response.json() if response.status_code == 200 else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise Refused(
                f"{endpoint} at SCRAPYD_URL answered HTTP {response.status_code}, not Scrapyd's JSON: check SCRAPYD_URL"
            )
        if answer.get("status") != "ok":
            said = clean(str(answer.get("message") or "no message"))[:MESSAGE_CHARS]
            raise Refused(f"Scrapyd refused {endpoint}: {said}: check SCRAPYD_PROJECT, SCRAPYD_SPIDER and SCRAPYD_ARGS")
        return answer

    def _bounded(self, call: Callable[[], T], stop: threading.Event, endpoint: str) -> tuple[T | Postponed] | None:
        """`call()` in a thread (one-tuple: its answer may be None), or None when given up on: once
        `stop` is set or `bound` has passed."""

        def answer() -> tuple[T | Postponed]:
            try:
                return (call(),)
            except Exception as exc:  # noqa: BLE001 - the client closed under a call given up on
                return (Postponed(f"Scrapyd {endpoint} failed: {type(exc).__name__}"),)

        return answer_within(self.senders.submit(answer), stop, time.monotonic() + self.bound.total_seconds())

    def _given_up(self, endpoint: str, stop: threading.Event | None) -> str:
        if stop is not None and stop.is_set():
            return f"Stopped by a signal before Scrapyd answered {endpoint}"
        return f"Scrapyd did not answer {endpoint} within {self.bound.total_seconds():g}s"

    def close(self) -> None:
        self.senders.close()
        self.clients.close()
