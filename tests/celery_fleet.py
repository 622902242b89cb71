"""The Celery fleet of the Celery executor's tests: one task, `fleet.scrape`, that writes its run's
outcome into the row (conditionally on `running`, at once, as a real scraper's task would) and
records each execution in `celery_seen`, so a test can tell a task run twice.

Its behaviour follows the run's search_query: `hang...` sleeps until revoked, `fail...` writes
`failed`, anything else `completed`. DATABASE_URL is the worker's environment's."""

from __future__ import annotations

import os
import time

import sqlalchemy as sa
from celery import Celery

app = Celery("fleet", broker=os.environ.get("FLEET_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
    task_acks_late=False,
    broker_connection_retry_on_startup=True,
)
_engine = None


def engine() -> sa.Engine:
    global _engine
    if _engine is None:
        _engine = sa.create_engine(os.environ["DATABASE_URL"], poolclass=sa.pool.NullPool)
    return _engine


@app.task(name="fleet.scrape", bind=True)
def scrape(self, run_id: str, **inputs: object) -> str:
    with engine().begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO celery_seen (task_id, run_id, search_query, pid, priority) VALUES (:t, :r, :q, :p, :n)"
            ),
            {
                "t": self.request.id,
                "r": run_id,
                "q": str(inputs.get("search_query")),
                "p": os.getpid(),
                "n": (self.request.delivery_info or {}).get("priority"),
            },
        )
    query = str(inputs.get("search_query") or "")
    if query.startswith("hang"):
        time.sleep(600)
    status, error = ("failed", "HTTPError: 503 from the fleet") if query.startswith("fail") else ("completed", None)
    with engine().begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE scrape_runs SET status = :s, error_message = :e, completed_at = now() "
                "WHERE id = :r AND status = 'running'"
            ),
            {"s": status, "e": error, "r": run_id},
        )
    return status
