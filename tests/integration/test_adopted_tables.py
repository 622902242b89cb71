"""SPEC §11: any runs table, adopted by configuration alone, through the real console script.

Each table of tests/adopted.py lives the whole story on databases of its own: migrate, a
stuck run failed with its retry, retries executed to each end, a manual retry, the reports,
the monitoring SQL, doctor and the daemon. Tables that cannot be adopted, and mappings that
are wrong, are refused in one line with nothing changed.

Databases are built once per table per module (the DDL, then migrated, then a story played
on it); every test that writes works on its own copy (`CREATE DATABASE ... TEMPLATE`), the tests
that only read the story share one copy (`viewed`, which checks at its end that nothing wrote).
The daemon runs over every table from a thread (`Daemon`, as the command builds it), and as a
real process on two of them (its start, SIGTERM and exit).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.adopted import (
    ADOPTABLE,
    DEFAULT,
    ERROR_503,
    HARVESTS,
    LONG_ERROR,
    PAGE_FETCHES,
    REFUSED,
    SCRAPING_JOB,
    SYNC_BATCHES,
    Adopted,
    Refused,
    quote,
    utc_now,
)
from tests.cli import run
from tests.conftest import REPO, Databases
from tests.daemons import DaemonProcess, wait_until
from tests.integration.test_cli import one_line_error

pytestmark = pytest.mark.slow

STUCK_RUNS = Path(sys.executable).with_name("stuck-runs")  # the console script of this venv
STUCK_MESSAGE = "Run stuck for 2.0h - retry 1/4 scheduled"
NOT_FOUND_MESSAGE = "HTTP Error 404: Not Found - not retried: permanent error (not_found)"
TWO_HOURS_AGO = timedelta(hours=2)
RLS = re.compile(r"row[- ]level security|\bRLS\b", re.IGNORECASE)


def said(fragment: str, line: str) -> bool:
    """`fragment` in `line`; `a|b` takes either wording."""
    return any(wording in line for wording in fragment.split("|"))


def database_name(url: str) -> str:
    return make_url(url).database


class Driver:
    """One adopted table on one database: the CLI with the table's settings, rows by real names."""

    def __init__(self, table: Adopted, url: str, cwd: Path) -> None:
        self.t = table
        self.url = url
        self.cwd = cwd  # no .env up from here
        # One connection kept for the test's own reads and inserts (a session per query cost a
        # backend's start each); idle between them, it holds no lock the commands could meet.
        self.engine = sa.create_engine(url, pool_size=1, max_overflow=4)

    def env(self, **changes: str | None) -> dict[str, str]:
        """The table's settings over a clean environment; a None change unsets a variable."""
        env = {"DATABASE_URL": self.url, "STUCK_AFTER": "1h", **self.t.env, **changes}
        base = {name: os.environ[name] for name in ("PATH", "HOME", "TMPDIR") if name in os.environ}
        base |= {"LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(REPO)}
        return {**base, **{name: value for name, value in env.items() if value is not None}}

    def cli(self, *args: str, **env: str | None) -> subprocess.CompletedProcess:
        return run([*args], env=self.env(**env), cwd=self.cwd, timeout=120)

    def ok(self, *args: str, **env: str | None) -> subprocess.CompletedProcess:
        result = self.cli(*args, **env)
        assert result.returncode == 0, f"stuck-runs {' '.join(args)}: {result.returncode}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def insert(self, steer: str, *, status: str | None = None, ago: timedelta = TWO_HOURS_AGO, **more: Any) -> Any:
        with self.engine.begin() as conn:
            return self.t.insert(conn, steer, status=status or self.t.running[0], started_at=utc_now() - ago, **more)

    def rows(self, where: str = "true", **params: Any) -> list[dict]:
        order = f'"retry_count", "{self.t.id}"' if self.migrated() else f'"{self.t.id}"'
        with self.engine.connect() as conn:
            found = conn.execute(sa.text(f"SELECT * FROM {self.t.quoted} WHERE {where} ORDER BY {order}"), params)
            return [dict(r) for r in found.mappings()]

    def row(self, run_id: Any) -> dict:
        (found,) = self.rows(f'"{self.t.id}" = :id', id=run_id)
        return found

    def chain(self, root: Any) -> list[dict]:
        return self.rows(f'"{self.t.id}" = :root OR original_run_id = :root', root=root)

    def retries_of(self, root: Any) -> list[dict]:
        return self.rows("original_run_id = :root", root=root)

    def with_status(self, value: str) -> list[dict]:
        return self.rows(f'"{self.t.status}"::text = :value', value=value)

    def make_retries_due(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"UPDATE {self.t.quoted} SET next_retry_at = now() - interval '1 minute' "
                    f'WHERE "{self.t.status}"::text = :pending'
                ),
                {"pending": self.t.pending_retry},
            )

    def migrated(self) -> bool:
        return "retry_count" in self.columns()

    def columns(self) -> dict[str, str]:
        """Column name -> its type as PostgreSQL spells it."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = CAST(:rel AS regclass) AND attnum > 0 AND NOT attisdropped"
                ),
                {"rel": self.t.quoted},
            )
            return dict(found.all())

    def error_is_a_json_string(self, run_id: Any) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    sa.text(
                        f'SELECT jsonb_typeof("{self.t.error}"::jsonb) FROM {self.t.quoted} WHERE "{self.t.id}" = :id'
                    ),
                    {"id": run_id},
                ).scalar_one()
                == "string"
            )

    def run_sql(self, text: str) -> list[dict]:
        """SQL as an operator pastes it into psql: no parameters, no driver interpolation."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(text)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
        finally:
            raw.close()

    def snapshot(self) -> dict[str, list]:
        return snapshot(self.engine, self.t.quoted)

    def close(self) -> None:
        self.engine.dispose()


def snapshot(engine: sa.Engine, quoted_table: str) -> dict[str, list]:
    """Everything a refused or repeated command must leave as it was: the table's columns,
    constraints, indexes, policies and rows, every enum, every table of the database."""
    queries = {
        "columns": "SELECT attname, format_type(atttypid, atttypmod), attnotnull, pg_get_expr(d.adbin, d.adrelid) "
        "FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = CAST(:rel AS regclass) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        "constraints": "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
        "WHERE conrelid = CAST(:rel AS regclass) ORDER BY conname",
        "indexes": "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
        "WHERE indrelid = CAST(:rel AS regclass) ORDER BY 1",
        "policies": "SELECT polname, polcmd FROM pg_policy WHERE polrelid = CAST(:rel AS regclass) ORDER BY 1",
        "enums": "SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid "
        "ORDER BY t.typname, e.enumsortorder",
        "tables": "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
        "rows": f"SELECT row_to_json(r)::text FROM {quoted_table} r ORDER BY 1",
    }
    with engine.connect() as conn:
        found = {
            name: [tuple(r) for r in conn.execute(sa.text(sql), {"rel": quoted_table})] for name, sql in queries.items()
        }
        found["row counts"] = [
            (schema, name, conn.execute(sa.text(f"SELECT count(*) FROM {quote(schema)}.{quote(name)}")).scalar_one())
            for schema, name in found["tables"]
        ]
    return found


def status_checks(engine: sa.Engine, table: Adopted) -> list[tuple[str, str, bool]]:
    """(name, definition, validated) of the CHECK constraints on the status column."""
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text(
                    "SELECT c.conname, pg_get_constraintdef(c.oid), c.convalidated FROM pg_constraint c "
                    "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) "
                    "WHERE c.conrelid = CAST(:rel AS regclass) AND c.contype = 'c' AND a.attname = :status"
                ),
                {"rel": table.quoted, "status": table.status},
            )
        ]


def migrate_args(table: Adopted) -> tuple[str, ...]:
    return ("migrate", "--extend-check") if table.check_guarded else ("migrate",)


# --- databases built once per table -------------------------------------------------------------


@pytest.fixture(scope="module")
def template_dbs(server_url: str) -> Iterator[Databases]:
    dbs = Databases(server_url)
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adopted")


def build(
    template_dbs: Databases, table: Adopted, workdir: Path, *, migrate: bool, from_template: str | None = None
) -> str:
    """A database holding the table (created from the DDL, or copied); migrated when asked."""
    url = template_dbs.create(from_template) if from_template else template_dbs.create()
    driver = Driver(table, url, workdir)
    try:
        if not from_template:
            with driver.engine.begin() as conn:
                conn.exec_driver_sql(table.ddl)
        if migrate:
            driver.ok(*migrate_args(table))
    finally:
        driver.close()
    return database_name(url)


@pytest.fixture(scope="module", params=ADOPTABLE, ids=lambda t: t.name)
def adopted(request: pytest.FixtureRequest) -> Adopted:
    return request.param


@pytest.fixture(scope="module")
def pristine(adopted: Adopted, template_dbs: Databases, workdir: Path) -> str:
    return build(template_dbs, adopted, workdir, migrate=False)


@pytest.fixture(scope="module")
def migrated(adopted: Adopted, pristine: str, template_dbs: Databases, workdir: Path) -> str:
    return build(template_dbs, adopted, workdir, migrate=True, from_template=pristine)


@dataclass(frozen=True)
class Story:
    """Three chains, each failed stuck at 2h, whose first retries ran: ok completed, fail503
    failed with a second retry pending, 404 failed for good."""

    template: str
    ok: Any
    fail503: Any
    not_found: Any


@pytest.fixture(scope="module")
def story(adopted: Adopted, migrated: str, template_dbs: Databases, workdir: Path) -> Story:
    url = template_dbs.create(migrated)
    driver = Driver(adopted, url, workdir)
    try:
        roots = [driver.insert(value) for value in ("ok-page", "fail503-page", "404-page")]
        driver.ok("check")
        driver.make_retries_due()
        driver.ok("process")
    finally:
        driver.close()
    return Story(database_name(url), *roots)


@pytest.fixture
def fresh(adopted: Adopted, migrated: str, databases: Databases, tmp_path: Path) -> Iterator[Driver]:
    """The table migrated, on a database of this test's own."""
    driver = Driver(adopted, databases.create(migrated), tmp_path)
    yield driver
    driver.close()


@pytest.fixture
def played(adopted: Adopted, story: Story, databases: Databases, tmp_path: Path) -> Iterator[Driver]:
    """The table after the story, on a database of this test's own (for a test that writes)."""
    driver = Driver(adopted, databases.create(story.template), tmp_path)
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def viewed(adopted: Adopted, story: Story, template_dbs: Databases, workdir: Path) -> Iterator[Driver]:
    """The table after the story, one copy shared by the tests that only read it (the reports,
    the listings, the SQL): a copy per test cost a CREATE and a DROP DATABASE (a checkpoint)
    each. Its end checks that they did only read: everything as the story left it."""
    driver = Driver(adopted, template_dbs.create(story.template), workdir)
    before = driver.snapshot()
    yield driver
    after = driver.snapshot()
    driver.close()
    assert after == before, "a test on the shared story wrote to it: give it `played`"


# --- the story, step by step -----------------------------------------------------------------------


def test_migrate_adopts_the_table_and_again_changes_nothing(adopted, pristine, databases, tmp_path):
    t = adopted
    d = Driver(t, databases.create(pristine), tmp_path)
    before = d.snapshot()
    if t.check_guarded:
        ((check_name, check_definition, _),) = status_checks(d.engine, t)
        refused = d.cli("migrate")
        assert refused.returncode == 1, refused.stderr
        printed = refused.stdout + refused.stderr
        assert "Traceback" not in printed
        for fragment in (check_name, "DROP CONSTRAINT", "NOT VALID", "VALIDATE CONSTRAINT", t.relation):
            assert fragment in printed, printed
        for value in t.mapped_values:
            assert f"'{value}'" in printed, printed
        assert d.snapshot() == before  # refused: nothing changed
    d.ok(*migrate_args(t))

    columns = d.columns()
    assert {"retry_count", "max_retries", "next_retry_at", "original_run_id", "is_retry"} <= set(columns)
    assert columns["original_run_id"] == columns[t.id]  # the id's own type
    for name, kind in t.added_columns.items():
        assert columns[name] == kind
    if t.check_guarded:
        ((name, definition, validated),) = status_checks(d.engine, t)
        assert (name, validated) == (check_name, True)  # re-created under its name, then validated
        for value in (*t.mapped_values, *re.findall(r"'([^']*)'", check_definition)):  # the old ones stay
            assert f"'{value}'" in definition, definition
    if t.status_enum:
        with d.engine.connect() as conn:
            labels = conn.execute(
                sa.text(
                    "SELECT e.enumlabel FROM pg_enum e JOIN pg_attribute a ON a.atttypid = e.enumtypid "
                    "WHERE a.attrelid = CAST(:rel AS regclass) AND a.attname = :status"
                ),
                {"rel": t.quoted, "status": t.status},
            ).scalars()
            assert set(t.mapped_values) <= set(labels)

    settled = d.snapshot()
    again = d.ok("migrate")  # a CHECK that now allows every mapped value is no longer in the way
    assert "nothing changed" in again.stdout
    assert d.snapshot() == settled
    d.close()


def test_check_fails_a_stuck_run_names_it_by_its_label_and_schedules_its_retry(adopted, fresh):
    t, d = adopted, fresh
    stuck = d.insert("ok-stuck")
    second_phase = d.insert("ok-indexing", status=t.running[1]) if len(t.running) > 1 else None
    young = d.insert("ok-young", ago=timedelta(minutes=30))
    failed_itself = d.insert("fail503-itself", status=t.failed, **{t.completed_at: t.stamp(utc_now())})

    result = d.ok("check")

    root = d.row(stuck)
    assert t.label_of(root) in result.stdout
    assert STUCK_MESSAGE in result.stdout
    for run_id in filter(None, (stuck, second_phase)):
        failed = d.row(run_id)
        assert failed[t.status] == t.failed
        assert failed[t.error] == STUCK_MESSAGE
        if t.error_kind == "json":
            assert d.error_is_a_json_string(run_id)
        assert failed[t.completed_at] is not None and failed["next_retry_at"] is not None
        (retry,) = d.retries_of(run_id)
        assert retry[t.status] == t.pending_retry
        assert (retry["retry_count"], retry["is_retry"], retry["original_run_id"]) == (1, True, run_id)
        assert retry[t.id] != run_id
        assert {c: retry[c] for c in t.input_columns} == {c: failed[c] for c in t.input_columns}
    assert d.row(young)[t.status] == t.running[0]
    assert d.row(failed_itself)[t.status] == t.failed and d.retries_of(failed_itself) == []
    assert d.retries_of(young) == []


def test_process_runs_due_retries_to_each_end(adopted, story, viewed):
    t, d = adopted, viewed
    root, done = d.chain(story.ok)
    assert done[t.status] == t.completed and done[t.completed_at] is not None

    root, first, second = d.chain(story.fail503)
    assert first[t.status] == t.failed
    assert first[t.error] == f"{ERROR_503} - retry 2/4 scheduled"
    assert first["next_retry_at"] is not None
    assert second[t.status] == t.pending_retry
    assert (second["retry_count"], second["original_run_id"]) == (2, story.fail503)
    assert {c: second[c] for c in t.input_columns} == {c: root[c] for c in t.input_columns}

    root, last = d.chain(story.not_found)
    assert last[t.status] == t.failed
    assert last[t.error] == NOT_FOUND_MESSAGE
    assert last["next_retry_at"] is None


def test_a_permanent_failure_is_one_dead_letter(adopted, story, viewed):
    t, d = adopted, viewed
    letters = json.loads(d.ok("dlq", "list", "--json").stdout)
    (letter,) = letters
    _, last = d.chain(story.not_found)
    assert (str(letter["chain_id"]), str(letter["run_id"])) == (str(story.not_found), str(last[t.id]))
    assert letter["pattern"] == "not_found"
    assert letter["inputs"][t.steer] == "404-page"


def test_retry_of_a_run_the_scraper_failed_itself(adopted, fresh):
    t, d = adopted, fresh
    failed = d.insert("ok-again", status=t.failed, **{t.completed_at: t.stamp(utc_now())})
    done = d.insert("ok-done", status=t.completed, **{t.completed_at: t.stamp(utc_now())})

    scheduled = d.ok("retry", str(failed))
    assert scheduled.stdout.startswith("Run scheduled for retry (attempt 1/4)")
    (retry,) = d.retries_of(failed)
    assert (retry[t.status], retry["retry_count"], retry["is_retry"]) == (t.pending_retry, 1, True)

    refused = d.cli("retry", str(done))
    assert refused.returncode == 1 and "nothing to retry" in one_line_error(refused)
    missing = {"uuid": str(uuid.uuid4()), "integer": "987654321", "text": "cj-no-such-run"}[t.id_kind]
    not_found = d.cli("retry", missing)
    assert not_found.returncode == 1 and "not found" in one_line_error(not_found)
    if t.id_kind == "integer":  # any text is a text id; a malformed UUID is test_cli's
        malformed = d.cli("retry", "not-an-id")
        assert malformed.returncode == 2 and "is not a run id" in one_line_error(malformed)
    assert d.retries_of(done) == []


def test_history_shows_the_chain_oldest_first(adopted, story, viewed):
    t, d = adopted, viewed
    chain = d.chain(story.fail503)
    report = json.loads(d.ok("history", str(story.fail503), "--json").stdout)
    attempts = report["attempts"]
    assert [str(a["id"]) for a in attempts] == [str(r[t.id]) for r in chain]
    assert [a["retry_count"] for a in attempts] == [0, 1, 2] and report["attempts_made"] == 2
    expected = [("failed", t.failed), ("failed", t.failed), ("pending_retry", t.pending_retry)]
    assert all(a["status"] in states for a, states in zip(attempts, expected, strict=True)), attempts
    text = d.ok("history", str(story.fail503)).stdout
    assert f"[RETRY 1/4] {t.label_of(chain[0])}" in text
    assert "Total attempts: 2" in text  # the pending retry is not an attempt made yet


def test_status_and_stats_count_the_table(adopted, story, viewed):
    d = viewed
    runs = json.loads(d.ok("status", "--json").stdout)["runs"]
    assert (runs["running"], runs["stuck"], runs["pending_retry"], runs["permanently_failed"]) == (0, 0, 1, 1)
    stats = json.loads(d.ok("stats", "--json").stdout)
    counts = ("chains", "retries", "succeeded", "pending", "permanently_failed", "stuck_detections")
    assert {name: stats[name] for name in counts} == {
        "chains": 3,
        "retries": 3,
        "succeeded": 1,
        "pending": 1,
        "permanently_failed": 1,
        "stuck_detections": 3,
    }


def test_stats_by_target_and_by_column_on_the_table(adopted, story, viewed):
    """`stats --by` (SPEC §15) on every shape: its groups add up to `stats`' totals, by the host of
    the steering column (TARGET) and by the column itself; `--by kind` without a kind column is refused."""
    t, d = adopted, viewed
    by_target = json.loads(d.ok("stats", "--by", "target", "--json", TARGET=f"host({t.steer})").stdout)
    # TARGET naming the column itself (text, varchar...) is accepted when the table is opened.
    by_column = json.loads(d.ok("stats", "--by", t.steer, "--json", TARGET=t.steer).stdout)
    for grouped in (by_target, by_column):
        summed = {
            k: sum(g[k] for g in grouped["groups"]) for k in ("retries", "succeeded", "permanently_failed", "stuck")
        }
        assert summed == {"retries": 3, "succeeded": 1, "permanently_failed": 1, "stuck": 3}  # as `stats` counts them
    assert by_column["key"] == t.steer and all(g["group"] for g in by_column["groups"])
    kind = d.cli("stats", "--by", "kind")
    assert kind.returncode == 2 and kind.stderr.count("\n") == 1 and "maps no kind" in kind.stderr, kind.stderr


def test_the_api_and_pages_of_issue_19_on_the_table(adopted, story, played):
    """What `serve` gained (stuck filter, orders, previous pages, cancel and inputs on the chain,
    the single retry's dry run, reset-stuck by the configured limit, 20-digit ids) on every shape."""
    from urllib.parse import quote as url_part

    from tests.web import ADMIN, InProcessWeb

    t, d = adopted, played
    stuck = d.insert("ok-stuck-again")
    failed = d.insert("ok-failed-itself", status=t.failed, **{t.completed_at: t.stamp(utc_now())})
    _, _, pending = d.chain(story.fail503)
    web = InProcessWeb(d.url, **{k: v for k, v in d.env().items() if k != "DATABASE_URL"})
    try:
        with web.client(ADMIN) as http:
            stuck_ids = [r["id"] for r in http.get("/api/runs", params={"stuck": "true"}).json()["data"]]
            due = http.get("/api/runs", params={"order": "due"}).json()["data"]
            started = http.get("/api/runs", params={"order": "started", "limit": 2}).json()
            second = http.get(
                "/api/runs", params={"order": "started", "limit": 2, "cursor": started["next_cursor"]}
            ).json()
            back = http.get(
                "/api/runs", params={"order": "started", "limit": 2, "before": second["prev_cursor"]}
            ).json()
            rows_before = len(d.rows())
            preview = http.post(f"/api/runs/{url_part(str(failed), safe='')}/retry", params={"dry_run": "true"})
            rows_after_preview = len(d.rows())
            chain_page = http.get(f"/runs/{url_part(str(story.fail503), safe='')}", headers={"Accept": "text/html"})
            pages = [
                http.get(p).status_code for p in ("/", "/runs?status=stuck", "/runs?order=due", "/runs?order=started")
            ]
            cancelled = http.post(f"/api/runs/{url_part(str(pending[t.id]), safe='')}/cancel")
            reset = http.post("/api/runs/reset-stuck").json()
            twenty = http.get("/api/runs/" + "9" * 20)
            get_on_post = http.get("/api/runs/reset-stuck")
    finally:
        web.stop()
    assert [str(i) for i in stuck_ids] == [str(stuck)]
    assert [str(r["id"]) for r in due] == [str(pending[t.id])] and due[0]["next_retry_at"]
    assert [r["id"] for r in back["data"]] == [r["id"] for r in started["data"]] and back["prev_cursor"] is None
    assert preview.status_code == 200 and preview.json()["message"] == "Would schedule a retry (attempt 1/4)"
    assert rows_after_preview == rows_before  # the dry run added no retry
    assert chain_page.status_code == 200 and 'id="inputs"' in chain_page.text and "Cancel retry" in chain_page.text
    assert f"<dt>{t.steer}</dt><dd>fail503-page</dd>" in chain_page.text
    assert pages == [200] * 4
    assert cancelled.status_code == 200, cancelled.text
    assert d.row(pending[t.id])[t.status] == t.cancelled
    assert reset["reset_count"] == 1 and [str(r) for r in reset["run_ids"]] == [str(stuck)]
    expected = (400, "are UUIDs") if t.id_kind == "uuid" else (404, "Run not found")
    assert (twenty.status_code, expected[1] in twenty.json()["error"]) == (expected[0], True), twenty.text
    assert get_on_post.status_code == 405


def test_sql_prints_the_monitoring_queries_in_the_tables_names(adopted, story, viewed):
    t, d = adopted, viewed
    pending_sql = d.ok("sql", "pending").stdout
    assert t.relation in pending_sql and t.status in pending_sql and t.pending_retry in pending_sql
    pending = d.run_sql(pending_sql)
    assert len(pending) == len(d.with_status(t.pending_retry)) == 1
    assert t.pending_retry in pending[0].values() and pending[0]["retry_count"] == 2

    history_sql = d.ok("sql", "history", str(story.fail503)).stdout
    assert t.relation in history_sql and str(story.fail503) in history_sql
    chain = d.run_sql(history_sql)
    assert [r["retry_count"] for r in chain] == [0, 1, 2]
    assert [r.get(t.status, r.get("status")) for r in chain] == [t.failed, t.failed, t.pending_retry]


def test_doctor_passes_and_prints_the_resolved_mapping(adopted, fresh):
    t, d = adopted, fresh
    out = d.ok("doctor").stdout
    assert "✗" not in out
    for name in (t.table, t.id, t.status, t.started_at, t.completed_at, t.error, *t.mapped_values):
        assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", out), f"{name!r} not in doctor's output:\n{out}"


DAEMON_SETTINGS = {"CHECK_INTERVAL": "1h", "PROCESS_INTERVAL": "30m"}


def test_the_daemon_fails_a_stuck_run_on_the_table(adopted, fresh):
    """The daemon over every shape: `Daemon` (its scheduler, jobs, records and stop, as `stuck-runs
    daemon` builds it from the same settings and runtime) run from a thread of this process. Its
    being a process (start, SIGTERM, exit code, log) is the next test's, on the shapes whose names a
    process's start must get right."""
    from jobs.runtime import Runtime
    from jobs.settings import load_settings
    from scheduler.daemon import Daemon

    t, d = adopted, fresh
    stuck = d.insert("ok-daemon")
    rt = Runtime.open(load_settings(d.env(**DAEMON_SETTINGS)), role="daemon", executes=True)
    daemon, raised = Daemon(rt), []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # noqa: BLE001 - said by the test, not lost in a thread
            raised.append(exc)

    thread = threading.Thread(target=run, name="daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: d.row(stuck)[t.status] == t.failed, timeout=120)
    finally:
        daemon.request_stop()
        thread.join(120)
        rt.close()
    assert not thread.is_alive() and raised == [], raised
    assert d.row(stuck)[t.error] == STUCK_MESSAGE
    assert [r[t.status] for r in d.retries_of(stuck)] == [t.pending_retry]


@pytest.mark.parametrize("table", [SCRAPING_JOB, PAGE_FETCHES], ids=lambda t: t.name)
def test_the_daemon_process_fails_a_stuck_run_and_stops_on_sigterm(table, databases, tmp_path):
    """`stuck-runs daemon` as a process on the two names a process reads from its environment and
    must quote or qualify right: a mixed-case table (with an enum, naive times and an ORM's text
    ids) and a schema-qualified one (with two running values and a CHECK)."""
    t, d = table, adopt(table, databases, tmp_path)
    try:
        stuck = d.insert("ok-daemon")
        daemon = DaemonProcess(d.url, str(STUCK_RUNS), "daemon", **d.env(**DAEMON_SETTINGS))
        try:
            wait_until(lambda: d.row(stuck)[t.status] == t.failed, timeout=120)
        finally:
            log = daemon.stop(timeout=120)
        assert daemon.returncode == 0, log
        assert "Traceback" not in log
        assert d.row(stuck)[t.error] == STUCK_MESSAGE
        assert [r[t.status] for r in d.retries_of(stuck)] == [t.pending_retry]
    finally:
        d.close()


# --- one table, one rule -------------------------------------------------------------------------


def adopt(table: Adopted, databases: Databases, cwd: Path) -> Driver:
    """The table from its DDL, migrated, on a database of the test's own."""
    driver = Driver(table, databases.create(), cwd)
    with driver.engine.begin() as conn:
        conn.exec_driver_sql(table.ddl)
    driver.ok(*migrate_args(table))
    return driver


def test_row_level_security_without_an_update_policy_is_refused(databases, tmp_path):
    t = SYNC_BATCHES
    admin = adopt(t, databases, tmp_path)
    stuck = admin.insert("ok-tenant")
    role = f"sr_rls_{uuid.uuid4().hex[:8]}"
    with admin.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA public TO {role}")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        conn.exec_driver_sql(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    as_role = Driver(t, make_url(admin.url).set(username=role).render_as_string(hide_password=False), tmp_path)
    try:
        doctor = as_role.cli("doctor")
        assert doctor.returncode == 1, doctor.stdout
        failing = [line for line in doctor.stdout.splitlines() if line.startswith("✗")]
        assert any(RLS.search(line) and t.relation in line for line in failing), doctor.stdout

        check = as_role.cli("check")
        assert check.returncode == 1
        assert RLS.search(one_line_error(check))
        assert admin.row(stuck)[t.status] == t.running[0] and admin.retries_of(stuck) == []

        with admin.engine.begin() as conn:  # the policy the scraper's DBA would add for stuck-runs
            conn.exec_driver_sql(
                f"CREATE POLICY stuck_runs_writes ON {t.quoted} FOR ALL TO {role} USING (true) WITH CHECK (true)"
            )
        as_role.ok("doctor")
        as_role.ok("check")
        assert admin.row(stuck)[t.status] == t.failed and len(admin.retries_of(stuck)) == 1
    finally:
        as_role.close()
        with admin.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
        admin.close()
        with databases.admin.connect() as conn:
            conn.exec_driver_sql(f"DROP ROLE {role}")


@pytest.mark.parametrize("table", REFUSED, ids=lambda t: t.name)
@pytest.mark.parametrize("command", ["migrate", "check"])
def test_a_table_that_cannot_be_adopted_is_refused_in_one_line_unchanged(table: Refused, command, databases, tmp_path):
    url = databases.create()
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(table.ddl)
        conn.exec_driver_sql(table.seed)
    before = snapshot(engine, quote(table.table))
    as_adopted = replace(DEFAULT, table=table.table)
    driver = Driver(as_adopted, url, tmp_path)
    result = driver.cli(command, SCRAPE_RUN_COMMAND=None, **table.env)
    assert result.returncode in (1, 2), result.stdout
    line = one_line_error(result).lower()
    assert table.table in line and all(said(fragment, line) for fragment in table.reason), line
    assert snapshot(engine, quote(table.table)) == before
    driver.close()
    engine.dispose()


@pytest.fixture(scope="module")
def harvests_pristine(template_dbs: Databases, workdir: Path) -> str:
    """The varchar(3) table as created."""
    return build(template_dbs, HARVESTS, workdir, migrate=False)


@pytest.fixture(scope="module")
def harvests_migrated(harvests_pristine: str, template_dbs: Databases, workdir: Path) -> str:
    return build(template_dbs, HARVESTS, workdir, migrate=True, from_template=harvests_pristine)


COLUMNS = HARVESTS.column_map
STATUSES = HARVESTS.status_map


@pytest.mark.parametrize(
    ("setting", "fragments"),
    [
        ({"COLUMN_MAP": COLUMNS + ",finish=end_time"}, ("COLUMN_MAP", "finish")),
        ({"COLUMN_MAP": COLUMNS.replace("id=uuid", "id=harvest_id")}, ("COLUMN_MAP", "harvest_id")),
        ({"COLUMN_MAP": COLUMNS + ",status=state"}, ("COLUMN_MAP", "state")),
        ({"COLUMN_MAP": COLUMNS.replace("id=uuid", "id=")}, ("COLUMN_MAP", "id")),
        ({"COLUMN_MAP": COLUMNS.replace("id=uuid", "uuid")}, ("COLUMN_MAP", "uuid")),
        ({"STATUS_MAP": STATUSES.replace("PEN", "PENDING")}, ("STATUS_MAP", "pending_retry", "PENDING", "3")),
        ({"STATUS_MAP": STATUSES.replace("completed=SUC", "completed=")}, ("STATUS_MAP", "completed")),
        ({"STATUS_MAP": STATUSES + ",finished=FIN"}, ("STATUS_MAP", "finished")),
    ],
    ids=[
        "unknown-role",
        "missing-id-column",
        "missing-status-column",
        "empty-column",
        "no-equals-sign",
        "value-too-long-for-varchar-3",
        "empty-value",
        "unknown-state",
    ],
)
@pytest.mark.parametrize("command", ["migrate", "check"])
def test_a_bad_mapping_is_one_line_exit_2_and_changes_nothing(
    setting, fragments, command, request, databases, tmp_path
):
    template = request.getfixturevalue("harvests_pristine" if command == "migrate" else "harvests_migrated")
    d = Driver(HARVESTS, databases.create(template), tmp_path)
    if command == "check":
        d.insert("ok-stuck")
    before = d.snapshot()
    args = migrate_args(HARVESTS) if command == "migrate" else (command,)  # --extend-check: only the map is wrong
    result = d.cli(*args, SCRAPE_RUN_COMMAND=None, **setting)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line_error(result)
    assert all(fragment in line for fragment in fragments), line
    assert d.snapshot() == before
    d.close()


def test_a_long_error_is_cut_to_fit_its_column_keeping_the_retry_tail(harvests_migrated, databases, tmp_path):
    t = HARVESTS
    d = Driver(t, databases.create(harvests_migrated), tmp_path)
    root_id = d.insert("long-page")
    d.ok("check")
    d.make_retries_due()
    d.ok("process")
    _, first, _ = d.chain(root_id)
    message, tail = first[t.error], " - retry 2/4 scheduled"
    assert first[t.status] == t.failed
    assert len(message) <= t.error_limit and message.endswith(tail), message
    head = message.removesuffix(tail).rstrip("…. ")
    assert len(head) > t.error_limit // 2 and LONG_ERROR.startswith(head), message
    d.close()


def test_runs_search_listing_and_every_filter_work_on_the_table(adopted, story, viewed):
    """`/runs?q=`, `GET /api/runs` and each of their filters on every adopted shape (a JSON error
    column once answered 500: the search term was bound as JSONB and compared with ILIKE)."""
    from tests.web import READER, InProcessWeb

    t, d = adopted, viewed
    _, failed_503, pending = d.chain(story.fail503)
    server = InProcessWeb(d.url, **t.env, STUCK_AFTER="1h")
    try:
        with server.client(READER) as http:

            def listed(**params: str) -> list[str]:
                answer = http.get("/api/runs", params=params)
                assert answer.status_code == 200, (params, answer.text)
                return [str(run["id"]) for run in answer.json()["data"]]

            everything = listed(limit="500")
            assert len(everything) == len(d.rows())
            found = listed(q="503 Server Error")  # the error's text, JSON or not
            assert found == [str(failed_503[t.id])], found
            newest_first = sorted(d.chain(story.fail503), key=lambda r: r["retry_count"], reverse=True)
            assert listed(q="fail503-PAGE") == [str(r[t.id]) for r in newest_first]  # inputs, any case
            assert listed(q="no such text anywhere") == []
            states = ("running", "completed", "failed", "pending_retry", "cancelled")
            by_state = {state: listed(status=state, limit="500") for state in states}
            assert by_state["pending_retry"] == [str(pending[t.id])]
            assert len(by_state["failed"]) == 5 and len(by_state["completed"]) == 1  # 3 roots, 2 retries
            assert listed(since="1d", status="failed", q="503 server ERROR") == [str(failed_503[t.id])]
            pages, cursor = [], None
            while True:  # keyset pages of 2 walk every run once
                answer = http.get("/api/runs", params={"limit": "2", **({"cursor": cursor} if cursor else {})}).json()
                pages += [str(run["id"]) for run in answer["data"]]
                cursor = answer["next_cursor"]
                if cursor is None:
                    break
            assert pages == everything
            page = http.get("/runs", params={"q": "503 Server Error", "status": "failed", "since": "7d"})
            assert page.status_code == 200, page.text
            assert "No run matches" not in page.text and ERROR_503 in page.text
    finally:
        server.stop()


def test_fixed_budgets_late_completions_due_now_and_bookkeeping_on_every_table(adopted, fresh):
    """Issue 19 on each table: a budget fixed at 0 stays spent, a late completion loses stuck-runs'
    message, a pending retry is made due now and run, and an ORM's updatedAt follows every write."""
    t, d = adopted, fresh
    started = utc_now().replace(microsecond=0)
    updated = [n for n in t.orm_filled if n.replace("_", "").lower() == "updatedat"]
    late = d.insert("ok-late", **{name: t.stamp(started - TWO_HOURS_AGO) for name in updated})
    d.ok("check")
    assert d.row(late)[t.error] == "Run stuck for 2.0h - retry 1/4 scheduled"
    for name in updated:
        assert d.row(late)[name] >= t.stamp(started), name  # the failure is a change ETL must see
    with d.engine.begin() as conn:  # the scraper completes it after all, its error column untouched
        conn.execute(
            sa.text(f'UPDATE {t.quoted} SET "{t.status}" = :v WHERE "{t.id}" = :id'), {"v": t.completed, "id": late}
        )
    d.ok("process")
    assert d.row(late)[t.error] is None
    [superseded] = d.retries_of(late)
    assert superseded[t.status] == t.cancelled

    capped = d.insert("fail503-capped")
    d.ok("check", "--max-retries", "0")
    assert d.row(capped)[t.error] == "Run stuck for 2.0h - permanently failed after 0 attempts"
    refused = d.cli("retry", str(capped))
    assert refused.returncode == 1 and "(0 of 0 retries spent; 1 attempt," in refused.stderr, refused.stderr
    assert d.retries_of(capped) == []

    hurried = d.insert("ok-hurried")
    d.ok("check")
    [pending] = d.retries_of(hurried)
    done = d.ok("retry", str(pending[t.id]), "--now")
    label = t.label_of(d.row(hurried))
    assert done.stdout.splitlines()[:2] == [f"Retry 1/4 of {label} is due now", "Executed: completed"], done.stdout
    assert d.row(pending[t.id])[t.status] == t.completed


def test_thresholds_show_each_kinds_runs_and_its_stuck_runs_on_every_table(adopted, played):
    """SPEC §14 on every shape: the table gains a kind column; `thresholds` counts its completed runs
    and the runs failed as stuck as a count by hand in SQL over the real names says; without a
    kind role, every run is one row; a what-if changes nothing."""
    t, d = adopted, played
    with d.engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {t.quoted} ADD COLUMN crawl_kind TEXT")
        conn.exec_driver_sql(f"UPDATE {t.quoted} SET crawl_kind = 'jobs_de'")
    column_map = ",".join(filter(None, (t.column_map, "kind=crawl_kind")))
    before = d.snapshot()
    shown = json.loads(d.ok("thresholds", "--json", COLUMN_MAP=column_map).stdout)
    completed = d.rows(f'"{t.status}" = :v AND "{t.started_at}" IS NOT NULL', v=t.completed)
    stuck = d.rows("failure_pattern = 'stuck'")
    assert len(stuck) == 3  # the story's three chains, each failed stuck once
    [jobs] = shown["kinds"]
    assert (jobs["kind"], jobs["runs"], jobs["caught"]) == ("jobs_de", len(completed), 3)
    assert jobs["source"] == "default" and jobs["limit"] == 3600
    [everything] = json.loads(d.ok("thresholds", "--json").stdout)["kinds"]  # no kind role: one row for all
    assert (everything["kind"], everything["runs"], everything["caught"]) == (None, len(completed), 3)
    proposed = d.ok("thresholds", "--what-if", "jobs_de=30m,learn=on", COLUMN_MAP=column_map)
    assert "What if jobs_de=30m,learn=on" in proposed.stdout
    assert d.snapshot() == before
