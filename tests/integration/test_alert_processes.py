"""Notifications across real processes (SPEC §15): three daemons on one database send one message
per event, not three; `serve` notices a checker that never ran."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from db.engine import make_engine
from tests.alert_receiver import Receiver
from tests.daemons import DaemonProcess, wait_until
from tests.helpers import insert_stuck_runs
from tests.integration.test_alerts import PASSWORD, _ended_retries
from tests.web import WebServer

pytestmark = pytest.mark.slow
TICKED = "notifications ticked"


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def test_three_daemons_on_one_database_send_one_message_per_event(db_url, receiver):
    now = datetime.now(timezone.utc)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        insert_stuck_runs(conn, 4, now - timedelta(hours=3))
    _ended_retries(engine, now - timedelta(minutes=5), {"Belgium": ["failed"] * 10 + ["completed"] * 2})
    engine.dispose()
    # Each daemon sweeps and ticks every second; each sees the failure rate (a state of the rows).
    # Only the two events the rows make: a tick late by 2 s under load is a checker_silent event of its own.
    settings = {
        "ALERT_URLS": receiver.url(),
        "ALERT_EVENTS": "stuck,retry_failure_rate",
        "CHECK_INTERVAL": "1s",
        "ALERT_EVERY": "1h",
        "LOG_LEVEL": "DEBUG",
    }
    daemons = [DaemonProcess(db_url, **settings) for _ in range(3)]
    try:
        wanted = {"4 stuck runs failed in scrape_runs", "10 of 12 retries failed in the last hour in scrape_runs"}
        wait_until(lambda: wanted <= set(receiver.titles()), timeout=60)
        # Every daemon has ticked three more times since: each had its chance to send them again.
        ticked = [d.output().count(TICKED) for d in daemons]
        wait_until(
            lambda: all(d.output().count(TICKED) >= n + 3 for d, n in zip(daemons, ticked, strict=True)), timeout=30
        )
    finally:
        logs = [d.stop() for d in daemons]
    assert sorted(receiver.titles()) == sorted(wanted), receiver.titles()
    assert sum("notified json://" in log for log in logs) <= 2
    assert not any(PASSWORD in log for log in logs)


def test_serve_notices_a_checker_that_never_ran(db_url, receiver):
    server = WebServer(db_url, ALERT_URLS=receiver.url(), CHECK_INTERVAL="1s", ALERT_EVERY="1h")
    try:
        wait_until(lambda: receiver.titles(), timeout=30)
    finally:
        log = server.stop()
    assert receiver.titles() == ["The stuck-run checker of scrape_runs is silent"]
    assert "No check has ever finished." in receiver.received[0]["message"]
    assert PASSWORD not in log
