"""`cancel`, `pause` and `resume` (SPEC §6), from the CLI, the API and a real daemon."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from jobs.control import pause_retries, resume_retries
from jobs.events import PauseBegan, PauseEnded
from tests.daemons import DaemonProcess, wait_until
from tests.helpers import insert_due_retry, insert_run, make_runtime, row, rows
from tests.integration.test_cli import cli, one_line_error
from tests.web import ADMIN, READER, InProcessWeb

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc)


def due_retry(engine, **columns) -> tuple[uuid.UUID, uuid.UUID]:
    with engine.begin() as conn:
        return insert_due_retry(conn, **columns)


def status_of(engine, run_id) -> str:
    with engine.connect() as conn:
        return row(conn, run_id)["status"]


# -- cancel ---------------------------------------------------------------------------------------


def test_cancel_ends_the_chain_s_pending_retry_and_refuses_a_second_time(engine, db_url):
    root, retry = due_retry(engine)
    env = {"DATABASE_URL": db_url}
    preview = cli("cancel", str(root), "--dry-run", env=env)
    assert preview.returncode == 0, preview.stderr
    assert "Would cancel 1 pending retry" in preview.stdout and status_of(engine, retry) == "pending_retry"
    done = cli("cancel", str(root), env=env)  # named by the chain's root: its pending retry is cancelled
    assert done.returncode == 0, done.stderr
    assert "Cancelled 1 pending retry" in done.stdout
    with engine.connect() as conn:
        cancelled = row(conn, retry)
    assert cancelled["status"] == "cancelled" and cancelled["error_message"] == "Cancelled by operator"
    assert cancelled["completed_at"] is not None and cancelled["next_retry_at"] is None
    again = cli("cancel", str(retry), env=env)
    assert again.returncode == 1
    assert "has no pending retry to cancel" in one_line_error(again)
    history = cli("history", str(root), env=env)
    assert "cancelled" in history.stdout and "Cancelled by operator" in history.stdout


def test_bulk_cancel_takes_retry_s_filters(engine, db_url):
    _, blocked = due_retry(engine, search_query="Data Engineer")
    _, other = due_retry(engine, search_query="Nurse")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET error_message = 'HTTP 403 Forbidden' WHERE status = 'failed'"))
    env = {"DATABASE_URL": db_url}
    preview = cli("cancel", "--error-like", "%403%", "--dry-run", "--json", env=env)
    assert [item["retry_id"] for item in json.loads(preview.stdout)["cancelled"]] == [str(blocked), str(other)]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE scrape_runs SET error_message = 'HTTP 503' WHERE original_run_id IS NULL AND "
                "search_query = 'Nurse'"
            )
        )
    done = cli("cancel", "--error-like", "%403%", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert [item["retry_id"] for item in json.loads(done.stdout)["cancelled"]] == [str(blocked)]
    assert status_of(engine, blocked) == "cancelled" and status_of(engine, other) == "pending_retry"
    by_query = cli("cancel", "--search-query", "nur%", env=env)
    assert by_query.returncode == 0 and status_of(engine, other) == "cancelled"


def test_cancel_without_a_run_or_filters_is_a_usage_error(db_url):
    result = cli("cancel", env={"DATABASE_URL": db_url})
    assert result.returncode == 2
    assert "give a RUN_ID, or filters" in one_line_error(result)


# -- pause and resume -------------------------------------------------------------------------------


def test_a_paused_daemon_starts_no_retry_until_resumed(engine, db_url, tmp_path):
    env = {"DATABASE_URL": db_url}
    assert cli("pause", env=env).returncode == 0
    _, retry = due_retry(engine, search_query="ok now")
    daemon = DaemonProcess(db_url, FAKE_SCRAPER_LOG=str(tmp_path), DISPATCH_POLL="1s", PROCESS_INTERVAL="2s")
    try:
        wait_until(lambda: "retry_processor" in daemon.output() or daemon.poll() is not None, timeout=30)
        # the processor's tick says why nothing started, in the daemon's log: it had its chance
        wait_until(lambda: "1 due retry held by a pause until resumed by cli on " in daemon.output(), timeout=30)
        assert status_of(engine, retry) == "pending_retry"
        status = cli("status", env=env)
        assert "Retries paused until resumed" in status.stdout
        resumed = cli("resume", env=env)
        assert resumed.returncode == 0 and "Retries resumed." in resumed.stdout
        wait_until(lambda: status_of(engine, retry) == "completed", timeout=30)
    finally:
        log = daemon.stop()
    assert "Traceback" not in log
    assert "Retries were not paused" in cli("resume", env=env).stdout


def test_a_pause_for_a_while_ends_by_itself(engine, db_url):
    env = {"DATABASE_URL": db_url}
    paused = cli("pause", "--for", "6s", "--json", env=env)
    # Long enough for the next two commands on a loaded machine, short enough to wait for its end.
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["until"] is not None
    _, retry = due_retry(engine)
    held = cli("process", "--json", env={**env, "SCRAPE_RUN_COMMAND": "true"})
    assert held.returncode == 0, held.stderr
    assert status_of(engine, retry) == "pending_retry"
    wait_until(lambda: "Retries paused" not in cli("status", env=env).stdout, timeout=15)
    ran = cli("process", env={**env, "SCRAPE_RUN_COMMAND": "true"})
    assert ran.returncode == 0, ran.stderr
    assert status_of(engine, retry) == "completed"


def test_a_pause_and_its_end_are_published_once_each(db_url):
    rt = make_runtime(db_url)
    seen = []
    rt.events.subscribe(seen.append)
    try:
        began = pause_retries(rt, timedelta(hours=1), via="api")
        ended = resume_retries(rt)
        assert resume_retries(rt) is None  # nothing standing: nothing ended
    finally:
        rt.close()
    assert seen == [PauseBegan(began), PauseEnded(ended)]
    assert ended.paused_by == began.paused_by and "api on" in began.paused_by


def test_retry_now_is_refused_while_paused(engine, db_url):
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"}
    with engine.begin() as conn:
        failed = conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, started_at, error_message) "
                "VALUES ('q', 'l', 'failed', now() - interval '2 hours', 'HTTP 503') RETURNING id"
            )
        ).scalar_one()
    assert cli("pause", "--for", "1h", env=env).returncode == 0
    before = rows_of(engine)
    result = cli("retry", str(failed), "--now", env=env)
    assert result.returncode == 1
    assert "stuck-runs resume" in one_line_error(result)
    assert rows_of(engine) == before


def rows_of(engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(json.dumps(r, default=str, sort_keys=True) for r in rows(conn))


def test_bad_pause_length_is_one_line_and_exit_2(db_url):
    result = cli("pause", "--for", "soon", env={"DATABASE_URL": db_url})
    assert result.returncode == 2
    assert "--for='soon' is not a duration" in one_line_error(result)


# -- over HTTP ---------------------------------------------------------------------------------------


def test_cancel_pause_and_resume_over_the_api(engine, db_url):
    root, retry = due_retry(engine)
    web = InProcessWeb(db_url)
    try:
        with web.client(READER) as reader:
            assert reader.post(f"/api/runs/{root}/cancel").status_code == 403
            assert reader.post("/api/pause").status_code == 403
        with web.client(ADMIN) as http:
            paused = http.post("/api/pause", params={"for": "4h"}).json()
            status = http.get("/api/status").json()["data"]
            cancelled = http.post(f"/api/runs/{root}/cancel")
            again = http.post(f"/api/runs/{root}/cancel")
            resumed = http.post("/api/resume").json()
            bad = http.post("/api/pause", params={"for": "-1h"})
    finally:
        web.stop()
    assert paused["success"] and paused["message"].startswith("Retries paused until ")
    assert status["pause"]["paused_by"].startswith("api on ")
    assert cancelled.status_code == 200 and cancelled.json()["message"] == "Retry 1/4 cancelled"
    assert status_of(engine, retry) == "cancelled"
    assert again.status_code == 400 and again.json()["error"] == "Run cannot be cancelled"
    assert again.json()["details"]["currentStatus"] == "cancelled"
    assert resumed == {
        "success": True,
        "data": {"resumed": True, "pause": resumed["data"]["pause"]},
        "message": "Retries resumed",
    }
    assert bad.status_code == 400


def test_doctor_names_a_role_that_cannot_read_the_pause(db_url, engine):
    """Every claim reads stuck_runs_pauses: a role without it would start no retry, doctor passing."""
    import uuid as ids

    role = f"sr_nopause_{ids.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        conn.exec_driver_sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
        conn.exec_driver_sql(f"REVOKE ALL ON stuck_runs_pauses FROM {role}")
    url = sa.engine.make_url(db_url).set(username=role).render_as_string(hide_password=False)
    try:
        result = cli("doctor", env={"DATABASE_URL": url, "SCRAPE_RUN_COMMAND": "true"})
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
    assert result.returncode == 1, (result.stdout, result.stderr)
    [line] = [line for line in result.stdout.splitlines() if line.startswith("✗ privileges")] or [result.stderr]
    assert "SELECT on stuck_runs_pauses" in line


def test_one_table_spelled_two_ways_is_one_pause_one_set_of_slots_and_run_locks(engine, db_url):
    """`public.scrape_runs` and `scrape_runs` are the same table: a pause, a slot or a run lock taken
    under one spelling holds for a process configured with the other."""
    from tests.helpers import make_runtime

    _, retry = due_retry(engine)
    qualified = {"DATABASE_URL": db_url, "SCRAPE_RUNS_TABLE": "public.scrape_runs"}
    assert cli("pause", env=qualified).returncode == 0
    plain = cli("process", env={"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"})
    assert plain.returncode == 0, plain.stderr
    assert status_of(engine, retry) == "pending_retry"
    assert "Retries paused" in cli("status", env={"DATABASE_URL": db_url}).stdout
    one, other = make_runtime(db_url), make_runtime(db_url, table="public.scrape_runs")
    try:
        assert one.queries.runs_ns == other.queries.runs_ns
        assert one.runs.canonical_name == other.runs.canonical_name == "scrape_runs"
    finally:
        one.close()
        other.close()


def test_bulk_cancel_by_a_column_the_table_lacks_is_one_line(db_url, engine):
    """It was a KeyError traceback: bulk cancel now checks its filters as bulk retry does."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE fetches (id SERIAL PRIMARY KEY, url TEXT, status TEXT NOT NULL, error_message TEXT,"
            " started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ)"
        )
    env = {"DATABASE_URL": db_url, "SCRAPE_RUNS_TABLE": "fetches"}
    assert cli("migrate", env=env).returncode == 0
    result = cli("cancel", "--search-query", "x", env=env)
    assert result.returncode == 2
    assert one_line_error(result) == (
        "stuck-runs: --search-query: fetches has no search_query column; filter with --error-like or --since"
    )


# -- bulk actions say what they matched and what they skipped ------------------------------------------


def failed_chains(engine, count: int, **columns) -> None:
    """`count` failed chains (roots, stuck, budget 4 left), set-based."""
    names = "".join(f", {name}" for name in columns)
    values = "".join(f", {value}" for value in columns.values())
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at,"
                f" error_message, failure_pattern{names}) SELECT 'Bulk ' || g, 'Belgium', 'failed',"
                f" now() - interval '3 hours', now() - interval '2 hours', 'HTTP 503 from the site', 'server_error'"
                f"{values} FROM generate_series(1, :n) g"
            ),
            {"n": count},
        )


def test_bulk_retry_says_how_many_matched_beyond_its_limit_and_lists_every_skip_with_its_reason(engine, db_url):
    failed_chains(engine, 7)
    with engine.begin() as conn:
        spent = insert_run(conn, status="failed", search_query="Bulk spent", error_message="HTTP 503 from the site")
        insert_run(  # its last retry, 4 of 4, failed: the budget is spent
            conn,
            status="failed",
            search_query="Bulk spent",
            error_message="HTTP 503 from the site",
            is_retry=True,
            retry_count=4,
            max_retries=4,
            original_run_id=spent,
            failure_pattern="server_error",
            started_at=NOW,
            completed_at=NOW,
        )
        # a chain whose retry an operator cancelled: over, not retryable
        root, retry = insert_due_retry(conn, search_query="Bulk cancelled")
        site_error = "UPDATE scrape_runs SET error_message = 'HTTP 503 from the site' WHERE id = :r"
        conn.execute(sa.text(site_error), {"r": root})
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'cancelled' WHERE id = :r"), {"r": retry})
    env = {"DATABASE_URL": db_url}
    preview = cli("retry", "--error-like", "%503%", "--limit", "3", "--dry-run", env=env)
    assert preview.returncode == 0, preview.stderr
    first = preview.stdout.splitlines()[0]
    assert first.startswith("Would retry 2 of 8 matching failed chain(s); 2 skipped"), preview.stdout  # 3 taken
    assert "--limit 8" in preview.stdout, preview.stdout
    report = json.loads(cli("retry", "--error-like", "%503%", "--limit", "100", "--dry-run", "--json", env=env).stdout)
    assert (report["matched"], len(report["scheduled"])) == (8, 7)
    reasons = {item["label"]: item["reason"] for item in report["skipped"]}
    assert "spent its retry budget" in reasons["[RETRY 4/4] Bulk spent in Belgium"], reasons
    assert "cancelled" in reasons["Bulk cancelled in Belgium"], reasons
    text = cli("retry", "--error-like", "%503%", "--dry-run", env=env).stdout
    assert "2 skipped" in text.splitlines()[0] and "Bulk cancelled in Belgium" in text, text
    server = InProcessWeb(db_url)
    try:
        with server.client(ADMIN) as http:
            answer = http.post("/api/runs/retry", json={"error_like": "%503%", "limit": 3}).json()
    finally:
        server.stop()
    assert answer["success"] and answer["data"]["matched"] == 8 and len(answer["data"]["scheduled"]) == 2
    assert answer["message"] == answer["data"]["message"] and "of 8" in answer["message"]


def test_bulk_retry_says_how_many_chains_beyond_its_limit_are_over(engine, db_url):
    """Five chains whose retry was cancelled, a limit of 2: it said "0 of 0 ...; 2 skipped", not a word of the 3."""
    for n in range(5):
        with engine.begin() as conn:
            _, retry = insert_due_retry(conn, search_query=f"Blocked {n}")
            conn.execute(sa.text("UPDATE scrape_runs SET status = 'cancelled' WHERE id = :r"), {"r": retry})
    said = cli("retry", "--search-query", "Blocked%", "--limit", "2", "--dry-run", env={"DATABASE_URL": db_url})
    assert said.returncode == 0, said.stderr
    assert said.stdout.splitlines()[0] == (
        "Would retry 0 of 0 matching failed chain(s); 2 skipped; 5 matching chain(s) are over, their retry "
        "cancelled (the first 2 listed: --limit 5 lists them all)."
    ), said.stdout


def test_bulk_cancel_says_how_many_matched_beyond_its_limit_over_cli_json_and_api(engine, db_url):
    for n in range(5):
        due_retry(engine, search_query=f"Blocked {n}")
    env = {"DATABASE_URL": db_url}
    preview = cli("cancel", "--search-query", "Blocked%", "--limit", "2", "--dry-run", env=env)
    assert preview.returncode == 0, preview.stderr
    assert preview.stdout.startswith("Would cancel 2 of 5 matching pending retry(ies)"), preview.stdout
    assert "--limit 5" in preview.stdout
    report = json.loads(cli("cancel", "--search-query", "Blocked%", "--limit", "2", "--json", env=env).stdout)
    assert report["matched"] == 5 and len(report["cancelled"]) == 2 and report["skipped"] == []
    server = InProcessWeb(db_url)
    try:
        with server.client(ADMIN) as http:
            preview = http.post("/api/runs/cancel", json={"search_query": "Blocked%", "limit": 2}).json()
            done = http.post("/api/runs/cancel", json={"search_query": "Blocked%", "dry_run": False}).json()
    finally:
        server.stop()
    assert preview["success"] and preview["data"]["matched"] == 3 and preview["data"]["dry_run"] is True
    assert "Would cancel 2 of 3" in preview["message"]
    assert done["data"]["matched"] == 3 and len(done["data"]["cancelled"]) == 3
    with engine.connect() as conn:
        assert {r["status"] for r in rows(conn, "search_query LIKE 'Blocked%' AND is_retry")} == {"cancelled"}


# -- why nothing started ---------------------------------------------------------------------------


def test_process_status_api_and_overview_say_why_due_retries_wait(engine, db_url):
    """Paused, or every slot taken by a retry handed to the fleet: `process` used to print
    "0 superseded, 0 executed" (and `--dry-run` "would execute 2") without a word why."""
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "true"}
    retries = [due_retry(engine, search_query=f"Waiting {n}")[1] for n in range(2)]
    assert cli("pause", env=env).returncode == 0
    paused = cli("process", env=env)
    assert paused.returncode == 0, paused.stderr
    lines = paused.stdout.splitlines()
    [why] = [line for line in lines if "held by a pause" in line]
    assert why.startswith("Nothing started: 2 due retries held by a pause until resumed by cli on "), paused.stdout
    dry = cli("process", "--dry-run", env=env)
    assert "Nothing starts now: 2 due retries held by a pause until resumed" in dry.stdout, dry.stdout
    as_json = json.loads(cli("process", "--json", env=env).stdout)
    assert as_json["waiting"]["due"] == 2 and as_json["waiting"]["message"].startswith("2 due retries held by a pause")
    status = cli("status", env=env)
    assert "2 due retries held by a pause until resumed by cli on " in status.stdout, status.stdout
    server = InProcessWeb(db_url)
    try:
        with server.client(READER) as http:
            api = http.get("/api/status").json()["data"]
            overview = http.get("/").text
    finally:
        server.stop()
    assert api["waiting"]["message"].startswith("2 due retries held by a pause until resumed by cli on ")
    assert "2 due retries held by a pause until resumed by cli on " in overview
    assert [status_of(engine, r) for r in retries] == ["pending_retry"] * 2

    assert cli("resume", env=env).returncode == 0
    with engine.begin() as conn:  # the one slot (MAX_CONCURRENT_RETRIES=1) is a hand-off the fleet runs
        insert_run(conn, status="running", search_query="At the fleet", started_at=NOW, handed_off="webhook")
    full = cli("process", env=env)
    assert full.returncode == 0, full.stderr
    assert "Nothing started: 2 due retries waiting for a slot (cap 1)" in full.stdout, full.stdout
    assert "2 due retries waiting for a slot (cap 1)" in cli("status", env=env).stdout
    assert [status_of(engine, r) for r in retries] == ["pending_retry"] * 2
