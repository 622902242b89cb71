"""The mass sweep on an adopted table beside the same sweep on the default one, each against its floor.

The adopted table is what SPEC §11 meets in the wild: a BIGSERIAL id, a text `state` guarded by a
CHECK (extended by `migrate --extend-check`), `finished_at`, a JSONB `error_summary`, its own
names for the run's inputs. Same sizes, same ages, same instant as the default table's run; the
ratio to each table's own floor is what must not be worse.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from loguru import logger

from bench import contenders, data
from db.engine import make_engine
from db.layout import Layout
from db.migrate import migrate
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.stuck import sweep_stuck_runs

TABLE = """
CREATE TABLE crawl_jobs (
    job_id BIGINT NOT NULL,
    keyword TEXT NOT NULL,
    site TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'success', 'error')),
    error_summary JSONB,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    options JSONB NOT NULL DEFAULT '{}',
    owner_id INTEGER,
    pages INTEGER,
    proxy_pool TEXT,
    priority SMALLINT NOT NULL DEFAULT 5,
    updated_at TIMESTAMPTZ,
    retry_count INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL DEFAULT 4,
    next_retry_at TIMESTAMPTZ,
    original_run_id BIGINT,
    is_retry BOOLEAN NOT NULL DEFAULT false,
    failure_pattern TEXT
)
"""
LAYOUT = Layout(
    columns={"id": "job_id", "status": "state", "completed_at": "finished_at", "error_message": "error_summary"},
    statuses={
        "running": ("active",),
        "completed": ("success",),
        "failed": ("error",),
        "pending_retry": ("wait",),
        "cancelled": ("skipped",),
    },
    label="{keyword} on {site}",
)
HISTORY = """
INSERT INTO crawl_jobs (job_id, keyword, site, state, error_summary, started_at, finished_at, options, owner_id, pages,
                        proxy_pool, updated_at, retry_count, max_retries, original_run_id, is_retry, failure_pattern)
SELECT g, (:queries)[1 + g % 10], (:places)[1 + (g / 10) % 10],
       CASE WHEN g % 10 = 0 THEN 'error' ELSE 'success' END,
       CASE WHEN g % 10 = 0 THEN to_jsonb('HTTP 503 Service Unavailable - retry 1/4 scheduled'::text) END,
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '2 hours',
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '1 hour',
       jsonb_build_object('max_pages', 1 + g % 9, 'sort', 'date'), g % 997, g % 211, 'eu-' || g % 3,
       :now - make_interval(secs => g * 3.1536e7 / :n) - interval '1 hour',
       CASE WHEN g % 20 = 0 THEN 1 ELSE 0 END, 4, CASE WHEN g % 20 = 0 THEN g - 1 END, g % 20 = 0,
       CASE WHEN g % 10 = 0 THEN 'server_error' END
FROM generate_series(1, :n) g
"""
RUNNING = """
INSERT INTO crawl_jobs (job_id, keyword, site, state, started_at, options, owner_id, proxy_pool, updated_at)
SELECT :first + g, (:queries)[1 + g % 10], (:places)[1 + (g / 7) % 10], 'active', :start - make_interval(secs => g % :spread),
       jsonb_build_object('max_pages', 1 + g % 9), g % 997, 'eu-' || g % 3, :start - make_interval(secs => g % :spread)
FROM generate_series(1, :n) g
"""
INPUTS = "keyword, site, options, owner_id, pages, proxy_pool, priority"
FLOOR = f"""
WITH failed AS (
    UPDATE crawl_jobs
    SET state = 'error', finished_at = :now, max_retries = :budget, next_retry_at = :due,
        failure_pattern = 'stuck',
        error_summary = to_jsonb('Run stuck for '
            || to_char(round((extract(epoch FROM :now - started_at) / 3600)::numeric, 1), 'FM999990.0')
            || 'h - retry ' || (retry_count + 1) || '/' || :budget || ' scheduled')
    WHERE state = 'active' AND started_at < :cutoff
    RETURNING *
)
INSERT INTO crawl_jobs (job_id, {INPUTS}, state, retry_count, max_retries, next_retry_at, original_run_id, is_retry,
                        updated_at)
SELECT nextval(pg_get_serial_sequence('crawl_jobs', 'job_id')), {INPUTS}, 'wait', retry_count + 1, max_retries,
       next_retry_at, coalesce(original_run_id, job_id), true, :now
FROM failed
"""


def build_template(server_url: str, name: str, *, history: int, stuck: int, now: datetime) -> str:
    """The adopted table, filled like `data.build_template` fills the default one, then migrated."""
    with data.admin(server_url).connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = data.database_url(server_url, name)
    engine = make_engine(url)
    params = {"queries": data.QUERIES, "places": data.PLACES, "now": now}
    with engine.begin() as conn:
        conn.exec_driver_sql(TABLE)
        conn.execute(sa.text(HISTORY), {**params, "n": history})
        live = {**params, "n": data.LIVE_RUNS, "start": now, "spread": 3000, "first": history}
        conn.execute(sa.text(RUNNING), live)
        stuck_params = {**params, "n": stuck, "start": now - timedelta(minutes=90), "spread": 12600}
        conn.execute(sa.text(RUNNING), {**stuck_params, "first": history + data.LIVE_RUNS})
        conn.exec_driver_sql("ALTER TABLE crawl_jobs ADD PRIMARY KEY (job_id)")
        conn.exec_driver_sql("CREATE SEQUENCE crawl_jobs_job_id_seq OWNED BY crawl_jobs.job_id")
        conn.exec_driver_sql("ALTER TABLE crawl_jobs ALTER job_id SET DEFAULT nextval('crawl_jobs_job_id_seq')")
        conn.exec_driver_sql("SELECT setval('crawl_jobs_job_id_seq', (SELECT max(job_id) FROM crawl_jobs))")
    migrate(engine, "crawl_jobs", layout=LAYOUT, extend_check=True)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE crawl_jobs")
    engine.dispose()
    return url


ENV = {
    "SCRAPE_RUNS_TABLE": "crawl_jobs",
    "COLUMN_MAP": "id=job_id,status=state,completed_at=finished_at,error_message=error_summary",
    "STATUS_MAP": "running=active,completed=success,failed=error,pending_retry=wait,cancelled=skipped",
    "RUN_LABEL": "{keyword} on {site}",
}


def ours(url: str, judge: datetime) -> contenders.Timing:
    """`sweep_stuck_runs` in-process, the logger removed, as `contenders.ours` measures the default table."""
    logger.remove()
    rt = Runtime.open(Settings(database_url=url, table="crawl_jobs", layout=LAYOUT), clock=contenders.FixedClock(judge))
    try:
        started = time.perf_counter()
        result = sweep_stuck_runs(rt)
        return contenders.Timing("ours", time.perf_counter() - started, result.failed)
    finally:
        rt.close()


def failed_as_stuck(url: str) -> int:
    return outcome(url, "crawl_jobs", "state", "wait")[0]


def outcome(url: str, table: str, status: str, pending: str) -> tuple[int, int]:
    engine = make_engine(url)
    with engine.connect() as conn:
        counts = conn.execute(
            sa.text(
                f"SELECT count(*) FILTER (WHERE failure_pattern = 'stuck'), count(*) FILTER (WHERE {status} = :p) "
                f"FROM {table}"
            ),
            {"p": pending},
        ).one()
    engine.dispose()
    return tuple(counts)


def compare(server_url: str, *, history: int, stuck: int, repeat: int) -> dict:
    """Ours and the floor on both tables, interleaved, `repeat` times each on fresh copies."""
    now = data.bench_now()
    judge = now + timedelta(minutes=1)
    templates = {
        "default": data.build_template(server_url, "bench_tpl_default", history=history, stuck=stuck, now=now),
        "adopted": build_template(server_url, "bench_tpl_adopted", history=history, stuck=stuck, now=now),
    }
    out = str(Path(tempfile.gettempdir()) / "bench-adopted-check.out")
    plan = [
        ("default", "floor", contenders.floor),
        ("default", "ours", lambda url, at: contenders.ours(url, at)),
        ("default", "command", lambda url, at: contenders.command(url, at, out=out)),
        ("adopted", "floor", lambda url, at: contenders.floor(url, at, sql=FLOOR)),
        ("adopted", "ours", ours),
        ("adopted", "command", lambda url, at: contenders.command(url, at, out=out, env=ENV, count=failed_as_stuck)),
    ]
    times: dict[tuple[str, str], list[float]] = {(t, n): [] for t, n, _ in plan}
    outcomes = {}
    for _ in range(repeat):
        for table, name, contender in plan:
            url, db = data.copy_of(server_url, data.make_url(templates[table]).database)
            try:
                timing = contender(url, judge)
                shape = (
                    ("scrape_runs", "status", "pending_retry")
                    if table == "default"
                    else ("crawl_jobs", "state", "wait")
                )
                outcomes[(table, name)] = outcome(url, *shape)
            finally:
                data.drop(server_url, db)
            times[(table, name)].append(timing.seconds)
            print(f"  {table:<8} {name:<6} {timing.seconds:8.3f}s  failed={timing.failed}", flush=True)
    for name in templates:
        data.drop(server_url, f"bench_tpl_{name}")
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "history": history,
        "stuck": stuck,
        "repeat": repeat,
        "seconds": {f"{t}/{n}": round(v, 4) for (t, n), v in median.items()},
        "all_seconds": {f"{t}/{n}": [round(x, 4) for x in v] for (t, n), v in times.items()},
        "default_ours_over_floor": round(median[("default", "ours")] / median[("default", "floor")], 2),
        "adopted_ours_over_floor": round(median[("adopted", "ours")] / median[("adopted", "floor")], 2),
        "default_command_over_floor": round(median[("default", "command")] / median[("default", "floor")], 2),
        "adopted_command_over_floor": round(median[("adopted", "command")] / median[("adopted", "floor")], 2),
        "outcomes": {f"{t}/{n}": list(v) for (t, n), v in outcomes.items()},
        # The command judges by the real clock (its hours differ); every contender fails the same runs.
        "same_outcome": len(set(outcomes.values())) == 1,
    }
