"""Retries through a real Scrapyd (SPEC §16), started once for this module on loopback with the
tiny project of tests/scrapyd_project, whose spider writes its row's outcome at once, hangs, dies
or ends without writing. Scrapyd runs each job as a real `scrapy crawl` process."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import sqlalchemy as sa
from loguru import logger
from sqlalchemy.engine import make_url

from jobs.executors.base import Cancels
from jobs.executors.scrapyd import ScrapydExecutor, Unanswered, ended_message
from jobs.executors.senders import ClientPerThread
from jobs.model import Run
from jobs.retries import RetryDispatcher, process_due_retries
from jobs.rules import RetryPolicy
from jobs.settings.scrapyd_parsers import ScrapydUrl
from tests.cli import run
from tests.daemons import wait_until
from tests.helpers import insert_due_retry, insert_run, make_runtime
from tests.scrapyd_fleet import PROJECT, free_port, start_scrapyd

POLICY = RetryPolicy(retry_delay=timedelta(hours=4), stuck_after=timedelta(hours=1))


@pytest.fixture(scope="module")
def scrapyd(tmp_path_factory):
    server = start_scrapyd(tmp_path_factory.mktemp("scrapyd"), poll_interval=0.1)
    yield server
    server.stop()


def dsn(db_url: str) -> str:
    """The database as the spider's psycopg2 connects to it."""
    return make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)


def settings_for(scrapyd, db_url: str, **more) -> dict:
    return {
        "scrapyd_url": ScrapydUrl(scrapyd.url),
        "scrapyd_project": PROJECT,
        "scrapyd_spider": "rows",
        "scrapyd_args": (("mode", "{search_query}"), ("db", dsn(db_url))),
        **more,
    }


@pytest.fixture
def opened():
    runtimes = []

    def open_runtime(db_url, scrapyd, **settings):
        runtimes.append(make_runtime(db_url, policy=POLICY, **settings_for(scrapyd, db_url, **settings)))
        return runtimes[-1]

    yield open_runtime
    for rt in runtimes:
        rt.close()


def env_for(scrapyd, db_url: str, **more: str) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "SCRAPYD_URL": scrapyd.url,
        "SCRAPYD_PROJECT": PROJECT,
        "SCRAPYD_SPIDER": "rows",
        "SCRAPYD_ARGS": f"mode={{search_query}},db={dsn(db_url)}",
        **more,
    }


def hooked(executor, event: str, hook) -> None:
    """`hook` on every `event` ("request", "response") of each client `executor` makes from now on:
    its clients are a thread's own, so every thread gets a new one, hooked; the old ones close."""
    unhooked = executor.clients

    def make():
        client = unhooked.make()
        client.event_hooks[event].append(hook)
        return client

    executor.clients = ClientPerThread(make)
    unhooked.close()


def due(db_url: str, *modes: str) -> list:
    with sa.create_engine(db_url).begin() as conn:
        return [insert_due_retry(conn, search_query=mode)[1] for mode in modes]


def rows(rt, ids) -> dict:
    with rt.engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT id, status, error_message, handed_off, delivering_by FROM scrape_runs WHERE id = ANY(:ids)"
            ),
            {"ids": list(ids)},
        )
        return {r.id: r for r in found}


def test_a_spider_that_writes_its_outcome_at_once_keeps_it(db_url, scrapyd, opened):
    """The job's id is the retry's id, and the spider writes `completed ... WHERE status = 'running'`
    the moment it starts: the row reads `running` before schedule.json (committed at the mark)."""
    retries = due(db_url, "write", "write")
    rt = opened(db_url, scrapyd, max_concurrent_retries=2)
    assert process_due_retries(rt).handed_off == 2
    wait_until(lambda: {r.status for r in rows(rt, retries).values()} == {"completed"}, timeout=30)
    listed = scrapyd.jobs()  # one answer: a job ending between two calls would be in neither list
    assert {str(r) for r in retries} <= set(listed["finished"] + listed["running"])
    assert all(r.delivering_by is None and r.handed_off == "scrapyd" for r in rows(rt, retries).values())


def test_a_job_that_ended_without_writing_or_is_unknown_is_a_failed_attempt(db_url, scrapyd, opened):
    """A spider that ended without writing, one killed mid-run, and a job Scrapyd no longer knows
    (handed over before a restart): each a failed attempt with §16's message, chain continued, in
    one pass with one listjobs.json. A retry still being delivered is not judged."""
    left, died = due(db_url, "leave", "die")
    rt = opened(db_url, scrapyd, max_concurrent_retries=2)
    assert process_due_retries(rt).handed_off == 2
    wait_until(lambda: {str(left), str(died)} <= set(scrapyd.jobs()["finished"]), timeout=30)
    with rt.engine.begin() as conn:
        forgotten = insert_run(conn, started_at=datetime.now(timezone.utc), handed_off="scrapyd")
        in_flight = insert_run(
            conn,
            started_at=datetime.now(timezone.utc),
            handed_off="scrapyd",
            delivering_by="elsewhere",
            delivering_until=datetime.now(timezone.utc) + timedelta(minutes=1),
        )
    calls = []
    hooked(rt.executor, "request", lambda request: calls.append(request.url.path))
    result = process_due_retries(rt)
    assert sorted(str(o.run_id) for o in result.executed) == sorted(map(str, (left, died, forgotten)))
    assert calls.count("/listjobs.json") == 1
    found = rows(rt, (left, died, forgotten, in_flight))
    for run_id in (left, died, forgotten):
        assert found[run_id].status == "failed"
        assert (
            found[run_id].error_message
            == f"{ended_message(run_id)} - retry {2 if run_id != forgotten else 1}/4 scheduled"
        )
    assert found[in_flight].status == "running"


def test_an_unknown_spider_is_a_configuration_error_said_once_the_retry_untouched(db_url, scrapyd):
    [retry] = due(db_url, "write")
    with sa.create_engine(db_url).connect() as conn:
        before = conn.execute(sa.text("SELECT * FROM scrape_runs WHERE id = :id"), {"id": retry}).mappings().one()
    result = run(["process"], env=env_for(scrapyd, db_url, SCRAPYD_SPIDER="nope"))
    assert result.returncode == 2, result.stderr
    assert (result.stdout + result.stderr).count("spider 'nope' not found") == 1, result.stderr
    assert "Traceback" not in result.stderr
    with sa.create_engine(db_url).connect() as conn:
        after = conn.execute(sa.text("SELECT * FROM scrape_runs WHERE id = :id"), {"id": retry}).mappings().one()
    kept = ("status", "next_retry_at", "postponements", "retry_count", "max_retries", "handed_off", "delivering_by")
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}


def test_scrapyd_unreachable_puts_the_retry_back_with_no_budget_spent(db_url, scrapyd, opened):
    [retry] = due(db_url, "write")
    rt = opened(db_url, scrapyd, scrapyd_url=ScrapydUrl(f"http://127.0.0.1:{free_port()}"))
    [outcome] = process_due_retries(rt).executed
    assert outcome.status == "postponed" and "Scrapyd unreachable" in outcome.message
    with rt.engine.connect() as conn:
        status, postponements, due_at = conn.execute(
            sa.text("SELECT status, postponements, next_retry_at FROM scrape_runs WHERE id = :id"), {"id": retry}
        ).one()
    assert (status, postponements) == ("pending_retry", 1)
    assert due_at > datetime.now(timezone.utc) + timedelta(seconds=50)


def test_a_dead_delivery_is_scheduled_again_only_when_scrapyd_knows_no_such_job(db_url, scrapyd, opened):
    """Two retries whose delivering process died (lease run out, still marked): Scrapyd has the
    first one's job already (it was scheduled before the process died), so only the second is
    scheduled; both end confirmed."""
    scheduled, lost = due(db_url, "leave", "leave")
    with sa.create_engine(db_url).begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE scrape_runs SET status = 'running', started_at = now(), handed_off = 'scrapyd', "
                "delivering_by = 'dead', delivering_until = now() - interval '1 second' WHERE id = ANY(:ids)"
            ),
            {"ids": [scheduled, lost]},
        )
    form = {"project": PROJECT, "spider": "rows", "jobid": str(scheduled), "mode": "hang"}
    assert httpx.post(f"{scrapyd.url}/schedule.json", data=form).json()["status"] == "ok"
    rt = opened(db_url, scrapyd)
    calls = []
    hooked(rt.executor, "request", lambda request: calls.append(request.url.path))
    assert process_due_retries(rt).handed_off == 2
    assert calls.count("/schedule.json") == 1
    jobs = scrapyd.jobs()
    every = jobs["pending"] + jobs["running"] + jobs["finished"]
    assert every.count(str(scheduled)) == 1 and every.count(str(lost)) == 1
    assert all(r.delivering_by is None for r in rows(rt, (scheduled, lost)).values())
    rt.executor.cancel(Run(scheduled, "running", ""), kill=True)  # its spider hangs


def test_cancel_asks_scrapyd_then_kills_a_job_that_ignores_it(db_url, scrapyd, opened):
    """A spider blocked in its code ignores cancel.json's SIGINT (Scrapy stops only between
    requests); `kill` sends SIGKILL, and Scrapyd then reports the job finished."""
    [retry] = due(db_url, "hang")
    rt = opened(db_url, scrapyd)
    assert process_due_retries(rt).handed_off == 1
    run_ = Run(retry, "running", "")
    executor = rt.executor
    assert isinstance(executor, Cancels)  # what the cancel of SPEC §16 asks an engine for
    wait_until(lambda: (scrapyd.home / f"{retry}.hanging").exists(), timeout=120)  # a Scrapy start under load
    assert executor.still_running([run_]) == [run_]
    assert "it was running" in executor.cancel(run_, kill=False)
    assert not threading.Event().wait(1.5)  # the spider's grace: it does not stop
    assert executor.still_running([run_]) == [run_]
    assert executor.cancel(run_, kill=True) == f"Scrapyd cancelled job {retry} with SIGKILL (it was running)"
    wait_until(lambda: executor.still_running([run_]) == [], timeout=10)


def test_scrapyd_unreachable_cannot_tell_whether_a_job_runs_nor_be_told_to_stop_it():
    """What the cancel pass keeps a forceful stop for the next pass on (jobs/cancelling.py)."""
    executor = ScrapydExecutor(f"http://127.0.0.1:{free_port()}", PROJECT, "spider")
    run_ = Run(uuid.uuid4(), "running", "")
    try:
        assert executor.still_running([run_]) is None
        with pytest.raises(Unanswered, match="Scrapyd unreachable"):
            executor.cancel(run_, kill=True)
    finally:
        executor.close()


def test_doctor_checks_scrapyd_its_project_and_its_spider(db_url, scrapyd):
    ok = run(["doctor"], env=env_for(scrapyd, db_url))
    [line] = [line for line in ok.stdout.splitlines() if "executor" in line]
    assert line.startswith("✓") and f"Scrapyd at {scrapyd.url}" in line and "rows" in line, line
    missing = run(["doctor"], env=env_for(scrapyd, db_url, SCRAPYD_SPIDER="nope"))
    [line] = [line for line in missing.stdout.splitlines() if "executor" in line]
    assert line.startswith("✗") and "has no spider 'nope' (it has rows)" in line, line
    assert missing.returncode != 0
    down = run(["doctor"], env=env_for(scrapyd, db_url, SCRAPYD_URL=f"http://u:s3cr3t@127.0.0.1:{free_port()}"))
    [line] = [line for line in down.stdout.splitlines() if "executor" in line]
    assert line.startswith("✗") and "Scrapyd unreachable" in line, line
    assert "s3cr3t" not in down.stdout + down.stderr


def test_a_daemons_slots_say_a_configuration_error_once(db_url, scrapyd, opened):
    """The daemon's slots meet the refused configuration at every poll: said once, again only after
    a retry went through (the error then came back)."""
    due(db_url, "write", "write")
    rt = opened(db_url, scrapyd, scrapyd_spider="nope", max_concurrent_retries=2)
    said: list[str] = []
    sink = logger.add(
        lambda message: said.append(message), level="ERROR", filter=lambda r: r["extra"].get("event") == "misconfigured"
    )
    try:
        dispatcher = RetryDispatcher(rt, POLICY)
        for slot in (0, 1, 0, 1):
            assert [o.status for o in dispatcher.work_slot(slot, threading.Event())] == ["released"]
    finally:
        logger.remove(sink)
    assert len(said) == 1 and "spider 'nope' not found" in said[0]
