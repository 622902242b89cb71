"""Notifications (SPEC §15) in this process, with real parts: Apprise's `json://` URL posting to a
real HTTP receiver on loopback, the real database, a clock the test steers."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from loguru import logger

from db.engine import make_engine
from db.layout import Layout
from db.migrate import migrate
from jobs import alerting
from jobs.alert_urls import parse_alert_urls
from jobs.executors.outcome import Failed
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.stuck import sweep_stuck_runs
from scheduler.alerts import Alerts
from scheduler.wiring import wire
from tests.adopted import ADOPTABLE, Adopted
from tests.alert_receiver import Receiver, absent_url
from tests.daemons import wait_until
from tests.helpers import ScriptedScraper, insert_due_retry, insert_stuck_runs, make_runtime, rows
from tests.integration.test_cli import cli, one_line_error
from tests.integration.test_index_predicates import layout_of

PASSWORD = "Pw-s3cret-4lert"
START = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


class SteeredClock:
    def __init__(self, now: datetime = START) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at

    def real(self, duration: timedelta) -> timedelta:
        return duration

    def advance(self, **delta: float) -> datetime:
        self.at += timedelta(**delta)
        return self.at


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def runtime(url: str, alert_urls: str, clock: SteeredClock | None = None, **settings):
    rt = make_runtime(url, alert_urls=parse_alert_urls(alert_urls, "ALERT_URLS"), **settings)
    rt.clock = clock or SteeredClock()
    return rt


def stuck(engine: sa.Engine, clock: SteeredClock, count: int, **columns: str) -> None:
    with engine.begin() as conn:
        insert_stuck_runs(conn, count, clock.now() - timedelta(hours=2), **columns)


def test_a_sweep_tells_the_receiver_how_many_runs_of_which_kinds_and_links_the_page(db_url, engine, receiver):
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN site_kind TEXT")
    clock = SteeredClock()
    stuck(engine, clock, 12, site_kind="CASE WHEN g % 3 = 0 THEN 'sitemap' ELSE 'jobs_de' END")
    kind = Layout(columns={"kind": "site_kind"})
    rt = wire(runtime(db_url, receiver.url(), clock, layout=kind, public_url="https://ops.example"))
    try:
        result = sweep_stuck_runs(rt)
        assert result.failed == 12
        assert receiver.received == []  # a one-shot command records; a process that watches sends
        deliveries = alerting.tick(rt, clock.now())
    finally:
        rt.close()
    assert [d.delivered for d in deliveries] == [True]
    [message] = receiver.received
    assert message["title"] == "12 stuck runs failed in scrape_runs"
    body = message["message"]
    assert "Kinds: jobs_de 8, sitemap 4" in body
    assert body.count("• ") == 10 and "… and 2 more" in body
    assert "• q1 in Belgium\n" in body and "• q11" not in body, body
    assert "https://ops.example/runs?status=failed" in body
    assert PASSWORD not in str(message)


def test_one_message_per_kind_per_period_what_happens_meanwhile_folded_into_the_next(db_url, engine, receiver):
    clock = SteeredClock()
    rt = wire(runtime(db_url, receiver.url(), clock, alert_every=timedelta(minutes=15)))
    try:
        stuck(engine, clock, 3)
        sweep_stuck_runs(rt)
        alerting.tick(rt, START)
        assert receiver.titles() == ["3 stuck runs failed in scrape_runs"]
        clock.advance(minutes=1)
        stuck(engine, clock, 2)
        sweep_stuck_runs(rt)
        assert alerting.tick(rt, START) == []
        clock.advance(minutes=5)
        stuck(engine, clock, 4)
        sweep_stuck_runs(rt)
        clock.advance(minutes=8, seconds=59)
        assert alerting.tick(rt, START) == []  # 14m59s after the first message
        clock.advance(seconds=1)  # the period ends: sent by this tick, though nothing new happened
        [sent] = alerting.tick(rt, START)
        assert sent.delivered and receiver.titles()[1] == "6 stuck runs failed in scrape_runs"
        assert "2 sweeps found them" in receiver.received[1]["message"]
        clock.advance(hours=1)
        assert alerting.tick(rt, START) == []  # nothing waits
    finally:
        rt.close()
    assert len(receiver.received) == 2


def test_a_receiver_that_refuses_hangs_or_is_gone_changes_nothing_of_the_sweep(db_url, engine, receiver):
    """The daemon's way: the subscriber queues, its own thread sends. The sweep fails the same rows
    as it does with no notifications, in the same time; the failure is logged once, no secret in
    it; what was not delivered goes with the next message."""
    clock = SteeredClock()
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    receiver.answer, receiver.hang_seconds = "hang", 4.0
    urls = f"{receiver.url(rto='3', cto='3')} {absent_url()}"
    stop = threading.Event()
    rt = runtime(db_url, urls, clock, alert_every=timedelta(minutes=15))
    alerts = Alerts(rt, tick_every=timedelta(milliseconds=200))  # a period's end noticed at once
    rt.events.subscribe(alerts)
    watcher = alerts.watch(stop)
    try:
        stuck(engine, clock, 5)
        result = sweep_stuck_runs(rt)
        # A sender waits 3 s for the hanging receiver before it logs the failure: had the sweep sent
        # (or waited for the sender), that line would be there before the sweep returned.
        assert not any("could not notify" in line for line in lines), lines
        assert result.failed == 5 and result.retries_scheduled == 5
        with engine.connect() as conn:
            assert len(rows(conn, "status = 'failed'")) == 5 and len(rows(conn, "status = 'pending_retry'")) == 5
        wait_until(lambda: any("could not notify" in line for line in lines), timeout=10)
        receiver.answer = "refuse"
        clock.advance(minutes=15)
        stuck(engine, clock, 1)
        sweep_stuck_runs(rt)
        wait_until(lambda: len(receiver.received) >= 2, timeout=10)
        receiver.answer = "ok"
        clock.advance(minutes=15)
        wait_until(lambda: len(receiver.received) >= 3, timeout=10)
    finally:
        stop.set()
        watcher.join(10)
        rt.close()
        logger.remove(sink)
    assert receiver.received[2]["title"] == "6 stuck runs failed in scrape_runs"  # the two folded, delivered
    failures = [line for line in lines if "could not notify" in line]
    assert len(failures) == 2, failures  # once per URL, however often it failed
    assert not any(PASSWORD in line for line in lines)
    assert any("takes notifications again" in line for line in lines)


def test_chains_that_end_permanently_are_told_with_their_patterns_and_last_errors(db_url, engine, receiver):
    """From a sweep whose runs have no budget left, and from a retry the scraper failed for good."""
    clock = SteeredClock(datetime.now(timezone.utc))
    scraper = ScriptedScraper(lambda run: Failed(error="HTTP Error 404: Not Found"))
    rt = wire(runtime(db_url, receiver.url(), clock, policy=RetryPolicy(max_retries=0)))
    rt.executor_override = scraper
    try:
        stuck(engine, clock, 2)
        assert sweep_stuck_runs(rt).dead_lettered == 2
        with engine.begin() as conn:
            insert_due_retry(conn, search_query="Engineer", now=clock.now())
        [ended] = process_due_retries(rt).executed
        assert ended.dead_lettered
        sent = alerting.tick(rt, clock.now())
    finally:
        rt.close()
    assert sorted(d.kind for d in sent) == ["permanent", "stuck"]
    [message] = [m for m in receiver.received if "permanently" in m["title"]]
    assert message["title"] == "3 chains permanently failed in scrape_runs"
    body = message["message"]
    assert "Patterns: stuck 2, not_found 1" in body
    assert "• q1 in Belgium\n• q2 in Belgium\n• [RETRY 1/4] Engineer in Belgium\n" in body
    errors = [line for line in body.splitlines() if line.startswith("Last error: ")]
    assert errors == [
        "Last error: Run stuck for 2.0h - permanently failed after 0 attempts",  # twice, said once
        "Last error: HTTP Error 404: Not Found - not retried: permanent error (not_found)",
    ]


def _ended_retries(engine: sa.Engine, when: datetime, outcomes: dict[str, list[str]]) -> None:
    """Retries that ended at `when`, per location: their statuses."""
    with engine.begin() as conn:
        for location, statuses in outcomes.items():
            for status in statuses:
                root = conn.execute(
                    sa.text(
                        "INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at, "
                        "failure_pattern) VALUES ('q', :l, 'failed', :t, :t, 'stuck') RETURNING id"
                    ),
                    {"l": location, "t": when - timedelta(hours=3)},
                ).scalar_one()
                conn.execute(
                    sa.text(
                        "INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at, "
                        "is_retry, original_run_id, retry_count) VALUES ('q', :l, :s, :t, :t, true, :root, 1)"
                    ),
                    {"l": location, "s": status, "t": when, "root": root},
                )


def test_retry_failure_rate_is_counted_in_sql_over_the_last_hour_and_names_the_worst_target(db_url, engine, receiver):
    clock = SteeredClock()
    rt = wire(runtime(db_url, receiver.url(), clock, target="location_query"))
    try:
        # Nine ended in the hour (below ALERT_MIN_RETRIES), others two hours ago: nothing to say.
        _ended_retries(engine, clock.now() - timedelta(minutes=10), {"Belgium": ["failed"] * 6 + ["completed"] * 3})
        _ended_retries(engine, clock.now() - timedelta(hours=2), {"Belgium": ["failed"] * 5})
        assert alerting.tick(rt, START) == []
        more = {"Belgium": ["failed"], "Ghent": ["completed"] * 4 + ["failed"]}
        _ended_retries(engine, clock.now() - timedelta(minutes=5), more)
        # 15 ended, 8 failed: more than half; Belgium's 10, 7 failed, the worst target.
        [sent] = alerting.tick(rt, START)
    finally:
        rt.close()
    assert sent.delivered
    [message] = receiver.received
    assert message["title"] == "8 of 15 retries failed in the last hour in scrape_runs"
    assert "Worst target: Belgium (7 of 10 failed)" in message["message"]


def test_a_silent_checker_is_noticed_and_a_finished_check_silences_it(db_url, receiver):
    clock = SteeredClock()
    env = {"DATABASE_URL": db_url}
    rt = wire(runtime(db_url, receiver.url(), clock, check_interval=timedelta(hours=1)))
    try:
        clock.advance(hours=1, minutes=59)
        assert alerting.tick(rt, START) == []
        clock.advance(minutes=1)  # two CHECK_INTERVALs since this process started watching
        [sent] = alerting.tick(rt, START)
        assert sent.title == "The stuck-run checker of scrape_runs is silent"
        assert "No check has ever finished." in receiver.received[0]["message"]
        assert cli("check", env=env).returncode == 0  # recorded now, by the real clock
        clock.at = datetime.now(timezone.utc) + timedelta(hours=1)
        assert alerting.tick(rt, START) == []
    finally:
        rt.close()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ALERT_URLS": f"json://u:{PASSWORD}@127.0.0.1:9/x bogus://user:{PASSWORD}@host/"}, "2nd URL (bogus://…)"),
        ({"ALERT_URLS": f"slack://{PASSWORD}"}, "1st URL (slack://…)"),
        ({"ALERT_URLS": "json://127.0.0.1:9/x", "ALERT_EVENTS": "stuck,hung"}, "unknown event 'hung'"),
        ({"ALERT_URLS": "json://127.0.0.1:9/x", "ALERT_FAILURE_RATE": "-0.1"}, "ALERT_FAILURE_RATE='-0.1'"),
        ({"ALERT_URLS": "json://127.0.0.1:9/x", "ALERT_FAILURE_RATE": "1.5"}, "ALERT_FAILURE_RATE='1.5'"),
        ({"PUBLIC_URL": f"https://u:{PASSWORD}@ops.example"}, "PUBLIC_URL: write the pages' address only"),
    ],
)
def test_bad_notification_settings_are_one_line_exit_2_and_nothing_is_touched(db_url, engine, env, named):
    clock = SteeredClock(datetime.now(timezone.utc))
    stuck(engine, clock, 2)
    result = cli("check", env={"DATABASE_URL": db_url, **env})
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert named in line and PASSWORD not in line + result.stdout, line
    with engine.connect() as conn:
        assert len(rows(conn, "status = 'running'")) == 2


def test_a_daemon_with_an_unreadable_alert_url_stops_at_start_up(db_url):
    """A real process: refused before it registers, sweeps or touches the database."""
    result = cli("daemon", env={"DATABASE_URL": db_url, "ALERT_URLS": f"discord://{PASSWORD}"}, timeout=30)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "ALERT_URLS: the 1st URL (discord://…)" in line and PASSWORD not in result.stdout + result.stderr


def test_alert_test_reports_each_url_secrets_masked_and_exits_1_when_one_failed(receiver):
    refused = Receiver()
    refused.answer = "refuse"
    try:
        urls = f"{receiver.url()}, slack://TokenAlpha/TokenBravo/TokenCharlie {refused.url()} {absent_url()}"
        result = cli("alert", "test", env={"ALERT_URLS": urls})
    finally:
        refused.close()
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    assert lines[0] == f"JSON json://alerter:****@127.0.0.1:{receiver.port}/hooks/s3cretPathToken: delivered"
    assert lines[1].startswith("Slack slack://T...a/T...o/T...e: NOT delivered: ")
    assert "NOT delivered" in lines[2] and "NOT delivered" in lines[3]
    assert [m["title"] for m in receiver.received] == ["stuck-runs test message for scrape_runs"]
    for secret in (PASSWORD, "TokenAlpha", "TokenBravo", "TokenCharlie"):
        assert secret not in result.stdout + result.stderr
    as_json = json.loads(cli("alert", "test", "--json", env={"ALERT_URLS": receiver.url()}).stdout)
    assert as_json == {
        "success": True,
        "urls": [{"url": lines[0].split(" ")[1][:-1], "service": "JSON", "delivered": True, "error": None}],
    }
    unset = cli("alert", "test")
    assert unset.returncode == 2 and "ALERT_URLS is not set" in one_line_error(unset)


def test_doctor_names_each_urls_service_secrets_masked_and_a_role_that_cannot_claim(db_url, engine):
    """Every process records and claims in stuck_runs_alerts: a role that cannot write it would
    notify nobody, doctor passing."""
    role = f"sr_noalerts_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        conn.exec_driver_sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
        conn.exec_driver_sql(f"REVOKE UPDATE ON stuck_runs_alerts FROM {role}")
    url = sa.engine.make_url(db_url).set(username=role).render_as_string(hide_password=False)
    urls = f"slack://TokenAlpha/TokenBravo/TokenCharlie mailto://ops:{PASSWORD}@example.com?to=a@example.com,b@x.org"
    try:
        result = cli("doctor", env={"DATABASE_URL": url, "SCRAPE_RUN_COMMAND": "true", "ALERT_URLS": urls})
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
    [line] = [line for line in result.stdout.splitlines() if "notifications" in line]
    assert "Slack (slack://T...a/T...o/T...e)" in line and "E-Mail (mailto://ops:****@example.com" in line, line
    assert PASSWORD not in result.stdout + result.stderr and "TokenAlpha" not in result.stdout
    [line] = [line for line in result.stdout.splitlines() if line.startswith("✗ privileges")] or [result.stderr]
    assert "UPDATE on stuck_runs_alerts" in line


@pytest.mark.parametrize("adopted", ADOPTABLE, ids=lambda a: a.name)
def test_every_adopted_table_is_told_of_its_stuck_runs_and_counts_its_retries(databases, receiver, adopted: Adopted):
    url = databases.create()
    engine = make_engine(url)
    layout = layout_of(adopted)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(adopted.ddl)
        migrate(engine, adopted.table, None, layout, extend_check=adopted.check_guarded)
        clock = SteeredClock(datetime.now(timezone.utc))
        with engine.begin() as conn:
            long_ago = clock.now() - timedelta(days=1)
            adopted.insert(conn, f"ok-{uuid.uuid4().hex[:6]}", status=adopted.running[0], started_at=long_ago)
        rt = wire(runtime(url, receiver.url(), clock, table=adopted.table, layout=layout))
        try:
            assert sweep_stuck_runs(rt).failed == 1
            deliveries = alerting.tick(rt, clock.now())
        finally:
            rt.close()
    finally:
        engine.dispose()
    assert [d.kind for d in deliveries] == ["stuck"]
    assert receiver.titles() == [f"1 stuck run failed in {rt.runs.qualified_name}"]
