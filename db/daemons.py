"""Statements on the daemons' own records: who runs, when each job ran and runs next.

`stuck_runs_daemons` has one row per daemon process (heartbeat, next run of each job);
`stuck_runs_job_runs` one row per job execution, the daemon's ticks and the runs of `check`,
`process`, `fix` and the manual script alike (`daemon_id` NULL). Both are read by `stuck-runs
status` and by `get_scheduler()` in processes that are not the daemon.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

DAEMONS = "stuck_runs_daemons"
JOB_RUNS = "stuck_runs_job_runs"


class DaemonRecords:
    """Tables and statements for the daemons of one runs table."""

    def __init__(self, schema: str | None, runs_table: str) -> None:
        metadata = sa.MetaData()
        self.runs_table = runs_table
        self.daemons = sa.Table(
            DAEMONS,
            metadata,
            sa.Column("id", sa.BigInteger, primary_key=True),
            sa.Column("runs_table", sa.Text, nullable=False),
            sa.Column("host", sa.Text, nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
            sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("stopped_at", sa.DateTime(timezone=True)),
            sa.Column("jobs", JSONB, nullable=False),
            schema=schema,
        )
        self.job_runs = sa.Table(
            JOB_RUNS,
            metadata,
            sa.Column("id", sa.BigInteger, primary_key=True),
            sa.Column("daemon_id", sa.BigInteger),
            sa.Column("runs_table", sa.Text, nullable=False),
            sa.Column("job_id", sa.Text, nullable=False),
            sa.Column("host", sa.Text, nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
            sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("finished_at", sa.DateTime(timezone=True)),
            sa.Column("outcome", sa.Text, nullable=False),
            sa.Column("counts", JSONB, nullable=False),
            sa.Column("error", sa.Text),
            sa.Column("next_run_time", sa.DateTime(timezone=True)),
            schema=schema,
        )

    def register(self, host: str, pid: int, now: object, jobs: dict) -> sa.Insert:
        d = self.daemons
        return (
            sa.insert(d)
            .values(runs_table=self.runs_table, host=host, pid=pid, started_at=now, heartbeat_at=now, jobs=jobs)
            .returning(d.c.id)
        )

    def heartbeat(self, daemon_id: int, now: object, jobs: dict) -> sa.Update:
        d = self.daemons
        return sa.update(d).values(heartbeat_at=now, jobs=jobs).where(d.c.id == daemon_id)

    def stopped(self, daemon_id: int, now: object) -> sa.Update:
        d = self.daemons
        return sa.update(d).values(stopped_at=now, heartbeat_at=now).where(d.c.id == daemon_id)

    def job_started(self, daemon_id: int | None, job_id: str, host: str, pid: int, now: object) -> sa.Insert:
        r = self.job_runs
        return (
            sa.insert(r)
            .values(
                daemon_id=daemon_id,
                runs_table=self.runs_table,
                job_id=job_id,
                host=host,
                pid=pid,
                started_at=now,
                outcome="running",
                counts={},
            )
            .returning(r.c.id)
        )

    def job_finished(
        self, run_id: int, now: object, outcome: str, counts: dict, error: str | None, next_run: object
    ) -> sa.Update:
        r = self.job_runs
        return (
            sa.update(r)
            .values(finished_at=now, outcome=outcome, counts=counts, error=error, next_run_time=next_run)
            .where(r.c.id == run_id)
        )

    def alive(self, since: object) -> sa.Select:
        """Daemons of this table that are not stopped and beat after `since`, newest first."""
        d = self.daemons
        return (
            sa.select(d)
            .where(d.c.runs_table == self.runs_table, d.c.stopped_at.is_(None), d.c.heartbeat_at >= since)
            .order_by(d.c.heartbeat_at.desc())
        )

    def last_run(self, job_id: str) -> sa.Select:
        """The latest execution of `job_id` on this table, from any host and entry point (one
        probe of the (runs_table, job_id, started_at DESC) index)."""
        r = self.job_runs
        return (
            sa.select(r)
            .where(r.c.runs_table == self.runs_table, r.c.job_id == job_id)
            .order_by(r.c.started_at.desc())
            .limit(1)
        )

    def last_finished(self, job_id: str) -> sa.Select:
        """When `job_id`'s latest finished run on this table finished, from any host and entry
        point (no row: never). Newest starts first, on the (runs_table, job_id, started_at DESC) index."""
        r = self.job_runs
        return (
            sa.select(r.c.finished_at)
            .where(r.c.runs_table == self.runs_table, r.c.job_id == job_id, r.c.finished_at.is_not(None))
            .order_by(r.c.started_at.desc())
            .limit(1)
        )
