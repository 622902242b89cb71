"""The §12 stand-ins are what the hand-off tests take them for: a webhook receiver answering as
its script says, and the fleet's own workers claiming queued runs, each a real process."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter

import httpx
import pytest
import sqlalchemy as sa

from tests.daemons import wait_until
from tests.fleet_worker import EXIT_USAGE, fate_of, read_log, start_worker, stop_process
from tests.own_server import OwnServer
from tests.receiver import start_receiver

pytestmark = pytest.mark.slow  # real fleet processes

RUNS = """
CREATE TABLE {table} (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    status {status} NOT NULL,
    started_at TIMESTAMPTZ,
    completed_at TIMESTAMPTZ,
    error_message TEXT
)
"""
# A mixed-case schema and table with an enum status: the worker must quote and cast.
ENUM_TABLE = '"Fleet"."Queued Runs"'
ENUM_TABLE_ARGUMENT = "Fleet.Queued Runs"  # names as they are; the worker quotes each part
ENUM_DDL = (
    'CREATE SCHEMA "Fleet";'
    " CREATE TYPE fleet_status AS ENUM ('pending', 'running', 'completed', 'failed', 'pending_retry');"
    + RUNS.format(table=ENUM_TABLE, status="fleet_status")
)


@pytest.fixture
def engine(db_url):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(RUNS.format(table="fleet_runs", status="text"))
        conn.exec_driver_sql(ENUM_DDL)
    yield engine
    engine.dispose()


def insert(engine, count: int, status: str, table: str = "fleet_runs") -> list[str]:
    with engine.begin() as conn:
        return [
            str(conn.execute(sa.text(f"INSERT INTO {table} (status) VALUES (:s) RETURNING id"), {"s": status}).scalar())
            for _ in range(count)
        ]


def states(engine, table: str = "fleet_runs") -> dict[str, tuple]:
    with engine.connect() as conn:
        query = f"SELECT id::text, status::text, started_at, completed_at, error_message FROM {table}"
        return {r[0]: r[1:] for r in conn.execute(sa.text(query))}


@pytest.fixture
def client():
    with httpx.Client(timeout=5, follow_redirects=False) as client:
        yield client


def test_receiver_answers_as_its_script_says(tmp_path, client):
    tokens = ["ok", "ok:200", "status:404", "status:410", "status:500", "429:7", "429", "503:3", "503"]
    receiver = start_receiver(tmp_path, tokens + ["redirect-other", "redirect-same"], secret=None)
    try:
        answers = [client.post(f"{receiver.url}/runs/{i}", json={"n": i}) for i in range(len(tokens) + 3)]
        assert [a.status_code for a in answers] == [202, 200, 404, 410, 500, 429, 429, 503, 503, 307, 307, 202]
        assert answers[0].json() == {"accepted": True}
        assert [a.headers.get("Retry-After") for a in answers[5:9]] == ["7", None, "3", None]
        assert answers[9].headers["Location"] == f"http://127.0.0.2:{receiver.port}/elsewhere"
        assert answers[10].headers["Location"] == "/redirected"
        receiver.set_script([], default="status:502")  # re-read at every request
        assert client.get(receiver.url + "/any").status_code == 502
    finally:
        assert receiver.stop() == 0
    logged = receiver.requests()
    assert [line["answer"] for line in logged] == tokens + ["redirect-other", "redirect-same", "ok", "status:502"]
    assert logged[3]["method"] == "POST" and logged[3]["path"] == "/runs/3"
    assert json.loads(logged[3]["body"]) == {"n": 3}
    assert logged[3]["headers"]["content-type"] == "application/json"
    assert {line["signature_ok"] for line in logged} == {None}
    assert logged[-1]["method"] == "GET"


def test_receiver_follow_up_of_a_same_host_redirect_takes_the_next_answer(tmp_path):
    receiver = start_receiver(tmp_path, ["redirect-same", "status:410"])
    try:
        answer = httpx.post(receiver.url + "/hook", content=b"{}", follow_redirects=True, timeout=5)
    finally:
        receiver.stop()
    assert answer.status_code == 410
    assert [(line["path"], line["answer"]) for line in receiver.requests()] == [
        ("/hook", "redirect-same"),
        ("/redirected", "status:410"),
    ]


def test_receiver_resets_and_hangs_after_logging_the_request(tmp_path, client):
    receiver = start_receiver(tmp_path, ["reset", "hang:3"])
    try:
        with pytest.raises(httpx.ReadError, match="reset"):
            client.post(receiver.url + "/hook", json={"id": "a"})
        with pytest.raises(httpx.ReadTimeout):
            client.post(receiver.url + "/hook", json={"id": "b"}, timeout=0.3)
        assert [line["answer"] for line in receiver.requests()] == ["reset", "hang:3"]  # logged on arrival
    finally:
        assert receiver.stop() == 0


def test_receiver_checks_the_signature_of_the_raw_body(tmp_path, client):
    secret, body = "s3cret", b'{"id": "x",  "retry_count": 1}'
    good = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    receiver = start_receiver(tmp_path, secret=secret)
    try:
        for signature in (good, good.replace("sha256=", "sha1="), None):
            headers = {"X-Stuck-Runs-Signature": signature} if signature else {}
            client.post(receiver.url, content=body, headers={**headers, "Idempotency-Key": "k"})
        client.post(receiver.url, content=body + b" ", headers={"X-Stuck-Runs-Signature": good})
    finally:
        receiver.stop()
    assert [line["signature_ok"] for line in receiver.requests()] == [True, False, False, False]
    assert [line["key"] for line in receiver.requests()] == ["k", "k", "k", None]


def test_receiver_fleet_runs_each_idempotency_key_once(tmp_path, db_url, engine, client):
    first, second, third = insert(engine, 3, "running")
    receiver = start_receiver(
        tmp_path, ["ok", "ok", "ok", "status:503", "ok"], database_url=db_url, table="fleet_runs", fail_every=2
    )
    try:
        posts = [(first, "k1"), (first, "k1"), (second, "k2"), (third, "k3"), (third, "k3")]
        answers = [client.post(receiver.url, json={"id": i}, headers={"Idempotency-Key": k}) for i, k in posts]
        assert [a.status_code for a in answers] == [202, 200, 202, 503, 202]
        assert answers[1].json() == {"duplicate": True}
        wait_until(lambda: len(receiver.events()) == 3, timeout=10)
    finally:
        receiver.stop()
    assert [line["answer"] for line in receiver.requests()] == ["ok", "duplicate", "ok", "status:503", "ok"]
    assert sorted((e["event"], e["id"]) for e in receiver.events()) == sorted(
        [("completed", first), ("failed", second), ("completed", third)]
    )
    rows = states(engine)
    assert rows[first][0] == rows[third][0] == "completed" and rows[first][2] is not None
    assert rows[second][0] == "failed" and rows[second][3] == "HTTP Error 503: Service Unavailable"


def test_worker_ends_queued_runs_by_fate_on_a_quoted_enum_table(tmp_path, db_url, engine):
    runs = insert(engine, 3, "pending", ENUM_TABLE)
    common = {"table": ENUM_TABLE_ARGUMENT, "work": 0.05, "poll": 0.05}
    ok_log, fail_log = tmp_path / "ok.log", tmp_path / "fail.log"
    assert start_worker(db_url, ok_log, fate="ok", max_runs=2, **common).wait(15) == 0
    assert start_worker(db_url, fail_log, fate="notfound", max_runs=1, **common).wait(15) == 0
    rows = states(engine, ENUM_TABLE)
    assert sorted(status for status, *_ in rows.values()) == ["completed", "completed", "failed"]
    assert all(started and completed for _, started, completed, _ in rows.values())
    ended = {words[1]: words[2] for words in read_log(ok_log) + read_log(fail_log) if words[0] == "ended"}
    assert ended == {run: rows[run][0] for run in runs}
    failed = next(run for run in runs if rows[run][0] == "failed")
    assert rows[failed][3] == "HTTP Error 404: Not Found"
    assert [words[0] for words in read_log(fail_log)] == ["claimed", "ended"]


def test_worker_never_overwrites_a_run_that_left_running(tmp_path, db_url, engine):
    (run,) = insert(engine, 1, "pending")
    log = tmp_path / "worker.log"
    worker = start_worker(db_url, log, table="fleet_runs", fate="fail", work=1, max_runs=1)
    try:
        wait_until(lambda: read_log(log), timeout=10)
        assert states(engine)[run][0] == "running"
        with engine.begin() as conn:  # the stuck checker failed it meanwhile
            conn.execute(sa.text("UPDATE fleet_runs SET status = 'pending_retry' WHERE id::text = :id"), {"id": run})
        assert worker.wait(10) == 0
    finally:
        stop_process(worker)
    assert states(engine)[run][0] == "pending_retry"
    assert [words[0] for words in read_log(log)] == ["claimed", "superseded"]


def test_worker_hanging_on_a_run_leaves_it_running_when_terminated(tmp_path, db_url, engine):
    (run,) = insert(engine, 1, "pending")
    log = tmp_path / "worker.log"
    worker = start_worker(db_url, log, table="fleet_runs", fate="hang")
    try:
        wait_until(lambda: read_log(log), timeout=10)
    finally:
        assert stop_process(worker) == 0
    assert read_log(log) == [["claimed", run, str(worker.pid)], ["abandoned", run]]
    assert states(engine)[run][0] == "running"


def test_two_workers_never_claim_the_same_run(tmp_path, db_url, engine):
    runs = insert(engine, 50, "pending")
    stop = tmp_path / "stop"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [
        start_worker(db_url, log, table="fleet_runs", work=0.03, poll=0.02, stop_file=stop, fate="ok") for log in logs
    ]
    try:
        wait_until(lambda: sum(w[0] == "ended" for log in logs for w in read_log(log)) == 50, timeout=20)
        stop.touch()
        assert [worker.wait(10) for worker in workers] == [0, 0]
    finally:
        for worker in workers:
            stop_process(worker)
    claims = [words for log in logs for words in read_log(log) if words[0] == "claimed"]
    assert Counter(words[1] for words in claims) == Counter(runs)  # every run exactly once
    assert {words[2] for words in claims} == {str(w.pid) for w in workers}  # both took part
    assert {status for status, *_ in states(engine).values()} == {"completed"}


def test_worker_waits_out_a_database_restart(tmp_path):
    server = OwnServer(tmp_path)
    engine = sa.create_engine(server.url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(RUNS.format(table="fleet_runs", status="text"))
        (run,) = insert(engine, 1, "pending")
        server.stop()
        log = tmp_path / "worker.log"
        worker = start_worker(server.url, log, table="fleet_runs", work=0.05, poll=0.05, max_runs=1)
        try:
            wait_until(lambda: "database unavailable" in worker_stderr(log) or worker.poll() is not None, timeout=10)
            assert worker.poll() is None, worker_stderr(log)
            server.start()
            assert worker.wait(20) == 0
        finally:
            stop_process(worker)
        assert read_log(log) == [["claimed", run, str(worker.pid)], ["ended", run, "completed"]]
        assert states(engine)[run][0] == "completed"
    finally:
        engine.dispose()
        server.cleanup()


def test_worker_names_a_missing_column_in_one_line(tmp_path, db_url, engine):
    log = tmp_path / "worker.log"
    worker = start_worker(db_url, log, table="fleet_runs", status_column="state", max_runs=1)
    assert worker.wait(15) == EXIT_USAGE
    assert worker_stderr(log).splitlines() == [
        "fleet_worker: no column 'state' in table \"fleet_runs\"; pass --table and the --*-column names"
    ]
    assert read_log(log) == []


def worker_stderr(log) -> str:
    path = log.with_name(log.name + ".stderr")
    return path.read_text() if path.exists() else ""


def test_random_fate_is_fixed_by_seed_and_id_and_weighted():
    ids = [f"run-{n}" for n in range(2000)]
    fates = Counter(fate_of(i, "random", 3) for i in ids)
    assert [fate_of(i, "random", 3) for i in ids[:50]] == [fate_of(i, "random", 3) for i in ids[:50]]
    assert [fate_of(i, "random", 3) for i in ids[:50]] != [fate_of(i, "random", 4) for i in ids[:50]]
    assert 1250 < fates["ok"] < 1550 and 300 < fates["fail"] < 500
    assert 50 < fates["notfound"] < 150 and 50 < fates["hang"] < 150
    assert fate_of("x", "fail", 3) == "fail"
