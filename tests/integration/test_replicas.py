"""Several daemons and scripts on one database: nothing failed twice, retried twice or lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from tests.conftest import REPO
from tests.daemons import DaemonProcess, wait_until
from tests.helpers import insert_stuck_runs

pytestmark = pytest.mark.slow
RUNS = 1000  # enough for every process to race over batches of 50 (the chaos trial goes further)


def test_three_daemons_and_two_scripts_over_a_thousand_runs(db_url, tmp_path):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        insert_stuck_runs(conn, RUNS, datetime.now(timezone.utc) - timedelta(hours=3), user_id="g")
    executions = tmp_path / "executions.log"
    settings = {
        "SCRAPE_RUN_COMMAND": f"sh -c 'echo \"$SCRAPE_RUN_ID\" >> {executions}'",
        "RETRY_DELAY": "0s",
        "MAX_CONCURRENT_RETRIES": "4",
        "CHECK_INTERVAL": "1s",
        "PROCESS_INTERVAL": "1s",
        "DISPATCH_POLL": "0.2s",
        "BATCH_SIZE": "50",
    }
    daemons = [DaemonProcess(db_url, **settings) for _ in range(3)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": db_url, **settings}
    scripts = [
        subprocess.Popen(
            [sys.executable, "scripts/fix_stuck_runs_with_retry.py", "--json"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]

    def settled():
        with engine.connect() as conn:
            return (
                conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'completed'")).scalar_one()
                == RUNS
            )

    try:
        reports = [json.loads(script.communicate(timeout=120)[0]) for script in scripts]
        assert [script.returncode for script in scripts] == [0, 0]
        wait_until(settled, timeout=240, every=0.5)
    finally:
        logs = [daemon.stop() for daemon in daemons]
    assert all(daemon.returncode == 0 for daemon in daemons), logs
    with engine.connect() as conn:
        counts = (
            conn.execute(
                sa.text(
                    "SELECT count(*) FILTER (WHERE NOT is_retry AND status = 'failed') AS failed_roots,"
                    " count(*) FILTER (WHERE is_retry) AS retries,"
                    " count(DISTINCT original_run_id) FILTER (WHERE is_retry) AS chains_retried,"
                    " count(*) FILTER (WHERE is_retry AND status = 'completed') AS retries_completed,"
                    " count(*) FILTER (WHERE status IN ('running', 'pending_retry')) AS open"
                    " FROM scrape_runs"
                )
            )
            .mappings()
            .one()
        )
        retry_ids = set(conn.execute(sa.text("SELECT id::text FROM scrape_runs WHERE is_retry")).scalars())
    assert dict(counts) == {
        "failed_roots": RUNS,
        "retries": RUNS,
        "chains_retried": RUNS,
        "retries_completed": RUNS,
        "open": 0,
    }
    executed = executions.read_text().split()
    assert len(executed) == RUNS and set(executed) == retry_ids  # every due retry executed exactly once
    with engine.connect() as conn:
        by_daemons = conn.execute(
            sa.text(
                "SELECT coalesce(sum((counts->>'failed')::int), 0) FROM stuck_runs_job_runs"
                " WHERE job_id = 'stuck_run_checker' AND daemon_id IS NOT NULL"
            )
        ).scalar_one()
        by_scripts = conn.execute(
            sa.text(
                "SELECT coalesce(sum((counts->>'failed')::int), 0) FROM stuck_runs_job_runs"
                " WHERE job_id = 'stuck_run_checker' AND daemon_id IS NULL"
            )
        ).scalar_one()
    assert by_daemons + sum(r["sweep"]["failed"] for r in reports) == RUNS  # each stuck run failed by one process
    assert by_scripts == sum(r["sweep"]["failed"] for r in reports)  # the scripts' runs are recorded too
    engine.dispose()
