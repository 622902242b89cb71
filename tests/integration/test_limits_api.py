"""SPEC §14 through the HTTP API and the pages, in process: reset-stuck without
`timeout_minutes` judges each run by its limit as `check` does (with it, one flat threshold for
the call), the overview's "stuck now" and `status`'s count agree with the sweep, and the run's
detail and page say which limit judges it and why."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from tests.helpers import insert_run
from tests.web import ADMIN, READER, InProcessWeb

ENV = {"COLUMN_MAP": "kind=spider,max_runtime=budget", "STUCK_AFTER_BY_KIND": "jobs_de=15m,sitemap=8h"}


def fleet(db_url: str) -> dict[str, object]:
    engine = sa.create_engine(db_url)
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN spider TEXT, ADD COLUMN budget INTERVAL")
        ids = {
            "short": insert_run(conn, started_at=now - timedelta(minutes=20), spider="jobs_de"),
            "long": insert_run(conn, started_at=now - timedelta(hours=3), spider="sitemap"),
            "own": insert_run(
                conn, started_at=now - timedelta(minutes=40), spider="sitemap", budget=timedelta(minutes=30)
            ),
            "plain": insert_run(conn, started_at=now - timedelta(minutes=40)),
        }
    engine.dispose()
    return ids


def test_reset_stuck_judges_each_run_by_its_limit_unless_given_a_flat_threshold(db_url):
    ids = fleet(db_url)
    web = InProcessWeb(db_url, **ENV)
    try:
        admin, reader = web.client(ADMIN), web.client(READER)
        detail = reader.get(f"/api/runs/{ids['short']}").json()["data"]["limit"]
        assert detail == {
            "seconds": 900.0,
            "source": "configured",
            "reason": "limit 0.3h, configured for spider=jobs_de",
            "stall_seconds": None,
        }
        assert reader.get(f"/api/runs/{ids['own']}").json()["data"]["limit"]["reason"] == (
            "limit 0.5h, the run's own max_runtime"
        )
        assert "Judged by: limit 8.0h, configured for spider=sitemap" in reader.get(f"/runs/{ids['long']}").text
        assert (
            reader.get("/api/status").json()["data"]["runs"]["stuck"] == 2
        )  # what the sweep will fail, not 3 by STUCK_AFTER
        listed = reader.get("/api/runs", params={"stuck": "true"}).json()["data"]
        assert {r["id"] for r in listed} == {str(ids["short"]), str(ids["own"])}  # the runs page's filter
        flat = admin.post("/api/runs/reset-stuck", params={"timeout_minutes": 30, "dry_run": "true"}).json()
        assert set(flat["run_ids"]) == {str(ids["long"]), str(ids["own"]), str(ids["plain"])}
        answer = admin.post("/api/runs/reset-stuck").json()
        assert set(answer["run_ids"]) == {str(ids["short"]), str(ids["own"])}
    finally:
        web.stop()
