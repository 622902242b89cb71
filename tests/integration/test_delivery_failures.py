"""What a delivery lane does when asking the fleet eats its lease, or an executor raises (SPEC §12:
two processes never deliver one retry at once; nothing is left marked). A fake Scrapyd in this
module (loopback, answers at once) and an in-test executor: each test is cheap and steers time
through the runtime's clock, never by sleeping."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa
from loguru import logger

from jobs.clock import SystemClock
from jobs.delivery import Deliveries
from jobs.executors.outcome import HandedOver, Postponed
from jobs.executors.scrapyd import ScrapydExecutor
from jobs.model import Run
from jobs.rules import RetryPolicy
from jobs.settings.scrapyd_parsers import ScrapydUrl
from tests.helpers import insert_due_retry, make_runtime, row


class ShiftedClock(SystemClock):
    """The system's clock, `shift` later (moved on by the test, as a slow call would)."""

    def __init__(self) -> None:
        self.shift = timedelta(0)

    def now(self) -> datetime:
        return super().now() + self.shift


class FakeScrapyd:
    """status.json and schedule.json as Scrapyd answers them; `on_status(job)` runs once status.json
    has read what Scrapyd knows and before it answers (what happens while the answer travels);
    `hold` keeps status.json's answer until set."""

    def __init__(self) -> None:
        self.scheduled: list[str] = []
        self.on_status: Callable[[str], None] | None = None
        self.hold = threading.Event()
        self.hold.set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def answer(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # a caller that gave up on it has gone
                    self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                job = parse_qs(urlsplit(self.path).query)["job"][0]
                state = "pending" if job in fake.scheduled else None
                then, fake.on_status = fake.on_status, None
                if then is not None:
                    then(job)
                fake.hold.wait(60)
                self.answer({"status": "ok", "currstate": state})

            def do_POST(self) -> None:  # noqa: N802
                form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                fake.scheduled.append(form["jobid"][0])
                self.answer({"status": "ok", "jobid": form["jobid"][0]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scrapyd():
    fake = FakeScrapyd()
    yield fake
    fake.stop()


def test_a_retry_whose_job_check_outlasted_its_lease_is_put_back_not_scheduled_a_second_time(engine, db_url, scrapyd):
    """A postponed retry's delivery asks Scrapyd first (status.json), then schedules it. If the
    asking takes so long that the lease no longer covers schedule.json, another process may have
    marked it anew meanwhile, asked too and scheduled it: this one must not schedule it again."""
    with engine.begin() as conn:
        _, retry = insert_due_retry(conn, postponements=1)  # postponed before: asked about first
    clock, settings = ShiftedClock(), dict(scrapyd_project="p", scrapyd_spider="s", max_concurrent_retries=1)
    first, second = (make_runtime(db_url, scrapyd_url=ScrapydUrl(scrapyd.url), **settings) for _ in range(2))
    first.clock = second.clock = clock
    took_over: list = []

    def while_the_answer_travels(job: str) -> None:
        # Scrapyd knows no job yet; before its answer arrives the lease runs out and a second
        # process marks the retry anew, asks, and schedules it.
        clock.shift = Deliveries(first, first.executor, RetryPolicy()).lease + timedelta(seconds=1)
        took_over.extend(Deliveries(second, second.executor, RetryPolicy()).drain(threading.Event()))

    scrapyd.on_status = while_the_answer_travels
    try:
        outcomes = Deliveries(first, first.executor, RetryPolicy()).drain(threading.Event())
    finally:
        first.close()
        second.close()
    assert [o.status for o in took_over] == ["handed_off"]
    assert scrapyd.scheduled == [str(retry)]  # once: the first process sent nothing
    assert [o.status for o in outcomes] == ["taken_over"]
    with engine.connect() as conn:
        assert row(conn, retry)["status"] == "running"


def test_a_job_check_that_ate_the_lease_puts_the_retry_back_saying_why(engine, db_url, scrapyd):
    with engine.begin() as conn:
        _, retry = insert_due_retry(conn, postponements=1)
    rt = make_runtime(db_url, scrapyd_url=ScrapydUrl(scrapyd.url), scrapyd_project="p", scrapyd_spider="s")
    rt.clock = clock = ShiftedClock()
    deliveries = Deliveries(rt, rt.executor, RetryPolicy())
    scrapyd.on_status = lambda job: setattr(clock, "shift", deliveries.lease - rt.executor.bound / 2)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        outcomes = deliveries.drain(threading.Event())
    finally:
        logger.remove(sink)
        rt.close()
    assert [o.status for o in outcomes] == ["released"] and scrapyd.scheduled == []
    assert any("asking the fleet whether it had the job took too long" in line for line in lines)
    with engine.connect() as conn:
        found = row(conn, retry)
    assert (found["status"], found["delivering_by"], found["postponements"]) == ("pending_retry", None, 1)


def test_a_lapsed_delivery_put_back_unsent_is_asked_about_first_next_time(engine, db_url, scrapyd):
    """A retry whose delivering process died (its schedule.json may have reached Scrapyd) is marked
    anew; this delivery, too, sends nothing (its lease ran short). Put back, it must still be one
    whose next delivery asks Scrapyd first: a release that counted no postponement forgot it, and
    the next delivery scheduled a second job of its id."""
    with engine.begin() as conn:
        _, retry = insert_due_retry(conn)
        conn.execute(
            sa.text(
                "UPDATE scrape_runs SET status = 'running', handed_off = 'scrapyd', started_at = now(),"
                " delivering_by = 'a process that died', delivering_until = now() - interval '1 minute'"
                " WHERE id = :id"
            ),
            {"id": retry},
        )
    rt = make_runtime(db_url, scrapyd_url=ScrapydUrl(scrapyd.url), scrapyd_project="p", scrapyd_spider="s")
    rt.clock = clock = ShiftedClock()
    deliveries = Deliveries(rt, rt.executor, RetryPolicy())
    scrapyd.on_status = lambda job: setattr(clock, "shift", deliveries.lease - rt.executor.bound / 2)
    try:
        outcomes = deliveries.drain(threading.Event())
    finally:
        rt.close()
    assert [o.status for o in outcomes] == ["released"] and scrapyd.scheduled == []
    with engine.connect() as conn:
        found = row(conn, retry)
    assert (found["status"], found["delivering_by"], found["postponements"]) == ("pending_retry", None, 1)


def test_scrapyd_s_job_check_is_given_up_past_its_bound_and_at_a_stop(scrapyd):
    """has_job asks status.json (then, on an older Scrapyd, listjobs.json): however long those
    take, it answers within one `bound`, and at once when stopping; not asked is postponed."""
    executor = ScrapydExecutor(scrapyd.url, "p", "s")
    executor.bound = timedelta(seconds=0.5)
    scrapyd.hold.clear()  # status.json answers only once the test ends
    run = Run(id="3f1c8c52-0000-4000-8000-000000000001", status="running", what="q")
    try:
        started = time.monotonic()
        asked = executor.has_job(run, threading.Event())
        assert time.monotonic() - started < 10  # its httpx read timeout is 30 s
        assert asked == Postponed("Scrapyd did not answer status.json within 0.5s")
        stop = threading.Event()
        executor.bound = timedelta(seconds=60)
        threading.Timer(0.2, stop.set).start()
        started = time.monotonic()
        asked = executor.has_job(run, stop)
        assert time.monotonic() - started < 10
        assert asked == Postponed("Stopped by a signal before Scrapyd answered status.json")
    finally:
        scrapyd.hold.set()
        executor.close()


class Fleet:
    """An executor answering `answer(run)` (which may raise), `lanes` at once."""

    mode, bound, sends_again = "celery", timedelta(seconds=10), False

    def __init__(self, lanes: int, answer: Callable[[Run], object]) -> None:
        self.lanes, self.answer = lanes, answer

    def deliver(self, run: Run, stop: threading.Event):
        return self.answer(run)


def marks(engine) -> list[tuple]:
    with engine.connect() as conn:
        query = "SELECT status, delivering_by IS NOT NULL, count(*) FROM scrape_runs WHERE is_retry GROUP BY 1, 2"
        return sorted(conn.exec_driver_sql(query).all())


def test_an_executor_that_raises_puts_each_retry_back_saying_why_and_leaves_none_marked(engine, db_url):
    with engine.begin() as conn:
        ids = [insert_due_retry(conn, search_query=f"q{n}")[1] for n in range(12)]
    broken = str(ids[0])

    def answer(run: Run):
        if str(run.id) == broken:
            raise ValueError("cannot convert float NaN to integer")
        return HandedOver("celery")

    rt = make_runtime(db_url, max_concurrent_retries=12)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        outcomes = Deliveries(rt, Fleet(3, answer), RetryPolicy()).drain(threading.Event())
    finally:
        logger.remove(sink)
        rt.close()
    # Released, due as it was: another lane of the pass may take it up again (each lane that had
    # one released asks for no more).
    released = [o for o in outcomes if o.status == "released"]
    assert len(outcomes) - len(released) == 11 and {o.status for o in outcomes} == {"handed_off", "released"}
    assert {o.run_id for o in released} == {ids[0]}
    assert marks(engine) == [("pending_retry", False, 1), ("running", False, 11)]
    said = [line for line in lines if "ValueError: cannot convert float NaN to integer" in line]
    assert len(said) == len(released) and all("left pending_retry (its delivery raised" in line for line in said)


def test_a_lane_that_raises_leaves_none_of_the_retries_marked_ahead_marked(engine, db_url):
    """A lane ended by an error (here PostgreSQL refusing to write a postponement) ends the pass:
    the retries marked ahead for the next lanes are put back, not left marked until their leases
    end (Celery never sends a lapsed mark again)."""
    with engine.begin() as conn:
        for n in range(12):
            insert_due_retry(conn, search_query=f"q{n}")
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_postponing() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'no postponing today'; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_postponing BEFORE UPDATE ON scrape_runs FOR EACH ROW "
            "WHEN (NEW.postponements > OLD.postponements) EXECUTE FUNCTION refuse_postponing()"
        )
    rt = make_runtime(db_url, max_concurrent_retries=12)
    try:
        with pytest.raises(Exception, match="no postponing today"):
            Deliveries(rt, Fleet(2, lambda run: Postponed("busy")), RetryPolicy()).drain(threading.Event())
    finally:
        rt.close()
    # Only each lane's own delivery, whose put-back PostgreSQL refused, keeps its mark.
    assert marks(engine) == [("pending_retry", False, 10), ("running", True, 2)]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM scrape_runs WHERE postponements > 0")).scalar_one() == 0
