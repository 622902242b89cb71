"""A stuck-runs process stopped (SIGTERM: its stop event set) while its schedule.json is in flight
(SPEC §16): Scrapyd may have the job already, so the retry, put back pending, is scheduled again
only if Scrapyd knows no job of its id. A real Scrapyd that queues jobs and never starts them,
behind a loopback relay that forwards schedule.json at once but holds its answer until the test
lets it go: "in flight" is a state the test waits for, not a race."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import sqlalchemy as sa

from jobs.delivery import Deliveries
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.settings.scrapyd_parsers import ScrapydUrl
from tests.helpers import insert_due_retry, make_runtime
from tests.scrapyd_fleet import PROJECT, start_scrapyd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scrapyd(tmp_path_factory):
    server = start_scrapyd(tmp_path_factory.mktemp("scrapyd-stopping"), poll_interval=3600, max_proc=1)
    yield server
    server.stop()


class Relay:
    """Forwards every request to Scrapyd; schedule.json's answer is held until `release` is set
    (`forwarded` says Scrapyd has answered it)."""

    def __init__(self, target: str) -> None:
        self.forwarded, self.release = threading.Event(), threading.Event()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _relay(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {"content-type": self.headers.get("content-type", "")}
                answer = httpx.request(method, f"{target}{self.path}", content=body, headers=headers, timeout=30)
                if self.path.startswith("/schedule.json"):
                    relay.forwarded.set()
                    relay.release.wait(60)
                self.send_response(answer.status_code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._relay("GET")

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self._relay("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_schedule_in_flight_when_the_process_stops_is_not_scheduled_again(db_url, scrapyd):
    with sa.create_engine(db_url).begin() as conn:
        retry = str(insert_due_retry(conn, search_query="in-flight")[1])
    relay = Relay(scrapyd.url)
    rt = make_runtime(
        db_url,
        policy=RetryPolicy(),
        max_concurrent_retries=1,
        scrapyd_url=ScrapydUrl(relay.url),
        scrapyd_project=PROJECT,
        scrapyd_spider="rows",
    )
    try:
        deliveries = Deliveries(rt, rt.executor, rt.settings.policy)
        marked = deliveries.mark()
        stop, outcomes = threading.Event(), []
        delivering = threading.Thread(target=lambda: outcomes.append(deliveries.deliver(marked, stop)))
        delivering.start()
        assert relay.forwarded.wait(60), "schedule.json never reached Scrapyd"
        stop.set()  # SIGTERM: the delivery is given up with its answer still on the way
        delivering.join(60)
        assert [o.status for o in outcomes] in (["released"], ["postponed"])  # pending again, no budget spent
        relay.release.set()
        # Its lease is over (as if a minute had passed): due again, to this or another process.
        with sa.create_engine(db_url).begin() as conn:
            conn.execute(sa.text("UPDATE scrape_runs SET next_retry_at = now() WHERE id = :id"), {"id": retry})
        assert process_due_retries(rt).handed_off == 1
    finally:
        rt.close()
        relay.close()
    listed = Counter(job for state, jobs in scrapyd.jobs().items() for job in jobs)
    assert listed[retry] == 1  # scheduled once: Scrapyd was asked whether it had the job
    with sa.create_engine(db_url).connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM scrape_runs WHERE id = :id"), {"id": retry}).scalar_one() == (
            "running"
        )
