"""SPEC §13's access rules against the app `serve` builds (in-process; sign-in and out over a real
`serve`'s socket): each rule has a request that it refuses, and that a server without the rule
would let through (nothing changes when it is refused)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from tests.helpers import insert_run
from tests.integration.test_api import failed_run, snapshot
from tests.web import ADMIN, READER, InProcessWeb, WebServer

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc)


def signed_in(web: InProcessWeb | WebServer, token: str):
    http = web.client()
    answer = http.post("/login", data={"token": token})
    assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
    return http, answer


def test_without_a_token_only_health_answers(web):
    with web.client() as http:
        assert http.get("/api/health").status_code == 200
        status = http.get("/api/status")
        wrong = http.get("/api/status", headers={"Authorization": "Bearer not-the-token-at-all"})
        basic = http.get("/api/status", headers={"Authorization": f"Basic {ADMIN}"})
    assert status.status_code == 401 and status.json()["error"] == "Authentication required"
    assert wrong.status_code == 401 and wrong.json()["error"] == "Invalid token"
    assert basic.status_code == 401


def test_a_read_token_reads_and_cannot_act(web, engine):
    run_id = failed_run(engine)
    before = snapshot(engine)
    with web.client(READER) as http:
        assert http.get("/api/status").status_code == 200
        assert http.get(f"/api/runs/{run_id}").status_code == 200
        refused = [
            http.post(f"/api/runs/{run_id}/retry"),
            http.post("/api/runs/reset-stuck", params={"timeout_minutes": 1}),
            http.post("/api/runs/retry", json={"dry_run": False, "status": "failed"}),
            http.post("/api/dead-letters/1/requeue"),
        ]
    assert [r.status_code for r in refused] == [403] * 4
    assert {r.json()["error"] for r in refused} == {"This token may only read"}
    assert snapshot(engine) == before
    with web.client(ADMIN) as http:
        assert http.post(f"/api/runs/{run_id}/retry").status_code == 200


def test_sign_in_gives_a_strict_http_only_cookie_and_sign_out_clears_it(served):
    web = served  # the cookie as a real `serve` sets it over its socket
    http, answer = signed_in(web, READER)
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
    assert READER not in cookie
    assert http.get("/api/status").status_code == 200
    out = http.post("/logout", headers={"Origin": web.base})
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
    assert http.get("/api/status").status_code == 401
    with web.client() as other:
        assert other.post("/login", data={"token": "wrong-wrong-wrong-wrong"}).status_code == 401
        foreign = other.post("/login", data={"token": ADMIN}, headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
    http.close()


def test_a_cookie_carried_mutation_must_come_from_our_own_pages(web, engine):
    run_ids = [failed_run(engine, search_query=f"job {n}") for n in range(2)]
    http, _ = signed_in(web, ADMIN)
    before = snapshot(engine)
    refused = [
        http.post(f"/api/runs/{run_ids[0]}/retry", headers={"Origin": "http://evil.example"}),
        http.post(f"/api/runs/{run_ids[0]}/retry", headers={"Sec-Fetch-Site": "cross-site"}),
        http.post(f"/api/runs/{run_ids[0]}/retry", headers={"Origin": "null"}),
        http.post(f"/api/runs/{run_ids[0]}/retry"),  # says nothing of where it comes from
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert {r.json()["error"] for r in refused} == {"Cross-origin request refused"}
    assert snapshot(engine) == before
    assert http.post(f"/api/runs/{run_ids[0]}/retry", headers={"Origin": web.base}).status_code == 200
    assert http.post(f"/api/runs/{run_ids[1]}/retry", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    http.close()


def test_a_read_session_cannot_act_even_from_our_pages(web, engine):
    run_id = failed_run(engine)
    http, _ = signed_in(web, READER)
    answer = http.post(f"/api/runs/{run_id}/retry", headers={"Origin": web.base})
    assert answer.status_code == 403 and answer.json()["error"] == "This token may only read"
    http.close()


def test_a_forged_or_outdated_cookie_is_refused(db_url, web):
    http, answer = signed_in(web, ADMIN)
    good = http.cookies["stuck_runs_session"]
    role, expiry, signature = good.split(".")
    with web.client() as other:
        forged = [f"{role}.{int(expiry) + 3600}.{signature}", f"admin.{expiry}.{'0' * 64}", "admin", "read..", ""]
        for value in forged:
            other.cookies.set("stuck_runs_session", value)
            assert other.get("/api/status").status_code == 401, value
    http.close()
    web.stop()
    rotated = InProcessWeb(db_url, ADMIN_TOKEN="adm-a-brand-new-token-0000", READ_TOKEN=READER)
    try:
        with rotated.client() as other:
            other.cookies.set("stuck_runs_session", good)
            assert other.get("/api/status").status_code == 401  # a new ADMIN_TOKEN ends the old sessions
    finally:
        rotated.stop()


def test_without_tokens_loopback_clients_act_but_foreign_pages_and_hosts_do_not(db_url, engine):
    run_id = failed_run(engine)
    web = InProcessWeb(db_url, tokens=False)
    try:
        before = snapshot(engine)
        with web.client() as http:
            foreign = http.post(f"/api/runs/{run_id}/retry", headers={"Origin": "http://evil.example"})
            rebound = http.post(f"/api/runs/{run_id}/retry", headers={"Host": "evil.example"})
            cross = http.post(f"/api/runs/{run_id}/retry", headers={"Sec-Fetch-Site": "cross-site"})
            assert [foreign.status_code, rebound.status_code, cross.status_code] == [403, 403, 403]
            assert snapshot(engine) == before
            assert http.get("/api/status").status_code == 200
            assert http.post(f"/api/runs/{run_id}/retry").status_code == 200  # curl on the host itself
    finally:
        web.stop()


def test_a_token_in_the_query_string_is_not_a_token(web):
    with web.client() as http:
        assert http.get("/api/status", params={"token": ADMIN}).status_code in (400, 401)


def test_nothing_is_run_for_a_refused_reset(web, engine):
    with engine.begin() as conn:
        stuck = insert_run(conn, started_at=NOW - timedelta(hours=5))
    with web.client(READER) as http:
        assert http.post("/api/runs/reset-stuck", params={"timeout_minutes": 1}).status_code == 403
    with web.client() as http:
        assert http.post("/api/runs/reset-stuck", params={"timeout_minutes": 1}).status_code == 401
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT status FROM scrape_runs WHERE id = :id"), {"id": stuck}).scalar() == (
            "running"
        )
    assert uuid.UUID(str(stuck))
