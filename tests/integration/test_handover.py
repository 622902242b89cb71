"""The hand-over of SPEC §12 (amended): the retry is committed `running` and marked as being
delivered before the POST, delivered with no database session held, then confirmed or put back,
each a conditional write that leaves standing what the fleet wrote meanwhile.

The receivers answer from a thread of the test process (tests/receiver.py's server, script and
fleet): what is tested is the hand-over's side; a receiver process is test_handoff_daemons' and
test_webhook's."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.errors import CancelRefused, RetryRefused
from jobs.control import cancel_run
from jobs.executors.outcome import Failed, OutcomeUnknown, Postponed
from jobs.executors.webhook import payload
from jobs.manual import retry_run
from jobs.model import Run
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.stuck import sweep_stuck_runs
from tests.daemons import wait_until
from tests.helpers import insert_due_retry, make_runtime, row
from tests.receiver import start_threaded_receiver

POLICY = RetryPolicy(retry_delay=timedelta(hours=4), stuck_after=timedelta(hours=1))


@pytest.fixture
def opened():
    runtimes = []

    def open_runtime(db_url, receiver, **settings):
        settings = {"webhook_timeout": timedelta(seconds=2), **settings}
        policy = settings.pop("policy", POLICY)
        runtimes.append(make_runtime(db_url, webhook=receiver.url + "/r/{run_id}", policy=policy, **settings))
        return runtimes[-1]

    yield open_runtime
    for rt in runtimes:
        rt.close()


def due_retries(db_url, count: int) -> list:
    with sa.create_engine(db_url).begin() as conn:
        return [insert_due_retry(conn, search_query=f"q{i}")[1] for i in range(count)]


def test_a_fleet_that_writes_its_outcome_at_once_keeps_it(db_url, tmp_path, opened):
    """The fleet writes `completed ... WHERE status = 'running'` before it even answers: the row
    must already read `running` (committed before the POST), or the write matches nothing."""
    retries = due_retries(db_url, 30)
    receiver = start_threaded_receiver(tmp_path, database_url=db_url, table="scrape_runs", at_once=True)
    try:
        rt = opened(db_url, receiver, max_concurrent_retries=30)
        result = process_due_retries(rt)
    finally:
        receiver.stop()
    assert result.handed_off == 30
    assert [e["event"] for e in receiver.events()] == ["completed"] * 30
    with rt.engine.connect() as conn:
        found = conn.execute(sa.text("SELECT status FROM scrape_runs WHERE is_retry")).scalars().all()
        assert found == ["completed"] * len(retries)  # not one left `running`, its outcome lost
        marked = conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE delivering_until IS NOT NULL"))
        assert marked.scalar_one() == 0  # every delivery confirmed


def test_postponements_back_off_from_a_minute_doubling_capped_by_the_retry_delay(db_url, tmp_path, opened):
    receiver = start_threaded_receiver(tmp_path, script={"default": "503"})
    try:
        rt = opened(db_url, receiver)
        [retry] = due_retries(db_url, 1)
        waits = []
        for _ in range(3):
            before = datetime.now(timezone.utc)
            with rt.engine.begin() as conn:  # due again now: the next pass delivers it
                conn.execute(sa.text("UPDATE scrape_runs SET next_retry_at = now() WHERE id = :id"), {"id": retry})
            assert [o.status for o in process_due_retries(rt).executed] == ["postponed"]
            with rt.engine.connect() as conn:
                kept = row(conn, retry)
            waits.append(round((kept["next_retry_at"] - before).total_seconds() / 60))
        assert waits == [1, 2, 4] and kept["postponements"] == 3 and kept["retry_count"] == 1
        # RETRY_DELAY=0 caps it, but never under a minute.
        zero = opened(db_url, receiver, policy=RetryPolicy(retry_delay=timedelta(0)))
        before = datetime.now(timezone.utc)
        with rt.engine.begin() as conn:
            conn.execute(sa.text("UPDATE scrape_runs SET next_retry_at = now() WHERE id = :id"), {"id": retry})
        process_due_retries(zero)
        with rt.engine.connect() as conn:
            kept = row(conn, retry)
        assert timedelta(seconds=55) <= kept["next_retry_at"] - before <= timedelta(seconds=70)
    finally:
        receiver.stop()


def _delivering(db_url, tmp_path, opened):
    """A retry whose delivery is in flight (the receiver hangs 8 s), and the runtime delivering it."""
    receiver = start_threaded_receiver(tmp_path, script=["hang:8"])
    rt = opened(db_url, receiver, webhook_timeout=timedelta(seconds=10))
    [retry] = due_retries(db_url, 1)
    worker = threading.Thread(target=process_due_retries, args=(rt,), daemon=True)
    worker.start()
    wait_until(lambda: receiver.requests(), timeout=20)
    return receiver, rt, retry, worker


def test_an_action_on_a_retry_being_delivered_is_refused_at_once_with_when_to_try_again(db_url, tmp_path, opened):
    from tests.integration.test_cli import cli
    from tests.web import ADMIN, InProcessWeb

    web = InProcessWeb(db_url)  # up before the delivery starts: its 8 s are for the actions
    receiver, rt, retry, worker = _delivering(db_url, tmp_path, opened)
    try:
        with web.client(ADMIN) as http:
            started = time.monotonic()
            answers = [http.post(f"/api/runs/{retry}/{action}") for action in ("cancel", "retry")]
            assert time.monotonic() - started < 2  # not the statement timeout's 5 s per action
        for answer in answers:
            body = answer.json()
            assert answer.status_code == 409, answer.text
            assert body["error"] == "Run is being delivered to the fleet"
            assert (
                1 <= body["details"]["retryAfterSeconds"] <= 45
            )  # the lease: 5 s connect, 10 s, 30 s margin and "try again in" in body["details"]["reason"]
        started = time.monotonic()
        with pytest.raises(CancelRefused, match=r"being delivered to the fleet .*: try again in \d+s"):
            cancel_run(rt, retry)
        with pytest.raises(RetryRefused, match=r"being delivered to the fleet .*: try again in \d+s"):
            retry_run(rt, retry)
        assert time.monotonic() - started < 2
        started = time.monotonic()
        said = cli("cancel", str(retry), env={"DATABASE_URL": db_url}, timeout=30)
        assert time.monotonic() - started < 6  # an interpreter's start, not the delivery's 8 s
        assert said.returncode != 0 and "being delivered to the fleet" in said.stderr + said.stdout
        assert "try again in" in said.stderr + said.stdout and "Traceback" not in said.stderr
    finally:
        web.stop()
        worker.join(30)
        receiver.stop()
    with rt.engine.connect() as conn:
        assert row(conn, retry)["status"] == "running"  # the refusals changed nothing


def test_the_stuck_checker_leaves_a_retry_being_delivered_alone(db_url, tmp_path, opened):
    receiver, rt, retry, worker = _delivering(db_url, tmp_path, opened)
    try:
        quick = make_runtime(db_url, policy=RetryPolicy(stuck_after=timedelta(seconds=1)))
        time.sleep(1.5)  # older than the threshold (a condition no poll can wait for: time itself)
        assert sweep_stuck_runs(quick).failed == 0
        quick.close()
    finally:
        worker.join(30)
        receiver.stop()
    with rt.engine.connect() as conn:
        assert row(conn, retry)["handed_off"] == "webhook"


def test_a_delivery_marked_by_a_process_that_died_is_delivered_again_with_its_key(db_url, tmp_path, opened):
    """kill -9 right after the mark committed: the row reads running, marked, its lease running out."""
    receiver = start_threaded_receiver(tmp_path)
    try:
        rt = opened(db_url, receiver)
        [retry] = due_retries(db_url, 1)
        with rt.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE scrape_runs SET status = 'running', started_at = now(), handed_off = 'webhook',"
                    " next_retry_at = NULL, delivering_until = now() + interval '1 hour', delivering_by = 'gone'"
                    " WHERE id = :id"
                ),
                {"id": retry},
            )
        assert process_due_retries(rt).executed == ()  # its lease stands: nobody delivers it
        assert sweep_stuck_runs(rt).failed == 0
        with rt.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE scrape_runs SET delivering_until = now() - interval '1 second' WHERE id = :id"),
                {"id": retry},
            )
        [outcome] = process_due_retries(rt).executed
        assert (outcome.run_id, outcome.status) == (retry, "handed_off")
    finally:
        receiver.stop()
    [request] = receiver.requests()
    assert request["key"] == str(retry)
    with rt.engine.connect() as conn:
        kept = row(conn, retry)
    assert (kept["status"], kept["delivering_until"], kept["retry_count"]) == ("running", None, 1)


def test_a_refused_delivery_is_a_delivery_not_an_execution(db_url, tmp_path):
    from tests.integration.test_cli import cli

    receiver = start_threaded_receiver(tmp_path, script=["status:404", "status:500"])
    try:
        due_retries(db_url, 2)
        env = {"DATABASE_URL": db_url, "SCRAPE_RUN_WEBHOOK": receiver.url + "/r/{run_id}"}
        done = cli("process", env=env)
        stats = cli("stats", env={"DATABASE_URL": db_url})
    finally:
        receiver.stop()
    assert done.returncode == 0, done.stderr
    assert "Executing" not in done.stdout and "executed" not in done.stdout, done.stdout
    assert "2 refused by the webhook" in done.stdout, done.stdout
    refused = [line for line in done.stdout.splitlines() if line.startswith("Refused by the webhook: ")]
    assert len(refused) == 2 and all("(run " in line for line in refused), done.stdout
    assert "executed" not in done.stderr and "refused by the webhook" in done.stderr
    with sa.create_engine(db_url).connect() as conn:
        how = conn.execute(sa.text("SELECT handed_off FROM scrape_runs WHERE is_retry AND status = 'failed'")).all()
    assert [h for (h,) in how] == ["webhook", "webhook"]  # stats counts them as deliveries
    assert stats.returncode == 0, stats.stderr


def test_webhook_bodies_write_timestamps_in_iso_8601_with_t():
    when = datetime(2026, 12, 2, 3, 49, 54, tzinfo=timezone.utc)
    run = Run(id=1, status="pending_retry", what="x", inputs={"scheduled_for": when})
    assert json.loads(payload(run))["scheduled_for"] == "2026-12-02T03:49:54+00:00"


SESSIONS = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'stuck-runs %'"


def peak_sessions(db_url: str, tmp_path, cap: int, retries: int) -> tuple[int, float]:
    """`stuck-runs process` over `retries` due retries to a receiver that answers 202 and completes
    each row at once: the most sessions it held at any one time, sampled from pg_stat_activity."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    with sa.create_engine(db_url).begin() as conn:  # retries of roots nobody reads: one statement
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, retry_count, max_retries,"
                " next_retry_at, original_run_id, is_retry) SELECT 'q' || g, 'Belgium', 'pending_retry', 1, 4,"
                " now() - interval '1 minute', gen_random_uuid(), true FROM generate_series(1, :n) g"
            ),
            {"n": retries},
        )
    receiver = start_threaded_receiver(tmp_path, database_url=db_url, table="scrape_runs", at_once=True)
    watcher = sa.create_engine(db_url)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": db_url,
        "SCRAPE_RUN_WEBHOOK": receiver.url + "/r/{run_id}",
        "MAX_CONCURRENT_RETRIES": str(cap),
        "LOG_LEVEL": "WARNING",
    }
    most, started = 0, time.monotonic()
    try:
        # Its output to a file: `process` prints a line per retry, and a pipe nobody reads while it
        # runs fills at 64 KB and blocks it (800 retries "never finished" that way).
        with open(tmp_path / "process.out", "w+") as output:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler", "process"], env=env, stdout=output, stderr=output
            )
            with watcher.connect() as conn:
                while proc.poll() is None:
                    most = max(most, conn.execute(sa.text(SESSIONS)).scalar_one())
                    conn.rollback()
            output.seek(0)
            err = output.read()
    finally:
        receiver.stop()
        watcher.dispose()
    assert proc.returncode == 0, err
    return most, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("cap", [1, 100, 256])
def test_a_process_keeps_a_small_pool_of_sessions_whatever_the_cap(db_url, tmp_path, cap):
    import os

    # cap 1 delivers one at a time: fifty show its pool as well as three hundred would
    retries = int(os.environ.get("SESSIONS_RETRIES", "300" if cap > 1 else "50"))
    most, seconds = peak_sessions(db_url, tmp_path, cap, retries)
    with sa.create_engine(db_url).connect() as conn:
        done = conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE is_retry AND status = 'completed'"))
        assert done.scalar_one() == retries
    print(f"\nsessions: cap {cap}, {retries} retries: peak {most} sessions, {seconds:.1f}s")
    assert most <= 8  # DELIVERY_POOL and as many again for a burst: never one per slot


# -- review of the hand-over: what a put-back, a refusal and a stop leave standing -------------------


def _marked(db_url, tmp_path, opened):
    from jobs.delivery import Deliveries

    receiver = start_threaded_receiver(tmp_path)
    rt = opened(db_url, receiver)
    [retry] = due_retries(db_url, 1)
    deliveries = Deliveries(rt, rt.executor, POLICY)
    marked = deliveries.mark()
    assert marked.run.id == retry
    return receiver, rt, deliveries, marked


def test_a_put_back_leaves_a_retry_the_fleets_worker_started_running(db_url, tmp_path, opened):
    """The answer timed out, but the receiver had the retry and its worker wrote its own start:
    putting it back to pending would make the worker's outcome (conditional on running) miss."""
    receiver, rt, deliveries, marked = _marked(db_url, tmp_path, opened)
    try:
        with rt.engine.begin() as conn:
            conn.execute(sa.text("UPDATE scrape_runs SET started_at = now() WHERE id = :id"), {"id": marked.run.id})
        late = Postponed("Webhook did not answer within 2s")
        outcome = deliveries.settle(marked, late)
    finally:
        receiver.stop()
    with rt.engine.connect() as conn:
        kept = row(conn, marked.run.id)
    assert (outcome.status, kept["status"], kept["delivering_by"]) == ("running", "running", None)


def test_a_refused_delivery_the_fleet_failed_and_another_process_continued_is_decided_once(db_url, tmp_path, opened):
    from jobs.outcomes import continue_fleet_failures

    receiver, rt, deliveries, marked = _marked(db_url, tmp_path, opened)
    try:
        with rt.engine.begin() as conn:  # the receiver wrote `failed`, then answered 500
            conn.execute(
                sa.text("UPDATE scrape_runs SET status = 'failed', error_message = 'HTTP 404 gone' WHERE id = :id"),
                {"id": marked.run.id},
            )
        [continued] = continue_fleet_failures(rt)  # another process got there first
        refused = Failed("Webhook answered HTTP 500 Internal Server Error")
        deliveries.settle(marked, refused)
    finally:
        receiver.stop()
    with rt.engine.connect() as conn:
        failed = row(conn, marked.run.id)
    assert continued.failed_at_fleet
    assert failed["error_message"] == "HTTP 404 gone - not retried: permanent error (not_found)"


def test_no_post_once_stopping_and_an_abandoned_post_is_not_due_before_its_lease_ends(db_url, tmp_path, opened):
    receiver, rt, deliveries, marked = _marked(db_url, tmp_path, opened)
    try:
        stop = threading.Event()
        stop.set()
        outcome = deliveries.deliver(marked, stop)
        assert receiver.requests() == []  # nothing was sent: due as it was
        with rt.engine.connect() as conn:
            assert row(conn, marked.run.id)["next_retry_at"] == marked.was_due
        again = deliveries.mark()
        in_flight = OutcomeUnknown("Stopped by a signal", stopping=True)
        deliveries.settle(again, in_flight)  # the POST was still open when it stopped
    finally:
        receiver.stop()
    with rt.engine.connect() as conn:
        pending = row(conn, marked.run.id)
    assert outcome.status == "released" and pending["status"] == "pending_retry" and pending["retry_count"] == 1
    assert pending["next_retry_at"] == again.lease_until


def test_a_database_outage_while_writing_an_answer_names_the_delivery_or_the_refused_attempt(db_url, tmp_path, opened):
    """The one `match` records every answer; a database error still says what it was writing:
    the delivery (confirm, put-back) or, for a refusal, the attempt's outcome as for any failure."""
    import dataclasses

    from db.engine import make_engine
    from db.errors import DatabaseUnavailable
    from jobs.executors.outcome import HandedOver, Released
    from jobs.outcomes import record_outcome

    receiver, rt, deliveries, marked = _marked(db_url, tmp_path, opened)
    receiver.stop()
    down = dataclasses.replace(rt, engine=make_engine("postgresql+psycopg2://nobody@127.0.0.1:1/gone"))
    try:
        for outcome, doing in [
            (HandedOver("webhook"), "writing the delivery"),
            (Postponed("Webhook answered HTTP 503 Service Unavailable"), "writing the delivery"),
            (Released(), "writing the delivery"),
            (Failed("Webhook answered HTTP 500 Internal Server Error"), "recording the outcome"),
        ]:
            with pytest.raises(DatabaseUnavailable) as raised:
                record_outcome(down, POLICY, marked.run, outcome, delivery=marked)
            assert f"database error while {doing} of run {marked.run.id}" in str(raised.value)
    finally:
        down.engine.dispose()
