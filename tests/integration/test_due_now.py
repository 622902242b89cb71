"""An operator making a pending retry due now: the service, and `retry RUN_ID --now` on it."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime, timedelta, timezone

import pytest
from freezegun import freeze_time

from db.engine import make_engine
from db.errors import DueNowRefused, RunNotFound
from jobs.due_now import make_due_now
from jobs.retries import preview_due
from tests.conftest import REPO
from tests.helpers import insert_due_retry, insert_run, make_runtime, row
from tests.integration.test_cli import cli

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
LATER = NOW + timedelta(hours=3)


@pytest.fixture
def rt(db_url):
    runtime = make_runtime(db_url)
    yield runtime
    runtime.close()


def test_a_pending_retry_is_made_due_now_its_budget_untouched(rt):
    with rt.engine.begin() as conn:
        root, retry = insert_due_retry(conn, due=LATER, retry_count=2, max_retries=4, now=NOW)
    with freeze_time(NOW):
        assert preview_due(rt) == ()
        done = make_due_now(rt, retry)
        assert done.message == "Retry 2/4 of Data Architect in Belgium is due now"
        assert [d.run_id for d in preview_due(rt)] == [retry]  # the next free slot takes it
    with rt.engine.connect() as conn:
        pending = row(conn, retry)
        assert (pending["status"], pending["next_retry_at"], pending["retry_count"], pending["max_retries"]) == (
            "pending_retry",
            NOW,
            2,
            4,
        )
        assert row(conn, root)["next_retry_at"] == LATER  # the failed attempt's record of when it was due stays


def test_the_failed_attempt_given_makes_its_chains_retry_due_and_one_already_due_is_left(rt):
    with rt.engine.begin() as conn:
        root, retry = insert_due_retry(conn, due=LATER, now=NOW)
    with freeze_time(NOW):
        assert make_due_now(rt, root).retry_id == retry
        again = make_due_now(rt, retry)
    assert not again.changed and again.message.endswith("was already due (since 2026-11-22 10:00 UTC)")


@pytest.mark.parametrize("status", ["failed", "completed", "running", "cancelled"])
def test_nothing_pending_is_refused_and_changes_nothing(rt, status):
    with rt.engine.begin() as conn:
        run_id = insert_run(conn, status=status, started_at=NOW - timedelta(hours=1), next_retry_at=LATER)
    with pytest.raises(DueNowRefused, match=f"has no pending retry to make due now: run {run_id} is {status}"):
        make_due_now(rt, run_id)
    with rt.engine.connect() as conn:
        assert row(conn, run_id)["next_retry_at"] == LATER
    with pytest.raises(RunNotFound):
        make_due_now(rt, rt.runs.parse_id("3f2b8c1e-4a5d-4e6f-9a7b-1c2d3e4f5a6b"))


def test_a_pending_retry_of_a_chain_that_completed_is_not_made_due(rt):
    with rt.engine.begin() as conn:
        root, retry = insert_due_retry(conn, due=LATER, now=NOW)
        insert_run(conn, status="completed", retry_count=2, is_retry=True, original_run_id=root)  # completed late
    with pytest.raises(DueNowRefused, match="its chain completed with run .*, so it will be superseded"):
        make_due_now(rt, retry)
    with rt.engine.connect() as conn:
        assert row(conn, retry)["next_retry_at"] == LATER


def test_retry_now_on_a_pending_retry_makes_it_due_and_executes_it_here(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        root, retry = insert_due_retry(
            conn, search_query="ok please", due=datetime.now(timezone.utc) + timedelta(hours=3), retry_count=2
        )
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tests' / 'fake_scraper.py'))} {{run_id}}"
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": command}
    refused = cli("retry", str(retry), env=env)  # without --now: already scheduled, as before
    assert refused.returncode == 1 and "already scheduled for retry" in refused.stderr
    done = cli("retry", str(retry), "--now", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["Retry 2/4 of ok please in Belgium is due now", "Executed: completed"]
    with engine.connect() as conn:
        assert row(conn, retry)["status"] == "completed"
        assert row(conn, root)["status"] == "failed"  # no second retry was scheduled
    engine.dispose()
