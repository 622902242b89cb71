"""A row's bookkeeping times (SPEC §11): every write stuck-runs makes sets the `updated_at` role to
now, so ETL that syncs by it misses no change; creation and change times are never copied into a
retry (Rails' `updated_at`, Django's `created`/`modified`...)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from db.engine import make_engine
from db.errors import ConfigError
from db.layout import Layout
from db.migrate import migrate
from jobs.control import cancel_run
from jobs.dead_letters import requeue
from jobs.doctor import describe_mapping
from jobs.executors.outcome import Completed, Failed, Released
from jobs.manual import retry_run
from jobs.queueing import queue_due_retries
from jobs.retries import process_due_retries, supersede_completed_chains
from jobs.rules import RetryPolicy
from jobs.stuck import sweep_stuck_runs
from tests.conftest import REPO
from tests.helpers import ScriptedScraper, insert_due_retry, insert_run, make_runtime, row, rows

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
OLD = datetime(2000, 1, 1, tzinfo=timezone.utc)


def _age_everything(engine: sa.Engine) -> None:
    """Every row's bookkeeping time far in the past, so the next write's shows."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET updated_at = :old"), {"old": OLD})


def _touched(engine: sa.Engine) -> set:
    """The rows whose bookkeeping time the last step set to now."""
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT id FROM scrape_runs WHERE updated_at = :now"), {"now": NOW}).scalars())


def test_every_write_stuck_runs_makes_sets_updated_at_to_now(db_url):
    """One table, every write path: sweep (fail + retry), claim, completed, failed (+ retry), failed
    by the scraper itself, shutdown release, postponement, webhook hand-over, queue hand-off,
    cancel, supersede, manual retry, dead-letter requeue."""
    inside: dict[str, datetime] = {}

    def scraper(run):
        # What the claim wrote, seen while the retry runs; then aged again, so the outcome's write shows.
        with rt.engine.begin() as conn:
            inside[run.inputs["search_query"]] = row(conn, run.id)["updated_at"]
            conn.execute(sa.text("UPDATE scrape_runs SET updated_at = :old WHERE id = :id"), {"old": OLD, "id": run.id})
            if run.inputs["search_query"] == "scraper fails":
                conn.execute(sa.text("UPDATE scrape_runs SET status = 'failed' WHERE id = :id"), {"id": run.id})
        return {
            "ok": Completed(),
            "fails": Failed(error="HTTP 503 Service Unavailable"),
            "scraper fails": Failed(error="captcha wall"),
            "stopped": Released(),
        }[run.inputs["search_query"]]

    rt = make_runtime(db_url, ScriptedScraper(scraper), policy=RetryPolicy(max_retries=1))
    q = rt.queries
    with freeze_time(NOW):
        # The sweep: the stuck run failed, its retry created.
        with rt.engine.begin() as conn:
            stuck = insert_run(conn, started_at=NOW - timedelta(hours=2), search_query="ok")
        _age_everything(rt.engine)
        [swept] = sweep_stuck_runs(rt).attempts
        assert _touched(rt.engine) == {stuck, swept.retry_id}

        # Claims and outcomes: completed; failed with a retry; failed by the scraper; released on SIGTERM.
        with rt.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE scrape_runs SET next_retry_at = :t WHERE id = :id"), {"t": NOW, "id": swept.retry_id}
            )
            due = {what: insert_due_retry(conn, search_query=what, now=NOW)[1] for what in ("fails", "scraper fails")}
        _age_everything(rt.engine)
        outcomes = {o.run_id: o.status for o in process_due_retries(rt).executed}
        assert outcomes == {swept.retry_id: "completed", due["fails"]: "failed", due["scraper fails"]: "failed"}
        assert inside == {"ok": NOW, "fails": NOW, "scraper fails": NOW}  # each claim wrote it
        with rt.engine.connect() as conn:
            next_retry = {r["search_query"]: r["id"] for r in rows(conn, "status = 'pending_retry'")}
        next_retries = set(next_retry.values())
        assert len(next_retries) == 2  # retry 2 of each failed retry 1 (their rows inherit budget 4)
        assert _touched(rt.engine) == {swept.retry_id, *due.values(), *next_retries}

        with rt.engine.begin() as conn:
            _, stopping = insert_due_retry(conn, search_query="stopped", now=NOW)
        _age_everything(rt.engine)
        [released] = process_due_retries(rt).executed
        assert (released.run_id, released.status) == (stopping, "released")
        assert _touched(rt.engine) == {stopping}

        # A claim put back, and each step of a delivery to the fleet: the mark (its lease already
        # run out), the mark anew of a lapsed lease, the put-back (a postponement), the confirm.
        with rt.engine.begin() as conn:
            conn.execute(q.claim_one, {"sr_now": NOW, "sr_run_id": stopping})
        delivery = {"sr_run_id": stopping, "sr_mode": "webhook", "sr_by": "test delivery", "sr_limit": 1}
        lapsed = {**delivery, "sr_lease_until": NOW - timedelta(seconds=1)}
        for statement, params in (
            (q.unclaim, {"sr_due": NOW}),
            (q.mark_one, lapsed),
            (q.mark_expired, lapsed),
            (q.put_back, {**delivery, "sr_due": NOW, "sr_postponed": 1, "sr_marked_started": NOW}),
            (q.mark_one, {**delivery, "sr_lease_until": NOW + timedelta(minutes=1)}),
            (q.end_delivery, delivery),
        ):
            _age_everything(rt.engine)
            with rt.engine.begin() as conn:
                assert conn.execute(statement, {"sr_now": NOW, "sr_run_id": stopping, **params}).first()
            assert _touched(rt.engine) == {stopping}

        # Cancel by an operator.
        cancelled = next_retry["fails"]
        _age_everything(rt.engine)
        assert cancel_run(rt, cancelled).cancelled
        assert _touched(rt.engine) == {cancelled}

        # Supersede: the pending retry cancelled, the late completion's retry-due cleared.
        late_retry = next_retry["scraper fails"]
        with rt.engine.begin() as conn:
            late = row(conn, late_retry)["original_run_id"]
            conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": late})
        _age_everything(rt.engine)
        assert [s.run_id for s in supersede_completed_chains(rt)] == [late_retry]
        assert _touched(rt.engine) == {late_retry, late}

        # A manual retry: the failed attempt's next_retry_at and budget written, its retry created.
        with rt.engine.begin() as conn:
            failed = insert_run(conn, status="failed", started_at=NOW - timedelta(hours=1), error_message="boom")
        _age_everything(rt.engine)
        manual = retry_run(rt, failed)
        assert _touched(rt.engine) == {failed, manual.retry_id}

        # A dead letter requeued: a chain whose budget the failed retry above spent.
        spent = due["fails"]
        with rt.engine.connect() as conn:
            [chain_end] = [
                r["id"]
                for r in rows(conn, "original_run_id = :r AND retry_count = 2", r=row(conn, spent)["original_run_id"])
            ]
        _age_everything(rt.engine)
        with rt.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE scrape_runs SET status = 'failed', next_retry_at = NULL WHERE id = :id"),
                {"id": chain_end},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO scrape_run_dead_letters (run_id, chain_id, attempts, budget, pattern, last_error, inputs, created_at)"
                    " VALUES (:id, :id, 3, 1, 'server_error', 'HTTP 503', '{}', :now)"
                ),
                {"id": chain_end, "now": NOW},
            )
            conn.execute(sa.text("UPDATE scrape_runs SET updated_at = :old"), {"old": OLD})
        requeued = requeue(rt, str(chain_end))
        assert _touched(rt.engine) == {chain_end, requeued.retry_id}
    rt.close()

    # Handed to the fleet's queue (SCRAPE_RUN_HANDOFF).
    queued = Layout(statuses={"queued": ("pending",)})
    queued_rt = make_runtime(
        db_url, handoff="queued", layout=queued, max_concurrent_retries=5
    )  # one is handed over above
    with freeze_time(NOW):
        with queued_rt.engine.begin() as conn:
            _, waiting = insert_due_retry(conn, search_query="queued", now=NOW)
        _age_everything(queued_rt.engine)
        handed = {r.id for r in queue_due_retries(queued_rt)}  # with the retries scheduled by hand above
        assert waiting in handed and _touched(queued_rt.engine) == handed
    queued_rt.close()


def test_statements_that_write_runs_start_from_the_bumping_update():
    """New statements get the bookkeeping time for free: none writes the runs table but through
    `TableStatements._update` (and `_retry_rows` for the one INSERT)."""
    for path in (REPO / "db" / "queries").glob("*.py"):
        source = path.read_text()
        if path.name == "common.py":
            continue
        # Writes of the runs table (`t`, `self.t`); stuck-runs' own tables (progress, thresholds) are
        # no scraper's rows and have no bookkeeping time.
        executed = [m for m in re.finditer(r"(?:sa\.update|insert)\((?:self\.)?t\b", source)]
        # reports.py prints an UPDATE for an operator to run; stuck-runs never executes it.
        allowed = 1 if path.name == "reports.py" else 0
        assert len(executed) == allowed, f"{path.name} writes the runs table without TableStatements._update"


DJANGO = """
CREATE TABLE scraper_run (
    id BIGSERIAL PRIMARY KEY,
    keyword VARCHAR(200) NOT NULL,
    status VARCHAR(20) NOT NULL,
    error_message TEXT,
    started_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    created TIMESTAMPTZ NOT NULL,
    modified TIMESTAMPTZ NOT NULL,
    updated BOOLEAN NOT NULL DEFAULT false
)
"""


def test_a_django_shaped_table_gets_fresh_created_and_modified_on_retries(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(DJANGO)
    migrate(engine, "scraper_run")
    engine.dispose()
    rt = make_runtime(db_url, table="scraper_run")
    assert rt.runs.updated == "modified"  # recognised without a mapping: the one written on every write
    assert ", updated_at=modified (timestamp with time zone); status values" in describe_mapping(rt.runs)
    hours_ago = NOW - timedelta(hours=3)
    with rt.engine.begin() as conn:
        stuck = conn.execute(
            sa.text(
                "INSERT INTO scraper_run (keyword, status, started_at, created, modified, updated)"
                " VALUES ('shoes', 'running', :t, :t, :t, true) RETURNING id"
            ),
            {"t": hours_ago},
        ).scalar_one()
    with freeze_time(NOW):
        [attempt] = sweep_stuck_runs(rt).attempts
    with rt.engine.connect() as conn:
        failed, retry = (
            conn.execute(
                sa.text("SELECT * FROM scraper_run WHERE id IN (:a, :b) ORDER BY retry_count"),
                {"a": stuck, "b": attempt.retry_id},
            )
            .mappings()
            .all()
        )
    assert (failed["created"], failed["modified"]) == (hours_ago, NOW)  # the failure is a change
    assert (retry["created"], retry["modified"]) == (NOW, NOW)  # a new row, made now: not hours old
    assert retry["keyword"] == "shoes" and retry["updated"] is True  # a boolean `updated` is an input
    rt.close()


def test_column_map_names_the_updated_at_role(db_url):
    with make_engine(db_url).begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN synced_at TIMESTAMPTZ, ADD COLUMN note TEXT")
    rt = make_runtime(db_url, layout=Layout(columns={"updated_at": "synced_at"}))
    assert rt.runs.updated == "synced_at" and "synced_at" not in rt.runs.input_columns
    with rt.engine.begin() as conn:
        stuck = insert_run(conn, started_at=NOW - timedelta(hours=2))
    with freeze_time(NOW):
        [attempt] = sweep_stuck_runs(rt).attempts
    with rt.engine.connect() as conn:
        assert row(conn, stuck)["synced_at"] == NOW and row(conn, attempt.retry_id)["synced_at"] == NOW
        assert row(conn, stuck)["updated_at"] is None  # the mapped column is the one written
    rt.close()
    with pytest.raises(ConfigError, match="COLUMN_MAP: updated_at=note .* no writable timestamp of scrape_runs"):
        make_runtime(db_url, layout=Layout(columns={"updated_at": "note"}))
