"""Scheduling on a real Scrapyd (SPEC §16) that queues jobs and never starts them (a poll interval of
an hour): what was scheduled, and how often, is read from its pending queue by job id, and no
spider process costs the suite anything. Three stuck-runs processes at once, Scrapyd killed and
restarted under them; every adopted table shape; the run's priority; bad settings refused in one
line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.migrate import migrate
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.settings.scrapyd_parsers import ScrapydUrl
from jobs.stuck import sweep_stuck_runs
from tests.adopted import ADOPTABLE, Adopted
from tests.cli import REPO
from tests.daemons import wait_until
from tests.helpers import insert_due_retry, make_runtime
from tests.integration.test_cli import cli, one_line_error
from tests.integration.test_index_predicates import layout_of
from tests.integration.test_scrapyd import hooked
from tests.scrapyd_fleet import PROJECT, start_scrapyd


@pytest.fixture(scope="module")
def scrapyd(tmp_path_factory):
    # One process at most: a restarted Scrapyd starts what it had queued (its first poll is at once).
    server = start_scrapyd(tmp_path_factory.mktemp("scrapyd-queue"), poll_interval=3600, max_proc=1)
    yield server
    server.stop()


def env_for(scrapyd, db_url: str, **more: str) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "SCRAPYD_URL": scrapyd.url,
        "SCRAPYD_PROJECT": PROJECT,
        "SCRAPYD_SPIDER": "rows",
        "SCRAPYD_ARGS": "mode={search_query}",
        **more,
    }


def runtime_on(scrapyd_url: str, db_url: str, cap: int, **more):
    """A runtime that hands retries to the Scrapyd at `scrapyd_url`, at most `cap` at once."""
    return make_runtime(
        db_url,
        policy=RetryPolicy(),
        max_concurrent_retries=cap,
        scrapyd_url=ScrapydUrl(scrapyd_url),
        scrapyd_project=PROJECT,
        scrapyd_spider="rows",
        **more,
    )


def test_the_runs_priority_travels_to_scrapyd(db_url, scrapyd):
    """COLUMN_MAP's priority (here user_id) becomes schedule.json's `priority`: Scrapyd's queue
    lists (and starts) the highest first."""
    with sa.create_engine(db_url).begin() as conn:
        ids = {str(insert_due_retry(conn, search_query=f"p{p}", user_id=p)[1]): p for p in (3, 9, 1)}
    rt = runtime_on(
        scrapyd.url, db_url, 3, layout=layout_of(ADOPTABLE[-1]).__class__({"priority": "user_id"}, {}, None)
    )
    try:
        assert process_due_retries(rt).handed_off == 3
    finally:
        rt.close()
    pending = [job for job in scrapyd.jobs()["pending"] if job in ids]
    assert [ids[job] for job in pending] == [9, 3, 1]


def test_each_thread_schedules_through_a_connection_of_its_own_kept_alive(db_url, scrapyd):
    """A client per thread that calls Scrapyd, as the webhook's (jobs/executors/senders.py
    ClientPerThread): no connection serves two threads (one pooled client shared by a pass's 100
    senders spent more of the process's CPU in its pool's bookkeeping than in the calls, CPU that
    Scrapyd's one thread on the same cores then lacked), and each stays open from one job to the next."""
    with sa.create_engine(db_url).begin() as conn:
        for _ in range(24):
            insert_due_retry(conn, search_query="leave")
    rt = runtime_on(scrapyd.url, db_url, 4)
    threads_of = defaultdict(set)  # a connection (its local port) -> the threads that called through it

    def seen(response) -> None:
        port = response.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
        threads_of[port].add(threading.get_ident())

    hooked(rt.executor, "response", seen)
    try:
        # Each handed over is `running` for the pass's lanes to count: the cap frees no slot, so one
        # pass hands 4; the next passes the next 4 (the rows finished between them, as a fleet's).
        for _ in range(6):
            assert process_due_retries(rt).handed_off == 4
            with rt.engine.begin() as conn:
                conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE status = 'running'"))
    finally:
        rt.close()
    assert sum(map(len, threads_of.values())) == len(threads_of), dict(threads_of)  # one thread a connection
    assert len(threads_of) <= 8  # kept alive: 24 jobs through a handful of connections, not one each


@pytest.mark.parametrize("adopted", ADOPTABLE, ids=lambda a: a.name)
def test_every_adopted_table_hands_its_retries_to_scrapyd(databases, scrapyd, adopted: Adopted):
    url = databases.create()
    engine = make_engine(url)
    layout = layout_of(adopted)
    steer = f"ok-{uuid.uuid4().hex[:6]}"  # integer ids repeat from one database to the next: told apart by this
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(adopted.ddl)
        migrate(engine, adopted.table, None, layout, extend_check=adopted.check_guarded)
        with engine.begin() as conn:
            adopted.insert(
                conn, steer, status=adopted.running[0], started_at=datetime.now(timezone.utc) - timedelta(days=1)
            )
        rt = make_runtime(
            url,
            policy=RetryPolicy(retry_delay=timedelta(0)),
            table=adopted.table,
            layout=layout,
            scrapyd_url=ScrapydUrl(scrapyd.url),
            scrapyd_project=PROJECT,
            scrapyd_spider="rows",
            scrapyd_args=(("mode", "{" + adopted.steer + "}"), ("run", "{run_id}")),
        )
        try:
            assert sweep_stuck_runs(rt).failed == 1
            [outcome] = process_due_retries(rt).executed
            assert outcome.status == "handed_off", outcome
            with engine.connect() as conn:
                status = conn.execute(
                    sa.text(f'SELECT "{adopted.status}"::text FROM {adopted.quoted} WHERE "{adopted.id}"::text = :id'),
                    {"id": str(outcome.run_id)},
                ).scalar_one()
        finally:
            rt.close()
    finally:
        engine.dispose()
    assert status == adopted.running[0]
    [job] = [
        job for job in scrapyd.api("listjobs.json", project=PROJECT)["pending"] if job["args"].get("mode") == steer
    ]
    assert (job["id"], job["args"]["run"]) == (str(outcome.run_id), str(outcome.run_id))


@pytest.mark.parametrize(
    ("more", "said"),
    [
        (
            {"SCRAPYD_URL": "ftp://scrapyd.internal:6800"},
            "SCRAPYD_URL='ftp://scrapyd.internal:6800' is not an http(s) URL",
        ),
        ({"SCRAPYD_ARGS": "q={nosuch}"}, "SCRAPYD_ARGS: {nosuch} is not a column of"),
        ({"SCRAPYD_SPIDER": "{site}_spider"}, "SCRAPYD_SPIDER: {site} is not a column of"),
        ({"SCRAPE_RUN_WEBHOOK": "http://fleet.internal/r/{run_id}"}, "SCRAPE_RUN_WEBHOOK and SCRAPYD_URL are both set"),
        ({"SCRAPYD_PROJECT": ""}, "SCRAPYD_URL is set but SCRAPYD_PROJECT is not"),
        ({"SCRAPYD_USERNAME": "ops"}, "SCRAPYD_PASSWORD is not set"),
    ],
)
def test_bad_scrapyd_settings_are_one_line_exit_2_nothing_touched(db_url, scrapyd, more, said):
    with sa.create_engine(db_url).begin() as conn:
        retry = insert_due_retry(conn)[1]
    env = env_for(scrapyd, db_url, **more)
    env["SCRAPYD_URL"] = env["SCRAPYD_URL"].replace("//", "//ops:pw-s3cret@", 1)
    if "SCRAPYD_USERNAME" in more:
        env["SCRAPYD_URL"] = scrapyd.url
    result = cli("process", env=env)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert said in line, line
    assert "pw-s3cret" not in result.stdout + result.stderr
    with sa.create_engine(db_url).connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM scrape_runs WHERE id = :id"), {"id": retry}).scalar_one() == (
            "pending_retry"
        )


def due_postponed_now(db_url: str) -> None:
    """The outage is over: what Scrapyd could not take is due now (as an operator makes it), not
    after its postponement's backoff of a minute."""
    with sa.create_engine(db_url).begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET next_retry_at = now() WHERE status = 'pending_retry'"))


@pytest.mark.slow
def test_scrapyd_killed_while_three_processes_schedule_then_restarted_schedules_nothing_twice(db_url, scrapyd):
    """kill -9 of Scrapyd with schedule.json calls in flight: a call Scrapyd committed but never
    answered is postponed like one it never got; delivered again, it is scheduled only if Scrapyd
    (its queue kept on disk) knows no job of its id. Nothing twice, nothing stranded."""
    count = 150
    with sa.create_engine(db_url).begin() as conn:
        retries = {str(insert_due_retry(conn, search_query=f"k{i}")[1]) for i in range(count)}
    env = {**os.environ, **env_for(scrapyd, db_url), "MAX_CONCURRENT_RETRIES": str(count), "LOG_LEVEL": "ERROR"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "scheduler", "process"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    wait_until(lambda: len(retries & set(scrapyd.jobs()["pending"])) >= 10, timeout=60, every=0.02)
    scrapyd.kill()
    scrapyd.start()
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    # The restarted Scrapyd starts one job it had queued (max_proc 1, its first poll at once; the
    # next in an hour): its spider ends without writing, the row's attempt fails, and its retry is
    # handed over in turn. Once it ended, what was postponed is delivered again.
    wait_until(lambda: scrapyd.jobs()["finished"], timeout=60)
    for _ in range(3):
        due_postponed_now(db_url)
        assert cli("process", env={**env_for(scrapyd, db_url), "MAX_CONCURRENT_RETRIES": str(count)}).returncode == 0
    jobs = scrapyd.jobs()  # a job counted wherever it is
    scheduled = Counter(job for state in ("pending", "running", "finished") for job in jobs[state] if job in retries)
    assert set(scheduled) == retries  # none stranded
    assert [job for job, n in scheduled.items() if n > 1] == []  # none twice
    with sa.create_engine(db_url).connect() as conn:
        states = conn.execute(
            sa.text("SELECT id::text, status, error_message FROM scrape_runs WHERE id::text = ANY(:ids)"),
            {"ids": list(retries)},
        ).all()
    for run_id, status, error in states:
        if run_id in jobs["finished"]:
            assert status == "failed" and error.startswith(f"Scrapyd job {run_id} finished without"), (status, error)
        else:
            assert status == "running", (run_id, status, error)
