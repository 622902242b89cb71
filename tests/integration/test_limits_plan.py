"""The idle sweep stays an index probe with SPEC §14's limits on: kinds configured and learned,
runs with their own `max_runtime`, progress kept. On a table of 200,000 ended runs beside a few
hundred running ones, the plan of the sweep's batch reads the running runs' partial index and
never scans the table (a predicate the index cannot serve turns it into a Seq Scan)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.arrays import ArrayLiteral
from db.layout import Layout, parse_column_map
from jobs.limits import LearnedLimit, Limits, runtime_judging_params
from jobs.stuck import sweep_params
from tests.conftest import Databases
from tests.helpers import make_runtime

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
LIMITS = Limits(
    default=timedelta(hours=1),
    configured={"jobs_de": timedelta(minutes=15), "sitemap_full": timedelta(hours=8)},
    learned={"jobs_fr": LearnedLimit(timedelta(minutes=40), 412, NOW)},
)


@pytest.fixture(scope="module")
def big_url(server_url, templates):
    """One table of 200,000 runs for the module's tests, which only read its plans."""
    databases = Databases(server_url)
    url = databases.create(templates["text_tz"])
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD COLUMN spider TEXT, ADD COLUMN budget INTERVAL, ADD COLUMN items BIGINT"
        )
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at, spider,"
                " budget, items) SELECT 'q' || g, 'x', CASE WHEN g <= 300 THEN 'running' ELSE 'completed' END,"
                " :now - g * interval '1 minute' / 1000, CASE WHEN g > 300 THEN :now END,"
                " (ARRAY['jobs_de', 'jobs_fr', 'sitemap_full', 'other'])[1 + g % 4],"
                " CASE WHEN g % 7 = 0 THEN interval '2 hours' END, g FROM generate_series(1, 200000) g"
            ),
            {"now": NOW},
        )
        conn.exec_driver_sql("ANALYZE scrape_runs")
    engine.dispose()
    yield url
    databases.drop_all()


def big_table(url: str, heartbeat: bool, roles: str = "kind=spider,max_runtime=budget,progress=items"):
    layout = Layout(columns=parse_column_map(roles))
    return make_runtime(url, layout=layout, heartbeat_column="updated_at" if heartbeat else None)


def plan_of(rt, statement, *, limits: Limits = LIMITS, options: str = "COSTS OFF") -> str:
    """EXPLAIN (`options`) of one of the sweep's statements, bound as the sweep binds it."""
    compiled = statement.compile(dialect=rt.engine.dialect)
    arrays = {name for name, bind in compiled.binds.items() if isinstance(bind.type, ArrayLiteral)}
    params = {
        **compiled.params,
        **sweep_params(rt.settings.policy),
        **runtime_judging_params(rt, limits, NOW),
        "sr_cutoff": NOW - limits.default,
        "sr_limit": 1000,
        "sr_keep": 200,
        "sr_from": datetime(1, 1, 2, tzinfo=timezone.utc),
    }
    params = {k: ArrayLiteral().process_bind_param(v, None) if k in arrays else v for k, v in params.items()}
    with rt.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN ({options}) {compiled}", params).scalars().all()
        conn.rollback()
    return "\n".join(rows)


@pytest.mark.parametrize("heartbeat", [False, True], ids=["started_at", "heartbeat"])
def test_the_idle_sweep_with_every_limit_on_reads_the_running_index_only(big_url, heartbeat):
    rt = big_table(big_url, heartbeat)
    try:
        for statement in (rt.queries.sweep_batch, rt.queries.stuck_preview, rt.queries.counts()):
            plan = plan_of(rt, statement)
            assert "Seq Scan on scrape_runs" not in plan, plan
            assert "ix_scrape_runs_running_started_at" in plan, plan
    finally:
        rt.close()


def test_without_own_limits_the_idle_sweep_is_a_range_probe_from_the_smallest_limit(big_url):
    # Without the max_runtime and progress roles (a run's own limit or a stalled counter may be
    # due whatever its start) no run is stuck before the smallest limit in force (15m here): the
    # index is entered at `started_at < now - 15m`, not walked whole.
    rt = big_table(big_url, False, roles="kind=spider")
    try:
        plan = plan_of(rt, rt.queries.stuck_batch)
    finally:
        rt.close()
    assert "Index Cond: (started_at < ('2026-11-22 09:00:00+00'::timestamp with time zone - '00:15:00'" in plan, plan
