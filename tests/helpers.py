"""Small helpers the tests share: rows in, rows out, a runtime, a scripted scraper."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from jobs.executors.inprocess import InProcess
from jobs.executors.outcome import Completed, RanHere
from jobs.model import Run
from jobs.rules import RetryPolicy
from jobs.runtime import Runtime
from jobs.settings import Settings


def make_runtime(url: str, executor: Any = None, *, policy: RetryPolicy | None = None, **settings: Any) -> Runtime:
    return Runtime.open(Settings(database_url=url, policy=policy or RetryPolicy(), **settings), executor=executor)


def insert_run(
    conn: sa.Connection,
    *,
    status: str = "running",
    started_at: datetime | None = None,
    search_query: str = "Data Architect",
    location_query: str = "Belgium",
    table: str = "scrape_runs",
    **columns: Any,
) -> uuid.UUID:
    values = {
        "status": status,
        "started_at": started_at,
        "search_query": search_query,
        "location_query": location_query,
        **columns,
    }
    names = ", ".join(values)
    params = ", ".join(f":{k}" for k in values)
    return conn.execute(sa.text(f"INSERT INTO {table} ({names}) VALUES ({params}) RETURNING id"), values).scalar_one()


def insert_stuck_runs(conn: sa.Connection, count: int, started_at: datetime, **columns: str) -> None:
    """`count` runs `running` since `started_at`, named 'q1' ... in Belgium; `columns` maps
    further columns to SQL expressions of `g`, the run's number (`user_id="g"`)."""
    names = "".join(f", {name}" for name in columns)
    values = "".join(f", {expression}" for expression in columns.values())
    conn.execute(
        sa.text(
            f"INSERT INTO scrape_runs (search_query, location_query, status, started_at{names})"
            f" SELECT 'q' || g, 'Belgium', 'running', :t{values} FROM generate_series(1, :n) g"
        ),
        {"t": started_at, "n": count},
    )


def row(conn: sa.Connection, run_id: uuid.UUID, table: str = "scrape_runs") -> dict:
    return dict(conn.execute(sa.text(f"SELECT * FROM {table} WHERE id = :id"), {"id": run_id}).mappings().one())


def rows(conn: sa.Connection, where: str = "true", table: str = "scrape_runs", **params: Any) -> list[dict]:
    result = conn.execute(sa.text(f"SELECT * FROM {table} WHERE {where} ORDER BY retry_count, started_at"), params)
    return [dict(r) for r in result.mappings()]


def chain_of(conn: sa.Connection, root: uuid.UUID) -> list[dict]:
    return rows(conn, "id = :root OR original_run_id = :root", root=root)


class ScriptedScraper(InProcess):
    """An in-process executor: `script(run)` says what the scraper does for each attempt."""

    def __init__(self, script: Callable[[Run], RanHere] | None = None) -> None:
        self.script = script or (lambda run: Completed())
        self.calls: list[Run] = []
        self.lock = threading.Lock()

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> RanHere:
        with self.lock:
            self.calls.append(run)
        return self.script(run)


def insert_due_retry(
    conn: sa.Connection,
    *,
    search_query: str = "Data Architect",
    due: datetime | None = None,
    retry_count: int = 1,
    now: datetime | None = None,
    **columns: Any,
) -> tuple[uuid.UUID, uuid.UUID]:
    """A chain whose attempt `retry_count - 1` failed and whose retry is pending, due `due`
    (default: a minute ago). Returns (root id, retry id)."""
    now = now or datetime.now(timezone.utc)
    due = due or now - timedelta(minutes=1)
    root = insert_run(
        conn,
        status="failed",
        started_at=now - timedelta(hours=6),
        search_query=search_query,
        error_message="Run stuck for 1.2h",
        next_retry_at=due,
        **columns,
    )
    retry = insert_run(
        conn,
        status="pending_retry",
        search_query=search_query,
        retry_count=retry_count,
        is_retry=True,
        original_run_id=root,
        next_retry_at=due,
        **columns,
    )
    return root, retry
