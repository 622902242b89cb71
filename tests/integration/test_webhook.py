"""SCRAPE_RUN_WEBHOOK (SPEC §12), each rule against a real receiver process on loopback."""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from jobs.executors.webhook import signature
from jobs.retries import process_due_retries
from jobs.rules import RetryPolicy
from jobs.status import read_status
from jobs.stuck import sweep_stuck_runs
from tests.helpers import chain_of, insert_due_retry, make_runtime, row
from tests.receiver import start_receiver

SECRET = "s3cret-webhook-signing-key"
POLICY = RetryPolicy(retry_delay=timedelta(minutes=10), stuck_after=timedelta(hours=1))


@pytest.fixture
def receiver(tmp_path):
    started = start_receiver(tmp_path, secret=SECRET)
    yield started
    started.stop()


@pytest.fixture
def webhook_runtime():
    """Runtimes delivering to a receiver; each closed (its pooled connections too) after the test."""
    opened = []

    def open_runtime(db_url, receiver, path="/api/scrape-jobs/{run_id}/retry", **settings):
        settings = {"webhook_secret": SECRET, "webhook_timeout": timedelta(seconds=2), **settings}
        opened.append(make_runtime(db_url, webhook=receiver.url + path, policy=POLICY, **settings))
        return opened[-1]

    yield open_runtime
    for rt in opened:
        rt.close()


def due_retry(rt, **columns):
    with rt.engine.begin() as conn:
        return insert_due_retry(conn, config='{"pages": 2}', user_id=7, **columns)


def test_a_2xx_hands_the_retry_over_running_with_its_body_key_and_signature(db_url, receiver, webhook_runtime):
    rt = webhook_runtime(db_url, receiver)
    root, retry = due_retry(rt)
    before = datetime.now(timezone.utc)
    result = process_due_retries(rt)
    assert [(o.run_id, o.status) for o in result.executed] == [(retry, "handed_off")]
    [request] = receiver.requests()
    assert request["method"] == "POST" and request["path"] == f"/api/scrape-jobs/{retry}/retry"
    assert request["key"] == str(retry) and request["signature_ok"] is True
    assert request["headers"]["content-type"] == "application/json"
    assert request["headers"]["x-stuck-runs-signature"] == signature(SECRET, request["body"].encode())
    body = json.loads(request["body"])
    assert body == {
        "search_query": "Data Architect",
        "location_query": "Belgium",
        "config": {"pages": 2},
        "user_id": 7,
        "results_count": None,
        "id": str(retry),
        "retry_count": 1,
        "max_retries": 4,
        "original_run_id": str(root),
    }
    with rt.engine.connect() as conn:
        handed = row(conn, retry)
    assert (handed["status"], handed["handed_off"], handed["next_retry_at"]) == ("running", "webhook", None)
    assert handed["started_at"] >= before
    # Nobody runs it here: a second pass delivers nothing more.
    assert process_due_retries(rt).executed == () and len(receiver.requests()) == 1


@pytest.mark.parametrize(
    ("answer", "after"),
    [
        ("429:3600", timedelta(hours=1)),
        ("503:7200", timedelta(hours=2)),
        ("429:60", timedelta(minutes=1)),  # sooner than RETRY_DELAY: the fleet said when it has room
        ("503", timedelta(minutes=1)),  # no Retry-After: a postponement's own backoff, not RETRY_DELAY
    ],
)
def test_429_and_503_postpone_without_spending_budget_honouring_retry_after(
    db_url, receiver, webhook_runtime, answer, after
):
    receiver.set_script([answer])
    rt = webhook_runtime(db_url, receiver)
    _, retry = due_retry(rt)
    started = datetime.now(timezone.utc)
    result = process_due_retries(rt)
    assert [o.status for o in result.executed] == ["postponed"]
    with rt.engine.connect() as conn:
        kept = row(conn, retry)
        assert conn.execute(sa.text("SELECT count(*) FROM scrape_runs")).scalar_one() == 2  # no retry row
    assert (kept["status"], kept["retry_count"], kept["failure_pattern"], kept["handed_off"]) == (
        "pending_retry",
        1,
        None,
        None,
    )
    assert started + after - timedelta(seconds=5) <= kept["next_retry_at"] <= started + after + timedelta(seconds=30)


@pytest.mark.parametrize("answer", ["reset", "hang:5"])
def test_a_reset_or_a_timeout_postpones_the_retry(db_url, receiver, webhook_runtime, answer):
    receiver.set_script([answer])
    rt = webhook_runtime(db_url, receiver, webhook_timeout=timedelta(seconds=1))
    _, retry = due_retry(rt)
    assert [o.status for o in process_due_retries(rt).executed] == ["postponed"]
    with rt.engine.connect() as conn:
        kept = row(conn, retry)
    assert kept["status"] == "pending_retry" and kept["retry_count"] == 1 and kept["postponements"] == 1
    assert kept["next_retry_at"] > datetime.now(timezone.utc) + timedelta(seconds=50)  # its first postponement


@pytest.mark.parametrize(
    ("answer", "outcome", "kept"),
    [
        ("cut:202", "handed_off", ("running", "webhook", 0)),
        ("cut:500", "postponed", ("pending_retry", None, 1)),  # any other answer cut short: a connection error
    ],
)
def test_a_2xx_whose_body_is_cut_short_still_hands_the_retry_over(
    db_url, receiver, webhook_runtime, answer, outcome, kept
):
    """SPEC §12: a 2xx hands it over. A receiver that said 202 and died before its body took the
    retry: delivered again, it would be taken twice by a fleet that lost its keys with the crash."""
    receiver.set_script([answer])
    rt = webhook_runtime(db_url, receiver)
    _, retry = due_retry(rt)
    assert [o.status for o in process_due_retries(rt).executed] == [outcome]
    with rt.engine.connect() as conn:
        written = row(conn, retry)
    assert (written["status"], written["handed_off"], written["postponements"]) == kept
    assert len(receiver.requests()) == 1


@pytest.mark.parametrize(
    ("code", "pattern"), [(404, "not_found"), (410, "not_found"), (401, "forbidden"), (403, "forbidden")]
)
def test_404_410_401_403_end_the_chain_as_a_permanent_error(db_url, receiver, webhook_runtime, code, pattern):
    receiver.set_script([f"status:{code}"])
    rt = webhook_runtime(db_url, receiver)
    root, retry = due_retry(rt)
    [outcome] = process_due_retries(rt).executed
    assert (outcome.status, outcome.pattern, outcome.dead_lettered) == ("failed", pattern, True)
    with rt.engine.connect() as conn:
        failed = row(conn, retry)
        letters = conn.execute(sa.text("SELECT run_id, pattern FROM scrape_run_dead_letters")).all()
        assert len(chain_of(conn, root)) == 2
    assert failed["status"] == "failed" and failed["next_retry_at"] is None
    assert failed["error_message"].startswith(f"Webhook answered HTTP {code} ")
    assert failed["error_message"].endswith(f"- not retried: permanent error ({pattern})")
    assert letters == [(retry, pattern)]


@pytest.mark.parametrize("code", [400, 500, 502])
def test_any_other_status_is_a_failed_attempt_whose_chain_goes_on(db_url, receiver, webhook_runtime, code):
    receiver.set_script([f"status:{code}"])
    rt = webhook_runtime(db_url, receiver)
    root, retry = due_retry(rt)
    [outcome] = process_due_retries(rt).executed
    assert outcome.status == "failed" and outcome.retry_id is not None
    with rt.engine.connect() as conn:
        failed = row(conn, retry)
        nxt = row(conn, outcome.retry_id)
    assert failed["error_message"].startswith(f"Webhook answered HTTP {code}")
    assert failed["error_message"].endswith("- retry 2/4 scheduled")
    assert (nxt["status"], nxt["retry_count"], nxt["original_run_id"]) == ("pending_retry", 2, root)


def test_a_redirect_to_another_host_is_not_followed(db_url, receiver, webhook_runtime):
    receiver.set_script(["redirect-other"])
    rt = webhook_runtime(db_url, receiver)
    _, retry = due_retry(rt)
    [outcome] = process_due_retries(rt).executed
    assert outcome.status == "failed"
    assert len(receiver.requests()) == 1  # nothing went to 127.0.0.2
    with rt.engine.connect() as conn:
        assert "redirected to another host (127.0.0.2): not followed" in row(conn, retry)["error_message"]


def test_a_redirect_on_the_same_host_is_followed_with_the_same_body(db_url, receiver, webhook_runtime):
    receiver.set_script(["redirect-same", "ok"])
    rt = webhook_runtime(db_url, receiver)
    _, retry = due_retry(rt)
    assert [o.status for o in process_due_retries(rt).executed] == ["handed_off"]
    first, second = receiver.requests()
    assert second["path"] == "/redirected" and second["method"] == "POST"
    assert second["body"] == first["body"] and second["key"] == str(retry) and second["signature_ok"]


@pytest.mark.parametrize("code", [301, 302, 303])
def test_a_redirect_that_would_drop_the_post_is_a_failed_attempt_not_a_hand_off(
    db_url, receiver, webhook_runtime, code
):
    receiver.set_script([f"redirect-same:{code}", "ok"])
    rt = webhook_runtime(db_url, receiver)
    _, retry = due_retry(rt)
    [outcome] = process_due_retries(rt).executed
    assert outcome.status == "failed" and outcome.delivered and len(receiver.requests()) == 1
    with rt.engine.connect() as conn:
        failed = row(conn, retry)
    assert failed["handed_off"] == "webhook"  # a delivery the webhook refused, not a run here
    assert f"Webhook answered HTTP {code}" in failed["error_message"]
    assert "(a redirect that drops the POST): point SCRAPE_RUN_WEBHOOK at the final URL" in failed["error_message"]


def test_placeholders_are_percent_encoded_so_an_input_cannot_change_the_url(db_url, receiver, webhook_runtime):
    rt = webhook_runtime(db_url, receiver, path="/jobs?q={search_query}&id={run_id}")
    due_retry(rt, search_query="a/b?c=d#e&f")
    process_due_retries(rt)
    [request] = receiver.requests()
    assert request["path"].startswith("/jobs?q=a%2Fb%3Fc%3Dd%23e%26f&id=")


def test_the_cap_counts_handed_off_retries_until_the_fleet_ends_them(db_url, receiver, webhook_runtime):
    rt = webhook_runtime(db_url, receiver, max_concurrent_retries=2)
    retries = [due_retry(rt, search_query=f"q{i}")[1] for i in range(5)]
    assert len(process_due_retries(rt).executed) == 2
    assert process_due_retries(rt).executed == ()  # two handed off, not ended: the cap is full
    with rt.engine.begin() as conn:
        handed = [r for r in retries if row(conn, r)["status"] == "running"]
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": handed[0]})
    assert [o.status for o in process_due_retries(rt).executed] == ["handed_off"]
    assert len({r["key"] for r in receiver.requests()}) == 3


def test_a_handed_off_retry_the_fleet_never_ends_is_failed_as_stuck(db_url, receiver, webhook_runtime):
    rt = webhook_runtime(db_url, receiver)
    _, retry = due_retry(rt)
    process_due_retries(rt)
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE scrape_runs SET started_at = started_at - interval '2 hours' WHERE id = :id"), {"id": retry}
        )
    swept = sweep_stuck_runs(rt)
    assert swept.failed == 1
    with rt.engine.connect() as conn:
        assert row(conn, retry)["error_message"] == "Run stuck for 2.0h - retry 2/4 scheduled"


def test_a_failure_the_fleet_writes_continues_the_chain(db_url, receiver, webhook_runtime):
    rt = webhook_runtime(db_url, receiver)
    root, retry = due_retry(rt)
    process_due_retries(rt)
    with rt.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE scrape_runs SET status = 'failed', error_message = :e, completed_at = now() WHERE id = :id"
            ),
            {"id": retry, "e": "HTTP Error 404: Not Found"},
        )
    assert read_status(rt).runs.permanently_failed == 0  # not an end before its chain is continued
    [outcome] = process_due_retries(rt).executed
    assert (outcome.run_id, outcome.status, outcome.pattern) == (retry, "failed", "not_found")
    assert read_status(rt).runs.permanently_failed == 1
    with rt.engine.connect() as conn:
        ended = row(conn, retry)
        assert len(chain_of(conn, root)) == 2
    assert ended["error_message"] == "HTTP Error 404: Not Found - not retried: permanent error (not_found)"
    assert process_due_retries(rt).executed == ()  # taken once


def test_process_says_what_went_to_the_fleet_and_what_was_postponed(db_url, receiver):
    from tests.integration.test_cli import cli

    receiver.set_script(["ok", "503:60"])
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_WEBHOOK": receiver.url + "/r/{run_id}", "WEBHOOK_SECRET": SECRET}
    env["MAX_CONCURRENT_RETRIES"] = "2"
    with sa.create_engine(db_url).begin() as conn:
        handed, postponed = insert_due_retry(conn, search_query="a")[1], insert_due_retry(conn, search_query="b")[1]
    result = cli("process", env=env)
    assert result.returncode == 0, result.stderr
    assert "0 superseded, 1 handed to the fleet, 1 postponed (the fleet could not take them) (" in result.stdout
    # Two slots deliver at once: which retry got the 2xx is the receiver's order.
    [handed_line] = [line for line in result.stdout.splitlines() if line.startswith("Handed ")]
    [postponed_line] = [line for line in result.stdout.splitlines() if line.startswith("Postponed ")]
    assert handed_line.endswith(") to the fleet") and "[RETRY 1/4]" in handed_line
    # "delivered again at <time>", worded as the log line says it
    assert re.search(
        r"— Webhook answered HTTP 503 Service Unavailable; delivered again at \d{4}-\d\d-\d\d \d\d:\d\d UTC \(no budget spent\)$",
        postponed_line,
    )
    postponed = handed if f"(run {handed})" not in handed_line else postponed
    assert SECRET not in result.stdout + result.stderr
    with sa.create_engine(db_url).connect() as conn:
        assert row(conn, postponed)["status"] == "pending_retry"


def test_the_webhook_and_the_hand_off_are_flags_too(db_url, receiver):
    from tests.integration.test_cli import cli

    with sa.create_engine(db_url).begin() as conn:
        _, retry = insert_due_retry(conn)
    flags = ["--webhook", receiver.url + "/r/{run_id}", "--webhook-timeout", "5s"]
    result = cli("process", *flags, env={"DATABASE_URL": db_url, "WEBHOOK_SECRET": SECRET})
    assert result.returncode == 0 and "1 handed to the fleet" in result.stdout, result.stderr
    assert receiver.requests()[0]["signature_ok"] is True
    bad = cli("process", "--handoff", "queued", env={"DATABASE_URL": db_url})
    assert bad.returncode == 2 and "--handoff=queued but STATUS_MAP does not map queued" in bad.stderr, bad.stderr


def test_a_receiver_dripping_bytes_is_given_up_after_the_timeout_not_days(receiver):
    import time

    from jobs.executors.outcome import OutcomeUnknown
    from jobs.executors.webhook import WebhookExecutor
    from jobs.model import Run

    receiver.set_script(["drip:30"])
    executor = WebhookExecutor(receiver.url + "/r/{run_id}", SECRET, timedelta(seconds=1))
    started = time.monotonic()
    delivered = executor.deliver(Run(id="r1", status="pending_retry", what="x"), threading.Event())
    took = time.monotonic() - started
    executor.close()
    assert isinstance(delivered, OutcomeUnknown) and "did not answer within 1s" in delivered.error
    assert took < 5, took  # connect + read timeout, though no single read ever waited 1 s


def test_the_receiver_logs_an_answer_that_went_out_in_full_and_no_other(tmp_path):
    """What the chaos auditor reads (--log-answers): an answer the receiver died in the middle of,
    or reset, has no `answered` line; one sent in full has."""
    from jobs.executors.outcome import HandedOver, Postponed
    from jobs.executors.webhook import WebhookExecutor
    from jobs.model import Run

    receiver = start_receiver(tmp_path, ["ok", "cut:202", "reset"], log_answers=True)
    executor = WebhookExecutor(receiver.url + "/r/{run_id}", None, timedelta(seconds=2))
    try:
        outcomes = [
            executor.deliver(Run(id=f"r{i}", status="pending_retry", what="x"), threading.Event()) for i in range(3)
        ]
    finally:
        executor.close()
        receiver.stop()
    assert [type(o) for o in outcomes] == [HandedOver, HandedOver, Postponed]
    requests = receiver.requests()
    assert [r["answer"] for r in requests] == ["ok", "cut:202", "reset"] and len({r["n"] for r in requests}) == 3
    assert [e["n"] for e in receiver.events() if e["event"] == "answered"] == [requests[0]["n"]]


def test_a_text_id_a_header_cannot_hold_is_percent_encoded_in_the_key(receiver):
    from jobs.executors.outcome import HandedOver
    from jobs.executors.webhook import WebhookExecutor
    from jobs.model import Run

    executor = WebhookExecutor(receiver.url + "/r/{run_id}", SECRET, timedelta(seconds=2))
    delivered = executor.deliver(Run(id="café-1", status="pending_retry", what="x"), threading.Event())
    executor.close()
    assert delivered == HandedOver("webhook")
    [request] = receiver.requests()
    assert request["key"] == "caf%C3%A9-1" and request["path"] == "/r/caf%C3%A9-1"
    assert json.loads(request["body"])["id"] == "café-1"


def test_an_answer_with_nul_and_escape_bytes_is_cleaned_before_it_is_stored():
    from jobs.executors.webhook import judge

    verdict = judge(500, "Internal\x1b[31m", None, "boom\x00 \x1b[2Jgone")
    assert "\x00" not in verdict.error and "\x1b" not in verdict.error
    assert verdict.error.startswith("Webhook answered HTTP 500 Internal [31m: boom")


def test_retry_after_in_seconds_or_as_an_http_date():
    from email.utils import format_datetime

    from jobs.executors.webhook import retry_after_delay

    assert retry_after_delay("120") == timedelta(seconds=120)
    assert retry_after_delay("0") == timedelta(0)
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(minutes=10), usegmt=True)
    assert timedelta(minutes=9) < retry_after_delay(soon) <= timedelta(minutes=10)
    past = format_datetime(datetime.now(timezone.utc) - timedelta(minutes=10), usegmt=True)
    assert retry_after_delay(past) == timedelta(0)
    assert retry_after_delay("soon") is None and retry_after_delay(None) is None


def test_a_retry_being_delivered_is_committed_running_so_no_other_process_delivers_it(
    db_url, receiver, webhook_runtime
):
    """The mark commits before the POST: another process sees a running retry, not a due one, and
    the postponement is written over that mark in one conditional statement."""
    from jobs.delivery import Deliveries

    receiver.set_script(["503:3600"])
    rt = webhook_runtime(db_url, receiver, max_concurrent_retries=2)  # room for another: none is due
    _, retry = due_retry(rt)
    deliveries = Deliveries(rt, rt.executor, POLICY)
    marked = deliveries.mark()
    with rt.engine.connect() as other:  # before it is even delivered
        being = row(other, retry)
    assert (being["status"], being["handed_off"], being["delivering_by"]) == ("running", "webhook", marked.by)
    assert Deliveries(rt, rt.executor, POLICY).mark() is None  # nothing else to deliver: it is not due twice
    outcome = deliveries.deliver(marked, threading.Event())
    assert outcome.status == "postponed"
    with rt.engine.connect() as conn:
        pending = row(conn, retry)
    assert (pending["status"], pending["delivering_by"], pending["postponements"]) == ("pending_retry", None, 1)
    assert pending["next_retry_at"] > datetime.now(timezone.utc) + timedelta(minutes=55)
