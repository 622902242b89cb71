"""`stuck-runs status`: what the daemons did and will do, and where the runs stand."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from db.daemons import DaemonRecords
from db.engine import database_errors
from jobs.runtime import Runtime

JOB_IDS = ("stuck_run_checker", "retry_processor")
ALIVE_WITHIN = timedelta(seconds=60)  # four missed heartbeats and a daemon counts as gone


@dataclass(frozen=True)
class DaemonState:
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    next_runs: dict[str, str | None]


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


@dataclass(frozen=True)
class RunCounts:
    running: int
    stuck: int
    untimed: int  # running without started_at (or heartbeat): the checker can never time them
    pending_retry: int
    running_retries: int
    next_due: datetime | None
    permanently_failed: int


def untimed_message(count: int) -> str:
    """What `status` and `doctor` say about running runs the checker cannot time."""
    runs, them = ("run has", "it") if count == 1 else ("runs have", "them")
    return f"{count} running {runs} no started_at (nor heartbeat): the checker can never find {them} stuck"


@dataclass(frozen=True)
class StatusReport:
    checked_at: datetime
    daemons: tuple[DaemonState, ...]
    jobs: tuple[JobState, ...]
    runs: RunCounts

    @property
    def daemon_alive(self) -> bool:
        return bool(self.daemons)


def read_status(rt: Runtime) -> StatusReport:
    """The daemons alive now, each job's last run (from any host) and next run, the run counts."""
    now = rt.clock.now()
    records = DaemonRecords(rt.runs.table.schema, rt.runs.qualified_name)
    with database_errors(rt.engine, "reading the status"), rt.engine.connect() as conn:
        alive = conn.execute(records.alive(now - ALIVE_WITHIN)).mappings().all()
        last = {r["job_id"]: r for r in conn.execute(records.last_runs()).mappings()}
        counts = conn.execute(rt.queries.counts(), {"sr_cutoff": now - rt.settings.policy.stuck_after}).mappings().one()
    daemons = tuple(DaemonState(d["host"], d["pid"], d["started_at"], d["heartbeat_at"], d["jobs"]) for d in alive)
    jobs = []
    for job_id in JOB_IDS:
        upcoming = [datetime.fromisoformat(d.next_runs[job_id]) for d in daemons if d.next_runs.get(job_id)]
        row = last.get(job_id)
        jobs.append(
            JobState(
                job_id,
                row["started_at"] if row else None,
                row["finished_at"] if row else None,
                row["outcome"] if row else None,
                row["counts"] if row else None,
                row["error"] if row else None,
                row["host"] if row else None,
                row["pid"] if row else None,
                min(upcoming) if upcoming else None,
            )
        )
    return StatusReport(now, daemons, tuple(jobs), RunCounts(**counts))
