"""`stuck-runs status`: what the jobs did (from any host, any entry point) and will do, and where
the runs stand (read from the job records); and `job_run`, which publishes the work done
outside the daemon as job runs, for the records (scheduler/records.py) to write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL

from db.daemons import DaemonRecords
from db.engine import database_errors, describe_db_error
from db.errors import DatabaseUnavailable, OperatorError
from jobs.events import DAEMON, JOB_IDS, VIA_KEY, JobRun, JobRunsEnded
from jobs.limits import runtime_judging_params
from jobs.runtime import Runtime

if TYPE_CHECKING:  # read where `status` reads them: `check` records its run without the processor's imports
    from jobs.control import PauseState
    from jobs.waiting import Waiting

ALIVE_WITHIN = timedelta(seconds=60)  # four missed heartbeats and a daemon counts as gone


@dataclass(frozen=True)
class DaemonState:
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    next_runs: dict[str, str | None]


# Permanently failed chains are counted over this window everywhere (`status`, --json, the API, the
# overview): each failed attempt of the window is probed twice (a later retry? a completed run?); a
# day of a busy fleet is ~60 ms, a week 400 ms (BENCHMARKS.md).
PERMANENT_WINDOW = timedelta(hours=24)
PERMANENT_WINDOW_NAME = "24h"


@dataclass(frozen=True)
class JobState:
    job_id: str
    last_started: datetime | None = None
    last_finished: datetime | None = None
    outcome: str | None = None  # ok | error; None: never ran
    counts: dict[str, Any] | None = None
    error: str | None = None
    host: str | None = None
    pid: int | None = None
    next_run: datetime | None = None  # from a live daemon
    by_daemon: bool = True  # False: run by `check`, `process`, `fix` or the manual script
    via: str | None = None  # what started it: daemon, cli (also the manual script), api


@dataclass(frozen=True)
class RunCounts:
    running: int
    stuck: int
    untimed: int  # running without started_at (or heartbeat): the checker can never time them
    pending_retry: int
    running_retries: int  # retries executing here (command, callable): not those handed to the fleet
    handed_off_queued: int  # handed to the fleet (SPEC §12), waiting in its queue; 0 when STATUS_MAP maps no queued
    handed_off_running: int  # handed to the fleet, running there (counted in `running` too)
    next_due: datetime | None
    permanently_failed: int  # chains that ended failed within PERMANENT_WINDOW, no retry coming
    permanently_failed_since: datetime | None = None  # the window's start
    permanently_failed_window: str = PERMANENT_WINDOW_NAME  # the window, named wherever the number is shown

    @property
    def handed_off(self) -> int:
        """Retries handed to the fleet and not yet ended (queued or running there)."""
        return self.handed_off_queued + self.handed_off_running

    def fleet_shown(self, hands_off: str | None) -> bool:
        """Whether to show the hand-offs: some are not yet ended, or `hands_off` (the settings'
        way: webhook, queue) says retries are handed off."""
        return bool(self.handed_off or hands_off)


def untimed_message(count: int) -> str:
    """What `status` and `doctor` say about running runs the checker cannot time."""
    runs, them = ("run has", "it") if count == 1 else ("runs have", "them")
    return f"{count} running {runs} no started_at (nor heartbeat): the checker can never find {them} stuck"


def handed_off_message(queued: int, running: int) -> str:
    """What `status` and `stats` say about the retries handed to the fleet and not yet ended."""
    return f"{queued + running} ({queued} queued, {running} running)"


@dataclass(frozen=True)
class StatusReport:
    checked_at: datetime
    daemons: tuple[DaemonState, ...]
    jobs: tuple[JobState, ...]
    runs: RunCounts
    pause: PauseState | None = None  # retries paused: nothing starts until it ends
    waiting: Waiting | None = None  # due retries held back, and why (paused, every slot taken)

    @property
    def daemon_alive(self) -> bool:
        return bool(self.daemons)


def read_status(rt: Runtime) -> StatusReport:
    """The daemons alive now, each job's last run (from any host) and next run, the run counts.

    Chains that ended permanently failed are counted over PERMANENT_WINDOW, for `status`, its JSON,
    the API and the overview alike: the window is bounded so the ended-attempts index answers it
    (over all time the count reads every failed attempt of the table's history: seconds at ten
    million rows), and each shows the window beside the number."""
    from jobs.control import read_pause
    from jobs.waiting import read_waiting

    now = rt.clock.now()
    since = now - PERMANENT_WINDOW
    records = DaemonRecords(rt.runs.table.schema, rt.runs.canonical_name)
    with database_errors(rt.engine, "reading the status"), rt.engine.connect() as conn:
        alive = conn.execute(records.alive(now - ALIVE_WITHIN)).mappings().all()
        last = {job_id: conn.execute(records.last_run(job_id)).mappings().first() for job_id in JOB_IDS}
        counts = conn.execute(rt.queries.counts(), runtime_judging_params(rt, now=now)).mappings().one()
        permanent = conn.execute(rt.queries.permanently_failed(since=True), {"sr_since": since}).scalar_one()
        pause = read_pause(rt, conn)
        waiting = read_waiting(rt, conn)
    daemons = tuple(DaemonState(d["host"], d["pid"], d["started_at"], d["heartbeat_at"], d["jobs"]) for d in alive)
    jobs = []
    for job_id in JOB_IDS:
        upcoming = [datetime.fromisoformat(d.next_runs[job_id]) for d in daemons if d.next_runs.get(job_id)]
        row = last.get(job_id)
        recorded = dict(row["counts"] or {}) if row else None
        via = recorded.pop(VIA_KEY, "cli") if recorded is not None else None  # older records: cli
        jobs.append(
            JobState(
                job_id,
                row["started_at"] if row else None,
                row["finished_at"] if row else None,
                row["outcome"] if row else None,
                recorded,
                row["error"] if row else None,
                row["host"] if row else None,
                row["pid"] if row else None,
                min(upcoming) if upcoming else None,
                row["daemon_id"] is not None if row else True,
                (DAEMON if row["daemon_id"] is not None else via) if row else None,
            )
        )
    return StatusReport(
        now,
        daemons,
        tuple(jobs),
        RunCounts(**counts, permanently_failed=permanent, permanently_failed_since=since),
        pause,
        waiting,
    )


def job_error(exc: BaseException, url: str | URL | None) -> str:
    """A failed job run's error, one line, never the password."""
    if isinstance(exc, DatabaseUnavailable):
        return exc.brief  # shown to read-only callers too: not where the database is
    if isinstance(exc, OperatorError):
        return str(exc)
    return f"{type(exc).__name__}: {describe_db_error(exc, url)}"


@contextmanager
def job_run(
    rt: Runtime, job_ids: tuple[str, ...], *, dry_run: bool, via: str = "cli"
) -> Iterator[Callable[[object], None]]:
    """Publishes work done outside the daemon (`check`, `process`, `fix`, the manual script, the
    API) as a run of each job in `job_ids` (`JobRunsEnded`), which the job records write
    (scheduler/records.py), so `status` shows the last run from any entry point. Give the work's
    result (a sweep's, a processor pass's, or for several jobs a mapping of each job's id to its
    result) to the function this yields. An error is published too and raised again; a dry run is not. `via` (cli, api) says
    who ran it.
    """
    results: list[object] = []
    started = datetime.now(timezone.utc)
    try:
        yield results.append
    except Exception as exc:
        if not dry_run:
            error = job_error(exc, rt.engine.url)
            _publish(rt, tuple(JobRun(job_id, "error", {}, error) for job_id in job_ids), started, via)
        raise
    if dry_run or not results:
        return
    [result] = results
    parts = result if isinstance(result, dict) else dict.fromkeys(job_ids, result)
    _publish(rt, tuple(JobRun(job_id, "ok", parts[job_id].counts()) for job_id in job_ids), started, via)


def _publish(rt: Runtime, runs: tuple[JobRun, ...], started: datetime, via: str) -> None:
    rt.events.publish(JobRunsEnded(runs, started, datetime.now(timezone.utc), via))
