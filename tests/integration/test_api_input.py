"""What a new user's trial of the API found (each seen on the code before its fix): bad input is a
400 envelope that changes nothing, never a 500, a half-read request or a silent default."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from tests.helpers import insert_run, insert_stuck_runs
from tests.integration.test_api import failed_run, snapshot
from tests.integration.test_cli import cli, one_line_error
from tests.own_server import migrated_server
from tests.web import ADMIN, READER, InProcessWeb, ThreadedWebServer

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc)


@pytest.fixture
def stuck(engine):
    with engine.begin() as conn:
        insert_stuck_runs(conn, 2, NOW - timedelta(hours=3))


def test_a_parameter_given_twice_is_refused_and_runs_nothing(web, engine, stuck):
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        twice = http.post("/api/runs/reset-stuck?timeout_minutes=60&dry_run=true&dry_run=false")
        pause = http.post("/api/pause?for=4h&for=1s")
    assert twice.status_code == 400 and twice.json()["error"] == "Parameter given more than once: dry_run"
    assert pause.status_code == 400
    assert snapshot(engine) == before


@pytest.mark.parametrize(
    "body",
    [
        '{"dry_run": true, "dry_run": false}',
        '{"dry_run": "no"}',
        '{"dry_run": 0}',
        '{"dry_run": "false"}',
        '{"limit": true, "dry_run": false}',
        '{"error_like": "\\u0000", "dry_run": false}',
        "not json",
        "[1, 2]",
        '{"error_like": "' + "x" * 300 + '", "dry_run": false}',
    ],
    ids=["repeated key", "no", "zero", "string false", "bool limit", "NUL", "not JSON", "array", "long filter"],
)
def test_a_bulk_retry_body_is_held_to_its_shape(web, engine, body):
    failed_run(engine)
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        answer = http.post("/api/runs/retry", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["success"] is False and answer.json()["error"]
    assert "Invalid 0" not in answer.json()["error"]  # a position is not a field name
    assert snapshot(engine) == before


def test_an_enormous_body_is_refused_unread(web, engine):
    failed_run(engine)
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        answer = http.post("/api/runs/retry", content=b'{"error_like": "' + b"x" * 200_000 + b'"}')
    assert answer.status_code == 413 and answer.json()["success"] is False
    assert snapshot(engine) == before


def test_a_nul_byte_in_a_parameter_is_a_400_not_a_500(web):
    with web.client(READER) as http:
        answers = [
            http.get("/api/runs", params={"q": "\x00"}),
            http.get("/api/dead-letters", params={"pattern": "a\x00"}),
        ]
    assert [a.status_code for a in answers] == [400, 400]
    assert answers[0].json()["error"] == "Invalid q: it holds a NUL byte"


def test_a_body_where_none_is_taken_is_refused(web, engine):
    run_id = failed_run(engine)
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        pause = http.post("/api/pause", json={"for": "1h"})
        retry = http.post(f"/api/runs/{run_id}/retry", json={"reset_budget": True})
        empty = http.post("/api/pause", params={"for": ""})
        status = http.get("/api/status").json()["data"]
    assert [pause.status_code, retry.status_code, empty.status_code] == [400, 400, 400]
    assert "takes no body" in pause.json()["error"]
    assert status["pause"] is None and snapshot(engine) == before


def test_pause_for_an_empty_length_is_an_error_not_forever(db_url):
    result = cli("pause", "--for", "", env={"DATABASE_URL": db_url})
    assert result.returncode == 2
    assert "--for='' is not a duration" in one_line_error(result)


def test_bad_requests_get_the_envelope(web):
    with web.client(READER) as http:
        slash = http.get("/api/runs/")
        deep = http.post("/api/runs/retry", content="[" * 50_000, headers={"Authorization": f"Bearer {ADMIN}"})
    assert slash.status_code == 404 and slash.json()["success"] is False
    assert deep.status_code == 400 and deep.json()["error"].startswith("The body is not valid JSON")


def test_the_token_is_checked_before_the_parameters(web):
    with web.client() as http:
        anonymous = http.get("/api/runs", params={"stauts": "x"})
        wrong = http.post("/api/pause", params={"bogus": 1}, headers={"Authorization": "Bearer nope-nope-nope-nope"})
    assert anonymous.status_code == 401 and wrong.status_code == 401


def test_sign_out_ends_the_session_even_for_a_saved_cookie(web):
    http = web.client()
    assert http.post("/login", data={"token": ADMIN}).status_code == 303
    saved = http.cookies["stuck_runs_session"]
    assert http.post("/logout", headers={"Origin": web.base}).status_code == 303
    http.close()
    with web.client() as replay:
        replay.cookies.set("stuck_runs_session", saved)
        assert replay.get("/api/status").status_code == 401


def test_wrong_tokens_and_database_failures_reach_the_log(tmp_path):
    """What serve's log says (at serve's default level, INFO), from serve's app on a real socket
    in a thread of this process: the log's lines, not the process, are the point (a serve
    process's own log is test_api's and test_pages')."""
    from loguru import logger

    from scheduler.logs import TEXT_FORMAT

    server = migrated_server(tmp_path)
    lines: list[str] = []
    sink = logger.add(lines.append, level="INFO", format=TEXT_FORMAT)
    web = ThreadedWebServer(server.url)
    try:
        with web.client("wrong-wrong-wrong-wrong") as http:
            assert http.get("/api/status").status_code == 401
        with web.client(READER) as http:
            assert http.get("/api/health").status_code == 200
            server.stop()
            down = http.get("/api/status")
            health = http.get("/api/health")
            server.start()
    finally:
        web.stop()
        logger.remove(sink)
        server.cleanup()
    log = "\n".join(lines)
    assert down.status_code == 500
    assert "postgresql" not in down.text and str(tmp_path) not in down.text  # no connection details to a client
    assert health.status_code == 503 and health.json()["error"] == "Database unavailable"
    assert "refused a wrong token from 127.0.0.1" in log
    assert "Failed to read status:" in log


def test_the_openapi_document_describes_the_envelope_and_bearer_auth(web):
    with web.client() as http:
        document = http.get("/api/openapi.json").json()
    assert "bearer" in document["components"]["securitySchemes"]
    text = json.dumps(document)
    assert '"422"' not in text and "HTTPValidationError" not in text
    retry = document["paths"]["/api/runs/{run_id}/retry"]["post"]
    assert {"400", "401", "403", "404", "500"} <= set(retry["responses"])
    assert retry["security"] == [{"bearer": []}]
    assert "security" not in document["paths"]["/api/health"]["get"]
    assert "requestBody" in document["paths"]["/api/runs/retry"]["post"]


def test_api_answers_are_not_cached(web):
    with web.client(READER) as http:
        assert http.get("/api/status").headers["cache-control"] == "no-store"


def test_an_integer_id_table_answers_with_integer_ids(db_url, engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE crawl_jobs (id SERIAL PRIMARY KEY, search_query TEXT, location_query TEXT,"
            " status TEXT NOT NULL, error_message TEXT, started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ)"
        )
        conn.exec_driver_sql(
            "INSERT INTO crawl_jobs (search_query, location_query, status, started_at)"
            " VALUES ('q', 'l', 'running', now() - interval '3 hours')"
        )
    env = {"DATABASE_URL": db_url, "SCRAPE_RUNS_TABLE": "crawl_jobs"}
    assert cli("migrate", env=env).returncode == 0
    web = InProcessWeb(db_url, SCRAPE_RUNS_TABLE="crawl_jobs")
    try:
        with web.client(ADMIN) as http:
            body = http.post("/api/runs/reset-stuck", params={"timeout_minutes": 60}).json()
    finally:
        web.stop()
    assert body["run_ids"] == [1] and body["retry_ids"] == [2]


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"ADMIN_PORT": "１９１０１"}, "ADMIN_PORT='１９１０１' is not accepted"),
        ({"ADMIN_HOST": "no.such.host.invalid", "ADMIN_TOKEN": ADMIN}, "is not an address of this host"),
        ({"ADMIN_HOST": "10.255.255.1", "ADMIN_TOKEN": ADMIN}, "use an address of this host"),
    ],
)
def test_serve_names_a_bad_address_as_one(db_url, env, fragment):
    result = cli("serve", env={"DATABASE_URL": db_url, **env})
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert fragment in line and "another process" not in line


def test_without_tokens_a_loopback_host_in_capitals_is_loopback(db_url):
    web = InProcessWeb(db_url, tokens=False)
    try:
        with web.client() as http:
            assert http.get("/api/status", headers={"Host": f"LOCALHOST:{web.port}"}).status_code == 200
    finally:
        web.stop()


def test_reset_stuck_while_another_sweep_holds_the_lock_is_a_409(web, engine, stuck):
    """The sweep lock is waited for 10 s; serve's 5 s statement timeout must not turn that into a 500."""
    from db import locks

    holder = engine.connect()
    holder.execute(sa.select(sa.func.pg_advisory_lock(locks.namespace("scrape_runs", locks.SWEEP), 0)))
    holder.commit()
    before = snapshot(engine)
    try:
        with web.client(ADMIN) as http:
            answer = http.post("/api/runs/reset-stuck", params={"timeout_minutes": 60})
    finally:
        holder.close()
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "Another sweep is running"
    assert snapshot(engine) == before


def test_a_failed_reset_is_recorded_without_where_the_database_is(web, engine, stuck):
    locker = engine.connect()
    held = locker.begin()
    locker.exec_driver_sql("LOCK TABLE scrape_runs IN ACCESS EXCLUSIVE MODE")
    try:
        with web.client(ADMIN) as http:
            failed = http.post("/api/runs/reset-stuck", params={"timeout_minutes": 60})
    finally:
        held.rollback()
        locker.close()
    with web.client(READER) as http:
        jobs = http.get("/api/status").json()["data"]["jobs"]
    checker = next(j for j in jobs if j["job_id"] == "stuck_run_checker")
    assert failed.status_code == 500
    assert checker["outcome"] == "error" and checker["error"].startswith("database error while sweeping stuck runs: ")
    assert "postgresql" not in checker["error"] and "host=" not in checker["error"]


def test_a_chunked_body_where_none_is_taken_is_refused(web):
    def chunks():
        yield b'{"for": "1h"}'

    with web.client(ADMIN) as http:
        answer = http.post("/api/pause", content=chunks())
        status = http.get("/api/status").json()["data"]
    assert answer.status_code == 400 and status["pause"] is None


@pytest.mark.parametrize("path", ["/api/runs/--5", "/api/dead-letters/%C2%B2"])
def test_digits_int_cannot_read_are_not_ids(db_url, path):
    web = InProcessWeb(db_url)
    try:
        with web.client(READER) as http:
            answer = http.get(path)
    finally:
        web.stop()
    assert answer.status_code in (400, 404), answer.text


def test_a_cookie_with_strange_digits_is_refused_not_a_500(web):
    with web.client() as http:
        answer = http.get("/api/status", headers={"Cookie": "stuck_runs_session=admin.²9.abc".encode()})
    assert answer.status_code == 401, answer.text


def test_a_threshold_that_rounds_to_nothing_is_refused(web, engine, stuck):
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        answer = http.post("/api/runs/reset-stuck", params={"timeout_minutes": "1e-300", "dry_run": "true"})
    assert answer.status_code == 400 and snapshot(engine) == before


def test_a_search_with_a_nul_byte_on_the_runs_page_is_a_400(web):
    http = web.client()
    http.post("/login", data={"token": READER})
    answer = http.get("/runs", params={"q": "\x00"})
    http.close()
    assert answer.status_code == 400


# -- issue 19: what an operator met over HTTP --------------------------------------------------------


def test_reset_stuck_without_a_threshold_judges_each_run_by_the_configured_limit(db_url, engine):
    with engine.begin() as conn:
        stuck = [insert_run(conn, started_at=NOW - timedelta(minutes=50)) for _ in range(2)]
        fresh = [insert_run(conn, started_at=NOW - timedelta(minutes=20))]
    web = InProcessWeb(db_url, STUCK_AFTER="45m")
    try:
        with web.client(ADMIN) as http:
            preview = http.post("/api/runs/reset-stuck", params={"dry_run": "true"})
            answer = http.post("/api/runs/reset-stuck")
    finally:
        web.stop()
    assert preview.status_code == 200, preview.text
    assert preview.json()["reset_count"] == 2 and preview.json()["dry_run"] is True
    body = answer.json()
    assert answer.status_code == 200 and body["reset_count"] == 2, answer.text
    assert sorted(body["run_ids"]) == sorted(str(r) for r in stuck) and str(fresh[0]) not in body["run_ids"]


def test_a_get_on_a_post_route_is_a_405_naming_the_method_it_takes(web):
    with web.client(ADMIN) as http:
        for path in ("/api/runs/reset-stuck", "/api/pause", "/api/resume", "/api/runs/retry"):
            answer = http.get(path)
            assert answer.status_code == 405, (path, answer.text)
            assert answer.headers["allow"] == "POST", path
            assert answer.json()["success"] is False and "GET" in answer.json()["error"], path


def test_a_sweep_started_through_the_api_is_shown_as_the_api_s(web, engine, db_url, stuck):
    with web.client(ADMIN) as http:
        assert http.post("/api/runs/reset-stuck", params={"timeout_minutes": 60}).status_code == 200
        jobs = http.get("/api/status").json()["data"]["jobs"]
    checker = next(j for j in jobs if j["job_id"] == "stuck_run_checker")
    assert checker["via"] == "api" and "via" not in checker["counts"] and checker["counts"]["failed"] == 2
    status = cli("status", env={"DATABASE_URL": db_url})
    line = next(line for line in status.stdout.splitlines() if line.startswith("stuck_run_checker"))
    assert "(api)" in line and "(cli)" not in line and "via=" not in line


def test_a_single_retry_can_be_a_dry_run_that_changes_nothing(web, engine):
    run_id = failed_run(engine)
    before = snapshot(engine)
    with web.client(ADMIN) as http:
        preview = http.post(f"/api/runs/{run_id}/retry", params={"dry_run": "true"})
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert body["dry_run"] is True and body["message"] == "Would schedule a retry (attempt 1/4)"
    assert body["data"]["failed_run_id"] == str(run_id) and body["data"]["attempt"] == 1
    assert snapshot(engine) == before


def test_an_id_too_long_for_a_bigint_is_a_run_that_is_not_there(db_url, engine):
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE crawl_jobs (id SERIAL PRIMARY KEY, search_query TEXT, location_query TEXT,"
            " status TEXT NOT NULL, error_message TEXT, started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ)"
        )
    env = {"DATABASE_URL": db_url, "SCRAPE_RUNS_TABLE": "crawl_jobs"}
    assert cli("migrate", env=env).returncode == 0
    twenty = "9" * 20
    web = InProcessWeb(db_url, SCRAPE_RUNS_TABLE="crawl_jobs")
    try:
        with web.client(ADMIN) as http:
            answers = [
                http.get(f"/api/runs/{twenty}"),
                http.get("/api/runs/4000000000"),  # past int4, within int8: a number the column cannot hold
                http.post(f"/api/runs/{twenty}/retry"),
                http.post(f"/api/runs/{twenty}/cancel"),
                http.get(f"/api/dead-letters/{twenty}"),
                http.get(f"/api/dead-letters/run:{twenty}"),
            ]
    finally:
        web.stop()
    for answer in answers:
        assert answer.status_code == 404, (answer.request.url, answer.text)
        assert answer.json()["error"] in ("Run not found", "Dead letter not found")
    assert cli("history", twenty, env=env).returncode == 1


def test_a_twenty_digit_id_on_uuid_and_text_id_tables(web, db_url, engine):
    twenty = "1" * 20
    with web.client(READER) as http:
        uuid_table = http.get(f"/api/runs/{twenty}")
        letter = http.get(f"/api/dead-letters/{twenty}")
    assert uuid_table.status_code == 400 and "are UUIDs" in uuid_table.json()["error"]
    assert letter.status_code == 404 and letter.json()["error"] == "Dead letter not found"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE text_jobs (id TEXT PRIMARY KEY, search_query TEXT, location_query TEXT,"
            " status TEXT NOT NULL, error_message TEXT, started_at TIMESTAMPTZ, completed_at TIMESTAMPTZ)"
        )
    assert cli("migrate", env={"DATABASE_URL": db_url, "SCRAPE_RUNS_TABLE": "text_jobs"}).returncode == 0
    text_web = InProcessWeb(db_url, SCRAPE_RUNS_TABLE="text_jobs")
    try:
        with text_web.client(READER) as http:
            text_table = http.get(f"/api/runs/{twenty}")
    finally:
        text_web.stop()
    assert text_table.status_code == 404 and text_table.json()["error"] == "Run not found"
