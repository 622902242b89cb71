"""The HTTP API (SPEC §13) on a real PostgreSQL: every shape and status code, every refusal,
nothing changed by a refused request, asked of the app `serve` builds, in-process; what only a
process shows (its start, bind, log, a database outage, systemd) asked of a real `stuck-runs serve`."""

from __future__ import annotations

import json
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from tests.helpers import insert_run, insert_stuck_runs, row, rows
from tests.integration.test_cli import cli, one_line_error
from tests.own_server import migrated_server
from tests.web import ADMIN, READER, InProcessWeb, WebServer

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc)


def failed_run(engine, **columns) -> uuid.UUID:
    with engine.begin() as conn:
        values = {
            "status": "failed",
            "started_at": NOW - timedelta(hours=3),
            "completed_at": NOW - timedelta(hours=2),
            "error_message": "HTTP 503 from the site",
            **columns,
        }
        return insert_run(conn, **values)


def snapshot(engine) -> list[dict]:
    with engine.connect() as conn:
        return sorted(json.dumps(r, default=str, sort_keys=True) for r in rows(conn))


# -- retry --------------------------------------------------------------------------------------


def explain(rt, statement, params) -> str:
    """PostgreSQL's plan for `statement` with `params`, as text."""
    with rt.engine.connect() as conn:

        @sa.event.listens_for(conn, "before_cursor_execute", retval=True)
        def explained(_conn, _cursor, sql, parameters, _context, _many):
            return "EXPLAIN " + sql, parameters

        result = conn.execute(statement, params)
        return "\n".join(str(line[0]) for line in result.cursor.fetchall())


def test_retry_schedules_the_retry_and_answers_with_it(web, engine):
    run_id = failed_run(engine)
    with web.client(ADMIN) as http:
        answer = http.post(f"/api/runs/{run_id}/retry")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True
    assert body["message"] == "Run scheduled for retry (attempt 1/4)"
    retry = body["data"]
    assert retry["status"] == "pending_retry"
    assert retry["original_run_id"] == str(run_id)
    assert retry["retry_count"] == 1 and retry["is_retry"] is True
    assert retry["label"] == "[RETRY 1/4] Data Architect in Belgium"
    with engine.connect() as conn:
        stored = row(conn, uuid.UUID(retry["id"]))
    assert stored["status"] == "pending_retry" and stored["original_run_id"] == run_id


def test_retry_refusals_mirror_the_retry_api_and_change_nothing(web, engine):
    with engine.begin() as conn:
        completed = insert_run(conn, status="completed", started_at=NOW - timedelta(hours=1))
    spent = failed_run(engine, retry_count=4, max_retries=4, is_retry=True)
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        missing = http.post(f"/api/runs/{uuid.uuid4()}/retry")
        malformed = http.post("/api/runs/not-a-uuid/retry")
        done = http.post(f"/api/runs/{completed}/retry")
        budget = http.post(f"/api/runs/{spent}/retry")
    assert missing.status_code == 404 and missing.json()["error"] == "Run not found"
    assert missing.json()["success"] is False
    assert malformed.status_code == 400 and "is not a run id" in malformed.json()["error"]
    assert done.status_code == 400
    assert done.json()["error"] == "Run cannot be retried"
    assert done.json()["details"]["currentStatus"] == "completed"
    assert "nothing to retry" in done.json()["details"]["reason"]
    assert budget.status_code == 400
    assert budget.json()["error"] == "Run has exceeded maximum retry attempts"
    details = budget.json()["details"]
    assert details["runId"] == str(spent)
    assert (details["currentRetries"], details["maxRetries"]) == (4, 4)
    assert details["lastError"] == "HTTP 503 from the site"
    assert details["failurePattern"] == "server_error"
    assert snapshot(engine) == before


def test_due_now_makes_a_pending_retry_due_and_refuses_what_is_not_pending(web, engine, db_url):
    from tests.helpers import insert_due_retry

    with engine.begin() as conn:
        root, retry = insert_due_retry(conn, due=NOW + timedelta(hours=3), retry_count=2)
    completed = failed_run(engine, status="completed")
    with web.client(READER) as http:
        assert http.post(f"/api/runs/{retry}/due-now").status_code == 403  # an action: the admin token's
    with web.client(ADMIN) as http:
        answer = http.post(f"/api/runs/{retry}/due-now")
        before = snapshot(engine)
        done = http.post(f"/api/runs/{completed}/due-now")
        missing = http.post(f"/api/runs/{uuid.uuid4()}/due-now")
        malformed = http.post("/api/runs/not-a-uuid/due-now")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True and body["message"] == "Retry 2/4 of Data Architect in Belgium is due now"
    assert body["data"]["retry_id"] == str(retry) and body["data"]["changed"] is True
    with engine.connect() as conn:
        stored = row(conn, retry)
    assert stored["status"] == "pending_retry" and stored["next_retry_at"] <= datetime.now(timezone.utc)
    assert done.status_code == 409 and done.json()["error"] == "Run has no pending retry"
    assert done.json()["details"]["currentStatus"] == "completed"
    assert missing.status_code == 404 and malformed.status_code == 400
    assert snapshot(engine) == before


def test_reset_budget_retries_a_spent_chain(web, engine):
    spent = failed_run(engine, retry_count=4, max_retries=4, is_retry=True, original_run_id=None)
    with web.client(ADMIN) as http:
        answer = http.post(f"/api/runs/{spent}/retry", params={"reset_budget": "true"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"] == "Run scheduled for retry (attempt 5/8)"


# -- reset-stuck ------------------------------------------------------------------------------------


def test_reset_stuck_runs_the_sweep_with_the_given_threshold(web, engine):
    now = datetime.now(timezone.utc)  # its message names the hours stuck: not the module's import time
    with engine.begin() as conn:
        insert_stuck_runs(conn, 3, now - timedelta(minutes=45))
        fresh = insert_run(conn, started_at=now - timedelta(minutes=10))
    with web.client(ADMIN) as http:
        preview = http.post("/api/runs/reset-stuck", params={"timeout_minutes": 30, "dry_run": "true"})
        unchanged = snapshot(engine)
        answer = http.post("/api/runs/reset-stuck", params={"timeout_minutes": 30})
        again = http.post("/api/runs/reset-stuck", params={"timeout_minutes": 30})
    assert preview.json()["reset_count"] == 3 and preview.json()["dry_run"] is True
    assert preview.json()["message"] == "Would reset 3 stuck run(s)"
    body = answer.json()
    assert answer.status_code == 200 and body["success"] is True
    assert body["reset_count"] == 3 and len(body["run_ids"]) == 3 and len(body["retry_ids"]) == 3
    assert body["message"] == "Reset 3 stuck run(s)"
    with engine.connect() as conn:
        failed = rows(conn, "status = 'failed'")
        retries = rows(conn, "status = 'pending_retry'")
        assert row(conn, fresh)["status"] == "running"
    assert unchanged != snapshot(engine)  # the dry run changed nothing; the real one did
    assert sorted(str(r["id"]) for r in failed) == sorted(body["run_ids"])
    assert sorted(str(r["id"]) for r in retries) == sorted(body["retry_ids"])
    assert {r["error_message"] for r in failed} == {"Run stuck for 0.8h - retry 1/4 scheduled"}
    assert again.json() == {
        "success": True,
        "reset_count": 0,
        "run_ids": [],
        "retry_ids": [],
        "dry_run": False,
        "message": "Reset 0 stuck run(s)",
    }


@pytest.mark.parametrize("timeout", ["-5", "0", "soon", ""])
def test_reset_stuck_refuses_a_bad_timeout(web, engine, timeout):
    with engine.begin() as conn:
        insert_stuck_runs(conn, 2, NOW - timedelta(hours=2))
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        answer = http.post("/api/runs/reset-stuck", params={"timeout_minutes": timeout})
    assert answer.status_code == 400, answer.text
    assert answer.json()["success"] is False and "timeout_minutes" in answer.json()["error"]
    assert snapshot(engine) == before


def test_reset_stuck_from_many_clients_at_once_fails_each_run_once(web, engine, db_url):
    with engine.begin() as conn:
        insert_stuck_runs(conn, 300, NOW - timedelta(hours=2))
    answers: list = []

    def call() -> None:
        with web.client(ADMIN) as http:
            answers.append(http.post("/api/runs/reset-stuck", params={"timeout_minutes": 60}).json())

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    checked = cli("check", env={"DATABASE_URL": db_url})
    for thread in threads:
        thread.join()
    assert checked.returncode == 0, checked.stderr
    with engine.connect() as conn:
        assert rows(conn, "status = 'running'") == []
        retries = rows(conn, "status = 'pending_retry'")
    assert len(retries) == 300 and len({r["original_run_id"] for r in retries}) == 300
    reset = [run_id for answer in answers for run_id in answer.get("run_ids", [])]
    assert len(reset) == len(set(reset))  # no run reported reset by two calls


# -- bulk retry -----------------------------------------------------------------------------------


def test_bulk_retry_is_a_dry_run_unless_told_otherwise(web, engine):
    ids = [failed_run(engine, search_query=f"job {n}") for n in range(3)]
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        preview = http.post("/api/runs/retry", json={"error_like": "%503%"})
        assert snapshot(engine) == before
        done = http.post("/api/runs/retry", json={"error_like": "%503%", "dry_run": False})
        unknown = http.post("/api/runs/retry", json={"error_lik": "%503%", "dry_run": False})
    assert preview.json()["data"]["dry_run"] is True
    assert len(preview.json()["data"]["scheduled"]) == 3
    assert done.status_code == 200 and len(done.json()["data"]["scheduled"]) == 3
    with engine.connect() as conn:
        assert sorted(r["original_run_id"] for r in rows(conn, "status = 'pending_retry'")) == sorted(ids)
    assert unknown.status_code == 400 and "error_lik" in unknown.json()["error"]


# -- reads ------------------------------------------------------------------------------------------


def test_reads_answer_with_the_cli_s_documents(web, engine, db_url):
    run_id = failed_run(engine)
    with web.client(ADMIN) as http:
        http.post(f"/api/runs/{run_id}/retry")
    with web.client(READER) as http:
        chain = http.get(f"/api/runs/{run_id}").json()
        status = http.get("/api/status").json()
        stats = http.get("/api/stats", params={"since": "1d"}).json()
        letters = http.get("/api/dead-letters").json()
        health = http.get("/api/health").json()
    history = cli("history", str(run_id), "--json", env={"DATABASE_URL": db_url})
    assert chain["data"]["chain"] == json.loads(history.stdout)
    assert chain["data"]["run"]["id"] == str(run_id)
    assert status["success"] and status["data"]["runs"]["pending_retry"] == 1
    assert stats["success"] and "retries" in stats["data"]
    assert letters == {"success": True, "data": []}
    assert health == {"success": True, "status": "ok"}


def test_an_unknown_parameter_is_an_error_not_ignored(web):
    with web.client(READER) as http:
        answer = http.get("/api/dead-letters", params={"patern": "not_found"})
        unknown_path = http.get("/api/nothing-here")
    assert answer.status_code == 400
    assert answer.json()["error"] == "Unknown parameter: patern"
    assert "pattern" in answer.json()["details"]["accepted"]
    assert unknown_path.status_code == 404 and unknown_path.json()["success"] is False


def test_dead_letters_show_and_requeue(web, engine):
    spent = failed_run(engine, retry_count=4, max_retries=4, is_retry=True, error_message="HTTP 404")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO scrape_run_dead_letters (run_id, chain_id, attempts, budget, pattern, last_error, inputs)"
                " VALUES (:r, :r, 5, 4, 'not_found', 'HTTP 404', '{}')"
            ),
            {"r": spent},
        )
    with web.client(ADMIN) as http:
        listed = http.get("/api/dead-letters").json()["data"]
        one = http.get(f"/api/dead-letters/{listed[0]['id']}")
        missing = http.get("/api/dead-letters/99999")
        requeued = http.post(f"/api/dead-letters/run:{spent}/requeue")
    assert [letter["run_id"] for letter in listed] == [str(spent)]
    assert one.json()["data"]["pattern"] == "not_found"
    assert missing.status_code == 404 and missing.json()["error"] == "Dead letter not found"
    assert requeued.status_code == 200 and requeued.json()["message"] == "Run scheduled for retry (attempt 5/8)"


def test_openapi_describes_every_endpoint(web):
    with web.client() as http:
        document = http.get("/api/openapi.json").json()
    paths = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert paths >= {
        ("GET", "/api/health"),
        ("POST", "/api/runs/{run_id}/retry"),
        ("POST", "/api/runs/reset-stuck"),
        ("POST", "/api/runs/retry"),
        ("GET", "/api/runs/{run_id}"),
        ("GET", "/api/status"),
        ("GET", "/api/stats"),
        ("GET", "/api/dead-letters"),
        ("GET", "/api/dead-letters/{ref}"),
        ("POST", "/api/dead-letters/{ref}/requeue"),
    }


# -- the database down -----------------------------------------------------------------------------


def answers(url: str) -> bool:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory):
    """One PostgreSQL of this module's own (a migrated scrape_runs) for the tests that stop and
    start it: a server of each test's own (an initdb each) was most of their time."""
    server = migrated_server(tmp_path_factory.mktemp("own-server"))
    yield server
    server.cleanup()


@pytest.fixture
def outage(own_server):
    """The module's server, running; left running for the next test whatever this one did."""
    if not answers(own_server.url):
        own_server.start()
    yield own_server
    if not answers(own_server.url):
        own_server.start()


def test_the_database_down_is_a_500_with_the_envelope_and_no_secret(outage):
    server = outage
    secret = "Sekr3t-never-shown"
    url = server.url + f"&password={secret}"
    engine = make_engine(server.url)
    run_id = failed_run(engine)
    engine.dispose()
    web = WebServer(url)
    try:
        server.stop()
        with web.client(ADMIN) as http:
            retry = http.post(f"/api/runs/{run_id}/retry")
            status = http.get("/api/status")
        server.start()
        with web.client(ADMIN) as http:
            recovered = http.post(f"/api/runs/{run_id}/retry")
    finally:
        log = web.stop()
    assert retry.status_code == 500, retry.text
    assert retry.json()["success"] is False and retry.json()["error"] == "Failed to retry run"
    assert status.status_code == 500 and status.json()["error"] == "Failed to read status"
    for text in (retry.text, status.text, log):
        assert secret not in text and "Traceback" not in text
    assert recovered.status_code == 200, recovered.text


# -- serve's own refusals ----------------------------------------------------------------------------


def test_serve_without_a_token_refuses_to_listen_beyond_loopback(db_url):
    result = cli("serve", "--host", "0.0.0.0", env={"DATABASE_URL": db_url})
    assert result.returncode == 2
    line = one_line_error(result)
    assert "ADMIN_TOKEN" in line and "0.0.0.0" in line


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"ADMIN_TOKEN": "short"}, "ADMIN_TOKEN is too short (5 characters)"),
        ({"ADMIN_TOKEN": "with a space in it, long enough"}, "ADMIN_TOKEN holds a space"),
        ({"ADMIN_TOKEN": ADMIN, "READ_TOKEN": ADMIN}, "ADMIN_TOKEN and READ_TOKEN are the same"),
        ({"ADMIN_PORT": "http"}, "ADMIN_PORT='http' is not accepted"),
        ({"ADMIN_HOST": "exa mple"}, "ADMIN_HOST='exa mple' is not accepted"),
    ],
)
def test_bad_serve_settings_are_one_line_and_exit_2(db_url, env, fragment):
    result = cli("serve", env={"DATABASE_URL": db_url, **env})
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert fragment in line
    for value in env.values():
        if "TOKEN" in line and len(value) > 8:
            assert value not in line  # a token is never repeated


def test_serve_on_a_port_in_use_says_so(db_url):
    with socket.socket() as taken:  # a port this test process listens on: another process for `serve`
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("serve", "--port", str(taken.getsockname()[1]), env={"DATABASE_URL": db_url})
    assert result.returncode == 2, result.stderr
    assert "cannot listen on 127.0.0.1:" in result.stderr and "Traceback" not in result.stderr


# -- the runs list ---------------------------------------------------------------------------------


def test_runs_come_newest_first_a_keyset_page_at_a_time(web, engine):
    with engine.begin() as conn:
        started = [insert_run(conn, status="completed", started_at=NOW - timedelta(minutes=m)) for m in range(7)]
        same_time = [insert_run(conn, status="failed", started_at=NOW - timedelta(hours=2)) for _ in range(3)]
        waiting = insert_run(conn, status="pending_retry", started_at=None, retry_count=1, is_retry=True)
    seen, cursor, pages = [], None, 0
    with web.client(READER) as http:
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            answer = http.get("/api/runs", params=params).json()
            seen += [run["id"] for run in answer["data"]]
            pages += 1
            cursor = answer["next_cursor"]
            if cursor is None:
                break
    assert pages == 4 and len(seen) == len(set(seen)) == 11
    assert seen[0] == str(waiting)  # not started yet: first
    assert seen[1:8] == [str(run_id) for run_id in started]
    assert sorted(seen[8:]) == sorted(str(run_id) for run_id in same_time)  # same started_at: by id, no gap


def test_runs_filter_by_status_text_and_time(web, engine):
    with engine.begin() as conn:
        percent = insert_run(conn, status="failed", search_query="100% Remote", started_at=NOW - timedelta(hours=1))
        insert_run(conn, status="failed", search_query="1000 Remote", started_at=NOW - timedelta(hours=1))
        by_error = insert_run(
            conn, status="failed", started_at=NOW - timedelta(hours=1), error_message="Captcha WALL at page 3"
        )
        old = insert_run(conn, status="completed", started_at=NOW - timedelta(days=3))
    with web.client(READER) as http:
        literal = http.get("/api/runs", params={"q": "100%"}).json()["data"]
        error = http.get("/api/runs", params={"q": "captcha wall"}).json()["data"]
        failed = http.get("/api/runs", params={"status": "failed"}).json()["data"]
        recent = http.get("/api/runs", params={"since": "1d"}).json()["data"]
        bad = [
            http.get("/api/runs", params={"status": "broken"}),
            http.get("/api/runs", params={"cursor": "not-a-cursor"}),
            http.get("/api/runs", params={"limit": 0}),
            http.get("/api/runs", params={"since": "soon"}),
        ]
    assert [run["id"] for run in literal] == [str(percent)]  # % is a character, not a wildcard
    assert [run["id"] for run in error] == [str(by_error)]
    assert len(failed) == 3 and {run["status"] for run in failed} == {"failed"}
    assert str(old) not in {run["id"] for run in recent} and len(recent) == 3
    assert [r.status_code for r in bad] == [400] * 4
    assert "is not a state" in bad[0].json()["error"] and "cursor" in bad[1].json()["error"]


def test_a_time_window_filters_pending_retries_by_when_due_and_cancelled_ones_by_when_ended(web, engine):
    """Neither has a start: "started within" found none of them; pending_retry is timed by when it
    is due (overdue or due within the window), cancelled by when it ended."""
    with engine.begin() as conn:
        root = insert_run(conn, status="failed", started_at=NOW - timedelta(days=5))
        pending = {
            "soon": NOW + timedelta(hours=3),
            "overdue": NOW - timedelta(hours=2),
            "later": NOW + timedelta(days=3),
        }
        pending_ids = {
            name: insert_run(
                conn, status="pending_retry", is_retry=True, retry_count=n + 1, original_run_id=root, next_retry_at=due
            )
            for n, (name, due) in enumerate(pending.items())
        }
        recent = insert_run(conn, status="cancelled", completed_at=NOW - timedelta(hours=1))
        insert_run(conn, status="cancelled", completed_at=NOW - timedelta(days=3))
    with web.client(READER) as http:
        due = http.get("/api/runs", params={"status": "pending_retry", "since": "24h"}).json()["data"]
        ended = http.get("/api/runs", params={"status": "cancelled", "since": "24h"}).json()["data"]
    assert {run["id"] for run in due} == {str(pending_ids["soon"]), str(pending_ids["overdue"])}
    assert [run["id"] for run in ended] == [str(recent)]


def test_serve_tells_systemd_it_is_ready_once_it_listens(db_url, tmp_path):
    import socket as sockets

    path = str(tmp_path / "notify")
    listener = sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    web = WebServer(db_url, NOTIFY_SOCKET=path)
    try:
        message = listener.recv(4096).decode()
        with web.client() as http:
            assert http.get("/api/health").status_code == 200
    finally:
        web.stop()
        listener.close()
    assert message.split("\n") == ["READY=1", f"STATUS=serving on 127.0.0.1:{web.port}"]


def test_a_reset_is_recorded_as_the_checker_s_last_run(web, engine, db_url):
    with engine.begin() as conn:
        insert_stuck_runs(conn, 2, NOW - timedelta(hours=2))
    with web.client(ADMIN) as http:
        http.post("/api/runs/reset-stuck", params={"timeout_minutes": 60})
        checker = next(j for j in http.get("/api/status").json()["data"]["jobs"] if j["job_id"] == "stuck_run_checker")
    assert checker["outcome"] == "ok" and checker["counts"]["failed"] == 2 and checker["by_daemon"] is False


def test_the_cli_and_the_api_schedule_the_same_retry(web, engine, db_url):
    by_cli, by_api = (
        failed_run(engine, search_query="Same job", config=json.dumps({"depth": 2}), user_id=7) for _ in range(2)
    )
    scheduled = cli("retry", str(by_cli), "--json", env={"DATABASE_URL": db_url})
    assert scheduled.returncode == 0, scheduled.stderr
    with web.client(ADMIN) as http:
        answer = http.post(f"/api/runs/{by_api}/retry").json()
    cli_answer = json.loads(scheduled.stdout)["scheduled"]
    cli_retry = cli_answer["retry_id"]
    assert answer["message"] == cli_answer["message"]

    def retry_of(retry_id: str, root: uuid.UUID) -> dict:
        with engine.connect() as conn:
            found = dict(row(conn, uuid.UUID(retry_id)))
        assert found.pop("original_run_id") == root
        for moving in ("id", "next_retry_at", "updated_at"):  # when it was written
            found.pop(moving)
        return found

    assert retry_of(cli_retry, by_cli) == retry_of(answer["data"]["id"], by_api)


def test_a_page_that_would_wait_on_a_lock_answers_500_after_the_statement_timeout(web, engine):
    """A migration or a VACUUM FULL holding the table must not hang the dashboard's threads."""
    import time as clock

    locker = engine.connect()
    transaction = locker.begin()
    locker.exec_driver_sql("LOCK TABLE scrape_runs IN ACCESS EXCLUSIVE MODE")
    try:
        started = clock.monotonic()
        with web.client(READER) as http:
            answer = http.get("/api/status")
        waited = clock.monotonic() - started
    finally:
        transaction.rollback()
        locker.close()
    assert answer.status_code == 500 and answer.json()["error"] == "Failed to read status", answer.text
    assert 4 < waited < 20
    with web.client(READER) as http:
        assert http.get("/api/status").status_code == 200


def test_a_deep_page_starts_at_its_cursor_in_the_index(engine, db_url):
    """The plan, not a timing: the cursor is the index scan's condition, never a filter over
    every newer row (which made page 100,000 of ten million rows take a second)."""
    from jobs.listing import decode_cursor, encode_cursor
    from jobs.model import Run
    from tests.helpers import make_runtime

    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO scrape_runs (search_query, location_query, status, started_at) "
            "SELECT 'q' || g, 'l', 'completed', now() - make_interval(secs => g) FROM generate_series(1, 5000) g"
        )
        conn.exec_driver_sql("ANALYZE scrape_runs")
        middle = conn.exec_driver_sql(
            "SELECT id, started_at FROM scrape_runs ORDER BY started_at DESC OFFSET 2500 LIMIT 1"
        ).one()
    rt = make_runtime(db_url)
    try:
        cursor = encode_cursor(Run(id=middle.id, status="completed", what="", started_at=middle.started_at))
        at, run_id = decode_cursor(rt, cursor)
        statement = rt.queries.runs_page(state=None, search=False, since=None, after="started")
        plan = explain(rt, statement, {"sr_limit": 51, "sr_after_at": at, "sr_after_id": run_id})
    finally:
        rt.close()
    assert "ix_scrape_runs_newest_first" in plan, plan
    assert "Index Cond: (ROW(started_at, id) < ROW(" in plan, plan


def test_serve_started_while_the_database_is_down_waits_for_it_and_then_serves(outage):
    server = outage
    engine = make_engine(server.url)
    run_id = failed_run(engine)
    engine.dispose()
    server.stop()
    web = None
    try:
        web = WebServer(server.url, ready=503)  # it listens, and says it cannot answer yet
        with web.client() as http:
            health = http.get("/api/health")
            page = http.get("/", headers={"Accept": "text/html"})
        with web.client(ADMIN) as http:
            api = http.get("/api/status")
        server.start()
        web._wait_ready(200)
        with web.client(ADMIN) as http:
            retried = http.post(f"/api/runs/{run_id}/retry")
        assert web.poll() is None  # still the first process: no restart loop
    finally:
        log = web.stop() if web else ""
    assert health.status_code == 503 and health.json() == {
        "success": False,
        "error": "Database unavailable",
        "details": {"reason": "waiting for the database; trying again every 2s"},
    }
    assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
    assert "<h1>Waiting for the database</h1>" in page.text and "Traceback" not in page.text
    assert api.status_code == 503 and api.json()["error"] == "Database unavailable"
    assert retried.status_code == 200, retried.text
    assert "waiting for the database" in log and "serving the API" in log and "Traceback" not in log


# -- issue 19: the runs list after a mass event -------------------------------------------------------


def walk(http, params: dict, *, key: str = "next_cursor", start: str | None = None) -> list[list[str]]:
    """Every page's run ids, following `key` (next_cursor, or prev_cursor with `before`)."""
    pages, cursor = [], start
    while True:
        field = "cursor" if key == "next_cursor" else "before"
        answer = http.get("/api/runs", params={**params, **({field: cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        pages.append([run["id"] for run in body["data"]])
        cursor = body[key]
        if cursor is None:
            return pages


def test_runs_page_back_by_a_reversed_keyset_in_every_order(web, engine):
    with engine.begin() as conn:
        for m in range(7):
            insert_run(conn, status="completed", started_at=NOW - timedelta(minutes=m))
        for _ in range(3):
            insert_run(conn, status="failed", started_at=NOW - timedelta(hours=2))
        for m in range(5):
            insert_run(
                conn,
                # Ids falling as the due time comes sooner: by id (how `newest` orders runs not
                # started) they come latest due first, the reverse of `due`. Drawn at random, the
                # two orders were the same once in 120 runs and the last assertion failed.
                id=uuid.UUID(int=100 - m),
                status="pending_retry",
                retry_count=1,
                is_retry=True,
                next_retry_at=NOW + timedelta(minutes=30 - m),
            )
    with web.client(READER) as http:
        for order in ("newest", "started", "due"):
            forward = walk(http, {"limit": 3, "order": order})
            first = http.get("/api/runs", params={"limit": 3, "order": order}).json()
            assert first["prev_cursor"] is None, order
            last = http.get(
                "/api/runs", params={"limit": 3, "order": order, "cursor": _cursor_of(http, order, len(forward) - 2)}
            ).json()
            back = walk(http, {"limit": 3, "order": order}, key="prev_cursor", start=last["prev_cursor"])
            assert [run for page in reversed(back) for run in page] == [run for page in forward[:-1] for run in page], (
                order
            )
    flat = {order: [run for page in walk_all(web, order) for run in page] for order in ("newest", "started", "due")}
    assert len(flat["newest"]) == 15 and len(flat["started"]) == 10 and len(flat["due"]) == 5
    assert set(flat["due"]) < set(flat["newest"]) and not set(flat["due"]) & set(flat["started"])
    assert flat["newest"][:5] != flat["due"]  # not started first by id; by due time, soonest first


def _cursor_of(http, order: str, page: int) -> str | None:
    """next_cursor of page `page` (0: the first)."""
    cursor = None
    for _ in range(page + 1):
        cursor = http.get(
            "/api/runs", params={"limit": 3, "order": order, **({"cursor": cursor} if cursor else {})}
        ).json()["next_cursor"]
    return cursor


def walk_all(web, order: str) -> list[list[str]]:
    with web.client(READER) as http:
        return walk(http, {"limit": 4, "order": order})


def test_the_due_order_is_soonest_first_and_the_stuck_filter_is_what_check_would_fail(db_url, engine):
    with engine.begin() as conn:
        late = insert_run(
            conn, status="pending_retry", is_retry=True, retry_count=1, next_retry_at=NOW + timedelta(hours=2)
        )
        soon = insert_run(
            conn, status="pending_retry", is_retry=True, retry_count=1, next_retry_at=NOW + timedelta(minutes=5)
        )
        stuck = insert_run(conn, started_at=NOW - timedelta(minutes=50))
        insert_run(conn, started_at=NOW - timedelta(minutes=20))  # running, within its limit
        insert_run(conn, status="failed", started_at=NOW - timedelta(hours=5))
    web = InProcessWeb(db_url, STUCK_AFTER="45m")
    try:
        with web.client(READER) as http:
            due = http.get("/api/runs", params={"order": "due"}).json()["data"]
            stuck_runs = http.get("/api/runs", params={"stuck": "true"}).json()["data"]
            counted = http.get("/api/status").json()["data"]["runs"]["stuck"]
            refused = http.get("/api/runs", params={"order": "due", "status": "failed"})
            unknown = http.get("/api/runs", params={"order": "oldest"})
    finally:
        web.stop()
    assert [run["id"] for run in due] == [str(soon), str(late)]
    assert due[0]["next_retry_at"] is not None
    assert [run["id"] for run in stuck_runs] == [str(stuck)] and counted == 1
    assert refused.status_code == 400 and "order=due" in refused.json()["error"]
    assert unknown.status_code == 400 and "is not an order" in unknown.json()["error"]


@pytest.mark.parametrize(
    ("order", "backwards", "index", "condition"),
    [
        ("started", False, "ix_scrape_runs_newest_first", "(ROW(started_at, id) < ROW("),
        ("started", True, "ix_scrape_runs_newest_first", "(ROW(started_at, id) > ROW("),
        ("newest", True, "ix_scrape_runs_newest_first", "(ROW(started_at, id) > ROW("),
        ("due", False, "ix_scrape_runs_pending_next_retry_at", "(next_retry_at >= "),
    ],
)
def test_the_other_orders_and_the_previous_page_start_at_their_cursor_in_an_index(
    engine, db_url, order, backwards, index, condition
):
    from jobs.listing import decode_cursor, encode_cursor
    from jobs.model import Run
    from tests.helpers import make_runtime

    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO scrape_runs (search_query, location_query, status, started_at, next_retry_at) "
            "SELECT 'q' || g, 'l', CASE WHEN mod(g, 10) = 0 THEN 'pending_retry' ELSE 'completed' END,"
            " now() - make_interval(secs => g), now() + make_interval(secs => g) FROM generate_series(1, 20000) g"
        )
        conn.exec_driver_sql("ANALYZE scrape_runs")
        middle = conn.exec_driver_sql(
            "SELECT id, started_at, next_retry_at FROM scrape_runs WHERE status = 'pending_retry'"
            " ORDER BY started_at DESC OFFSET 1000 LIMIT 1"
        ).one()
    rt = make_runtime(db_url)
    try:
        run = Run(
            id=middle.id,
            status="pending_retry",
            what="",
            started_at=middle.started_at,
            next_retry_at=middle.next_retry_at,
        )
        at, run_id = decode_cursor(rt, encode_cursor(run, order))
        statement = rt.queries.runs_page(
            state=None, search=False, since=None, after="started", order=order, backwards=backwards
        )
        plan = explain(rt, statement, {"sr_limit": 51, "sr_after_at": at, "sr_after_id": run_id})
    finally:
        rt.close()
    assert index in plan, plan
    assert any(condition in line for line in plan.splitlines() if "Index Cond:" in line), plan  # never a filter


def test_serve_waiting_for_its_database_exits_as_at_start_if_the_table_is_not_there_when_it_answers(outage):
    """The database answers, the table is missing: what `serve` says and does at start (exit 1,
    one line), not a server answering 503 forever."""
    from sqlalchemy.engine import make_url

    from tests.daemons import wait_until

    server = outage
    name = f"no_table_{uuid.uuid4().hex[:8]}"  # a database without scrape_runs
    with sa.create_engine(server.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool).connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    server.stop()
    web = None
    try:
        web = WebServer(make_url(server.url).set(database=name).render_as_string(hide_password=False), ready=503)
        server.start()
        wait_until(lambda: web.poll() is not None, timeout=120)
    finally:
        log = web.stop() if web is not None else ""  # SIGTERM only if still running
    assert web.returncode == 1, log
    assert "stuck-runs: table scrape_runs does not exist in this database" in log and "Traceback" not in log
