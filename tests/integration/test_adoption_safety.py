"""What a new user met adopting tables (a trial of SPEC §11): mappings that would have overwritten
a scraper's data, lost retries or crashed are refused in one line, and a mapping changed after
`migrate` is completed by the next `migrate`."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from tests.integration.test_cli import cli as run_cli
from tests.integration.test_cli import one_line_error

BASE = """
CREATE TABLE jobs (
    job_id SERIAL PRIMARY KEY,
    url TEXT NOT NULL,
    payload JSONB,
    state TEXT NOT NULL,
    started TIMESTAMPTZ,
    ended TIMESTAMPTZ,
    failure TEXT{extra}
);
INSERT INTO jobs (url, payload, state, started) VALUES
    ('https://keep.example/1', '{{"cfg": "precious"}}', 'busy', now() - interval '2 hours'),
    ('https://keep.example/2', NULL, 'busy', now() - interval '3 hours');
"""
MAP = {
    "SCRAPE_RUNS_TABLE": "jobs",
    "COLUMN_MAP": "id=job_id,status=state,started_at=started,completed_at=ended,error_message=failure",
    "STATUS_MAP": "running=busy,completed=ok,failed=bad,pending_retry=again,cancelled=dropped",
    "RUN_LABEL": "{url}",
}


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI on `url` with this file's table mapping, `env` over it."""
    return run_cli(*args, env={"DATABASE_URL": url, **MAP, **env})


def fingerprint(url: str) -> str:
    engine = make_engine(url)
    with engine.connect() as conn:
        found = conn.exec_driver_sql("SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM jobs t").scalar_one()
        columns = conn.exec_driver_sql(
            "SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum) "
            "FROM pg_attribute WHERE attrelid = 'jobs'::regclass AND attnum > 0 AND NOT attisdropped"
        ).scalar_one()
    engine.dispose()
    return f"{found}/{columns}"


def table(databases, extra: str = "") -> str:
    url = databases.create()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(BASE.format(extra=extra))
    engine.dispose()
    return url


@pytest.mark.parametrize(
    ("column_map", "fragment"),
    [
        ("error_message=url", "jobs.url cannot be the error_message: RUN_LABEL names it"),
        ("error_message=payload", "jobs.payload cannot be the error_message: running runs already hold values"),
    ],
)
def test_a_written_role_on_the_scrapers_data_is_refused_before_anything_changes(databases, column_map, fragment):
    url = table(databases)
    mapping = MAP["COLUMN_MAP"].replace("error_message=failure", "").replace("completed_at=ended", "")
    env = {"COLUMN_MAP": ",".join(p for p in (mapping, column_map) if p.strip(","))}
    before = fingerprint(url)
    for command in ("migrate", "check"):
        result = cli(url, command, **env)
        assert result.returncode == 2, (command, result.stderr)
        assert fragment in one_line_error(result), command
    assert fingerprint(url) == before


def test_a_unique_input_column_is_refused_instead_of_losing_every_retry(databases):
    url = table(databases, ",\n    job_key TEXT UNIQUE")
    before = fingerprint(url)
    result = cli(url, "migrate")
    assert result.returncode == 1
    assert "has a UNIQUE constraint on (job_key): a retry copies those columns" in one_line_error(result)
    assert fingerprint(url) == before


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (",\n    retry_count TEXT", "jobs.retry_count is text, but stuck-runs keeps its own retry_count (integer)"),
        (",\n    is_retry INTEGER", "jobs.is_retry is integer, but stuck-runs keeps its own is_retry (boolean)"),
        (",\n    original_run_id UUID", "jobs.original_run_id is uuid, but it must hold ids of job_id (integer)"),
    ],
)
def test_a_scrapers_column_named_like_stuck_runs_own_is_refused(databases, extra, fragment):
    url = table(databases, extra)
    before = fingerprint(url)
    for args in (["migrate"], ["migrate", "--sql"], ["check"]):
        result = cli(url, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert fragment in one_line_error(result), args
    assert fingerprint(url) == before


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"RUN_LABEL": "{nope}"}, "RUN_LABEL: {nope} is not a column of jobs"),
        ({"RUN_LABEL": "{URL}"}, "RUN_LABEL: {URL} is not a column of jobs"),
        ({"COLUMN_MAP": MAP["COLUMN_MAP"] + ",id=next_retry_at"}, "maps id twice"),
        (
            {"COLUMN_MAP": "id=job_id,completed_at=next_retry_at"},
            "completed_at=next_retry_at is one of stuck-runs' own",
        ),
    ],
)
def test_a_label_or_map_naming_what_is_not_there_is_one_line_exit_2(databases, env, fragment):
    url = table(databases)
    assert cli(url, "migrate").returncode == 0
    before = fingerprint(url)
    for command in ("check", "status", "doctor"):
        result = cli(url, command, **env)
        if command == "doctor":
            assert result.returncode in (1, 2) and "Traceback" not in result.stderr + result.stdout
            assert fragment in result.stdout + result.stderr
            continue
        assert result.returncode == 2, (command, result.stderr)
        assert fragment in one_line_error(result), command
    assert fingerprint(url) == before


def test_an_error_column_too_short_for_the_messages_is_refused(databases):
    url = table(databases, ",\n    note VARCHAR(10)")
    result = cli(url, "migrate", COLUMN_MAP=MAP["COLUMN_MAP"].replace("failure", "note"))
    assert result.returncode == 2
    assert "jobs.note (the error_message) is varchar(10): too short" in one_line_error(result)


def test_a_mapping_changed_after_migrate_is_completed_by_the_next_migrate(databases):
    url = databases.create()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TYPE st AS ENUM ('busy', 'ok', 'bad')")
        conn.exec_driver_sql(BASE.format(extra="").replace("state TEXT", "state st"))
    engine.dispose()
    assert cli(url, "migrate").returncode == 0
    # The scraper learns a second running phase, and the operator a new error column.
    changed = {
        "STATUS_MAP": MAP["STATUS_MAP"].replace("running=busy", "running=busy|indexing"),
        "COLUMN_MAP": MAP["COLUMN_MAP"].replace("failure", "last_error"),
    }
    refused = cli(url, "check", **changed)
    assert refused.returncode == 1 and "run `stuck-runs migrate`" in one_line_error(refused)
    done = cli(url, "migrate", **changed)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Completed jobs for its mapping: added column last_error, status enum values")
    swept = cli(url, "check", **changed)
    assert swept.returncode == 0, swept.stderr
    assert "failed 2 stuck run(s)" in swept.stdout
    again = cli(url, "migrate", **changed)
    assert "nothing changed" in again.stdout


def test_a_json_error_column_is_sql_null_on_a_claimed_retry_and_a_text_id_keeps_its_default(databases):
    url = databases.create()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE crawls (rid TEXT PRIMARY KEY DEFAULT 'c-' || md5(random()::text), url TEXT, "
            "state TEXT NOT NULL, started TIMESTAMPTZ, ended TIMESTAMPTZ, problem JSONB)"
        )
        conn.execute(
            sa.text("INSERT INTO crawls (url, state, started) VALUES ('u', 'busy', :t)"),
            {"t": datetime.now(timezone.utc) - timedelta(hours=2)},
        )
    env = {
        "SCRAPE_RUNS_TABLE": "crawls",
        "COLUMN_MAP": "id=rid,status=state,started_at=started,completed_at=ended,error_message=problem",
        "RETRY_DELAY": "0",
        "SCRAPE_RUN_COMMAND": "true",
    }
    assert cli(url, "migrate", **env).returncode == 0
    assert cli(url, "check", **env).returncode == 0
    assert cli(url, "process", **env).returncode == 0, "the retry runs and completes"
    with engine.connect() as conn:
        retry = conn.exec_driver_sql("SELECT rid, state, problem IS NULL FROM crawls WHERE is_retry").one()
    engine.dispose()
    assert retry[0].startswith("c-") and len(retry[0]) == 34  # the table's own default, not a UUID
    assert retry[1] == "ok" and retry[2] is True  # SQL NULL, not JSON null


def test_doctor_fails_a_command_placeholder_that_process_would_refuse(databases):
    url = table(databases)
    assert cli(url, "migrate").returncode == 0
    result = cli(url, "doctor", SCRAPE_RUN_COMMAND="echo {nope}")
    assert result.returncode == 1
    [line] = [line for line in result.stdout.splitlines() if line.startswith("✗ executor placeholders")]
    assert "{nope} is not a column of jobs" in line
    assert cli(url, "process", SCRAPE_RUN_COMMAND="echo {nope}").returncode == 2


def test_sql_history_of_a_retry_prints_its_whole_chain(databases):
    url = table(databases)
    assert cli(url, "migrate").returncode == 0
    assert cli(url, "check").returncode == 0
    engine = make_engine(url)
    with engine.connect() as conn:
        retry_id, root = conn.exec_driver_sql("SELECT job_id, original_run_id FROM jobs WHERE is_retry LIMIT 1").one()
        printed = cli(url, "sql", "history", str(retry_id))
        assert printed.returncode == 0, printed.stderr
        assert f"= {root}" in printed.stdout
        rows = conn.exec_driver_sql(printed.stdout).all()
    engine.dispose()
    assert [row.retry_count for row in rows] == [0, 1]


def test_an_index_built_for_another_status_map_is_rebuilt_by_migrate_and_named_by_doctor(databases):
    url = table(databases)
    assert cli(url, "migrate").returncode == 0
    second_phase = {"STATUS_MAP": MAP["STATUS_MAP"].replace("running=busy", "running=busy|indexing")}
    doctor = cli(url, "doctor", SCRAPE_RUN_COMMAND="true", **second_phase)
    assert doctor.returncode == 1
    [line] = [line for line in doctor.stdout.splitlines() if line.startswith("✗ indexes")]
    assert "ix_jobs_running_started_at (built for another mapping)" in line
    script = cli(url, "migrate", "--sql", **second_phase).stdout
    assert "DROP INDEX CONCURRENTLY IF EXISTS public.ix_jobs_running_started_at;" in script
    assert "WHERE state IN ('busy', 'indexing')" in script
    done = cli(url, "migrate", **second_phase)
    assert done.returncode == 0 and "index ix_jobs_running_started_at" in done.stdout, done.stdout
    engine = make_engine(url)
    with engine.connect() as conn:
        predicate = conn.exec_driver_sql(
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = 'ix_jobs_running_started_at'::regclass"
        ).scalar_one()
    engine.dispose()
    assert "'indexing'" in predicate
    assert "✗" not in cli(url, "doctor", SCRAPE_RUN_COMMAND="true", **second_phase).stdout


def test_a_bookkeeping_timestamp_without_default_gets_now_on_a_retry_not_a_copy(databases):
    url = table(databases, ',\n    "updatedAt" TIMESTAMPTZ')
    engine = make_engine(url)
    with engine.begin() as conn:  # the ORM filled it when the run started; it is NOT NULL, no default
        conn.exec_driver_sql("""UPDATE jobs SET "updatedAt" = '2020-01-01T00:00:00Z'""")
        conn.exec_driver_sql("""ALTER TABLE jobs ALTER "updatedAt" SET NOT NULL""")
    before = datetime.now(timezone.utc)
    assert cli(url, "migrate").returncode == 0
    assert cli(url, "check").returncode == 0
    with engine.connect() as conn:
        stamps = conn.exec_driver_sql('SELECT "updatedAt" FROM jobs WHERE is_retry').scalars().all()
    engine.dispose()
    assert len(stamps) == 2 and all(stamp >= before - timedelta(seconds=5) for stamp in stamps)
