"""Races and crashes with real concurrent processes against the real database."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from jobs.retries import process_due_retries, supersede_completed_chains
from tests.conftest import REPO
from tests.daemons import wait_until
from tests.helpers import insert_due_retry, make_runtime

FAKE = REPO / "tests" / "fake_scraper.py"
COMMAND = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} {{run_id}}"
pytestmark = pytest.mark.slow


def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        outputs.append(out)
    return outputs


def seed_stuck(engine: sa.Engine, count: int) -> list[str]:
    started = datetime.now(timezone.utc) - timedelta(hours=3)
    with engine.begin() as conn:
        return [
            str(r)
            for r in conn.execute(
                sa.text(
                    "INSERT INTO scrape_runs (search_query, location_query, status, started_at, config)"
                    " SELECT 'q' || g, 'Belgium', 'running', :t, jsonb_build_object('n', g)"
                    " FROM generate_series(1, :n) g RETURNING id"
                ),
                {"t": started, "n": count},
            ).scalars()
        ]


def chain_counts(engine: sa.Engine) -> dict:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                sa.text(
                    "SELECT count(*) FILTER (WHERE NOT is_retry AND status = 'failed') AS failed_roots,"
                    " count(*) FILTER (WHERE is_retry) AS retries,"
                    " count(DISTINCT original_run_id) FILTER (WHERE is_retry) AS chains_with_retry,"
                    " count(*) FILTER (WHERE status = 'running') AS running"
                    " FROM scrape_runs"
                )
            )
            .mappings()
            .one()
        )


def sweeper_at_start(db_url: str, start: Path, ready: Path, *more: str, batch: int = 5) -> subprocess.Popen:
    """A sweeping process (batches of `batch`, no sweep lock) that says when it is ready and waits for `start`."""
    return spawn(
        "-m",
        "tests.procs",
        "sweeper",
        db_url,
        "--batch",
        str(batch),
        "--no-lock",
        *more,
        "--start",
        str(start),
        "--ready",
        str(ready),
    )


def start_together(procs: list[subprocess.Popen], ready: list[Path], start: Path) -> None:
    """A real start line: `start` appears once every process says it is ready (imports done,
    runtime open), so they race from the same instant."""
    wait_until(lambda: all(path.exists() for path in ready) or any(p.poll() is not None for p in procs), timeout=60)
    assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
    start.touch()


def test_concurrent_fix_scripts_create_exactly_one_retry_per_failed_attempt(db_url, tmp_path):
    engine = make_engine(db_url)
    seed_stuck(engine, 300)
    start = tmp_path / "go"
    ready = [tmp_path / f"ready-{n}" for n in range(6)]
    env = {"DATABASE_URL": db_url, "BATCH_SIZE": "7", "SCRAPE_RUN_COMMAND": "true"}
    fixers = [
        spawn("-m", "tests.procs", "at_start", str(start), str(ready[n]), "fix", "--json", env=env) for n in range(3)
    ]
    # Batches of one: a sweep of 300 in batches of 5 had become fast enough (a prepared statement,
    # commits not waited for) that one sweeper failed all 300 before the others had seen the start.
    sweepers = [sweeper_at_start(db_url, start, ready[3 + n], "--rounds", "3", batch=1) for n in range(3)]
    start_together(fixers + sweepers, ready, start)
    fixed = [json.loads(out)["sweep"]["failed"] for out in finish(fixers)]
    swept = [json.loads(out)["failed"] for out in finish(sweepers)]
    assert sum(fixed) + sum(swept) == 300  # every stuck run failed by exactly one process
    # They did race: without the start line, one `fix` often failed all 300 before another began.
    # Which kind wins runs is the scheduler's choice (sweepers alone took all 300 once, 3 to 1).
    assert sum(1 for n in (*fixed, *swept) if n) >= 2, (fixed, swept)
    assert chain_counts(engine) == {"failed_roots": 300, "retries": 300, "chains_with_retry": 300, "running": 0}
    engine.dispose()


def test_a_scraper_completing_runs_during_sweeps_never_sees_a_completion_turned_into_a_failure(db_url, tmp_path):
    engine = make_engine(db_url)
    ids = seed_stuck(engine, 400)
    (tmp_path / "ids.json").write_text(json.dumps(ids[::2]))
    start = tmp_path / "go"
    sweepers = [sweeper_at_start(db_url, start, tmp_path / f"ready-{n}") for n in range(3)]
    scraper = spawn(
        "-m",
        "tests.procs",
        "scraper",
        db_url,
        "--ids",
        str(tmp_path / "ids.json"),
        "--start",
        str(start),
        "--ready",
        str(tmp_path / "ready-scraper"),
    )
    start_together(
        [*sweepers, scraper], [*(tmp_path / f"ready-{n}" for n in range(3)), tmp_path / "ready-scraper"], start
    )
    finish(sweepers)
    completed = json.loads(finish([scraper])[0])["completed"]
    assert len(completed) == 200
    with engine.connect() as conn:
        statuses = dict(conn.execute(sa.text("SELECT id::text, status FROM scrape_runs WHERE NOT is_retry")).all())
    assert all(statuses[run_id] == "completed" for run_id in completed)
    assert sum(1 for s in statuses.values() if s == "failed") + len(completed) == 400

    # Runs that completed after being failed supersede their pending retry; no chain keeps one.
    rt = make_runtime(db_url)
    supersede_completed_chains(rt)
    with engine.connect() as conn:
        left = conn.execute(
            sa.text(
                "SELECT count(*) FROM scrape_runs p JOIN scrape_runs r ON r.id = p.original_run_id"
                " WHERE p.status = 'pending_retry' AND r.status = 'completed'"
            )
        ).scalar_one()
        late = dict(
            conn.execute(
                sa.text(
                    "SELECT r.status, count(*) FROM scrape_runs r JOIN scrape_runs root ON root.id = r.original_run_id"
                    " WHERE root.status = 'completed' GROUP BY r.status"
                )
            ).all()
        )
    assert left == 0
    assert set(late) <= {"cancelled"}  # every retry of a run that completed late was superseded
    rt.close()
    engine.dispose()


def due_retries(engine: sa.Engine, queries: list[str]) -> list[str]:
    with engine.begin() as conn:
        return [str(insert_due_retry(conn, search_query=query)[1]) for query in queries]


def test_the_concurrency_limit_holds_across_processes_and_each_retry_runs_once(db_url, tmp_path):
    engine = make_engine(db_url)
    ids = due_retries(engine, [f"slow {i}" for i in range(6)])
    env = {
        "DATABASE_URL": db_url,
        "SCRAPE_RUN_COMMAND": COMMAND,
        "MAX_CONCURRENT_RETRIES": "2",
        "FAKE_SCRAPER_LOG": str(tmp_path),
    }
    finish([spawn("-m", "scheduler", "process", env=env) for _ in range(3)])
    records = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(records) == sorted(ids)  # each due retry executed, once
    spans = sorted((r["started"], r["ended"]) for r in records.values())
    overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlap <= 2
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE status = 'completed'")).scalar_one() == 6
    engine.dispose()


def test_a_slot_held_by_a_killed_process_is_free_at_once(db_url, tmp_path):
    engine = make_engine(db_url)
    [hung] = due_retries(engine, ["hang"])
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": COMMAND, "FAKE_SCRAPER_LOG": str(tmp_path)}
    victim = spawn("-m", "scheduler", "process", env=env)
    deadline = time.monotonic() + 30
    while not (tmp_path / f"{hung}.json").exists():
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    os.killpg(json.loads((tmp_path / f"{hung}.json").read_text())["pid"], signal.SIGKILL)

    [waiting] = due_retries(engine, ["ok next"])
    rt = make_runtime(db_url, max_concurrent_retries=1, command=("true",))
    result = process_due_retries(rt)
    assert [str(o.run_id) for o in result.executed] == [waiting]
    with engine.connect() as conn:
        # The killed process's run stays running until the stuck checker fails it.
        assert (
            conn.execute(sa.text("SELECT status FROM scrape_runs WHERE id = :id"), {"id": hung}).scalar_one()
            == "running"
        )
    rt.close()
    engine.dispose()
