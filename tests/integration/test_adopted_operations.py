"""Operators' commands on an adopted table with integer ids: dead letters named by the run's id,
doctor's warning about naive timestamps on a server that is not on UTC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

from db.engine import make_engine
from tests.integration.test_cli import cli as run_cli

TABLE = """
CREATE TABLE fetches (
    fetch_id SERIAL PRIMARY KEY,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    failure TEXT,
    begun TIMESTAMP NOT NULL,
    ended TIMESTAMP
)
"""
ENV = {
    "SCRAPE_RUNS_TABLE": "fetches",
    "COLUMN_MAP": "id=fetch_id,status=state,started_at=begun,completed_at=ended,error_message=failure",
    "STATUS_MAP": "running=busy,completed=ok,failed=bad,pending_retry=again,cancelled=dropped",
    "RUN_LABEL": "{url}",
}


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI on `url` with this file's table mapping, `env` over it."""
    return run_cli(*args, env={"DATABASE_URL": url, **ENV, **env})


def adopted_database(databases) -> str:
    url = databases.create()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TABLE)
        started = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=3)
        for n in range(3):  # fetch_id 1, 2, 3
            conn.execute(
                sa.text("INSERT INTO fetches (url, state, begun) VALUES (:u, 'busy', :t)"),
                {"u": f"https://example.test/{n}", "t": started},
            )
    engine.dispose()
    assert cli(url, "migrate").returncode == 0
    return url


def test_dead_letters_of_an_integer_id_table_are_named_by_number_or_by_run_id(databases):
    url = adopted_database(databases)
    swept = cli(url, "check", "--max-retries", "0")  # every stuck chain ends at once: three dead letters
    assert swept.returncode == 0, swept.stderr
    letters = json.loads(cli(url, "dlq", "list", "--json").stdout)
    assert sorted(letter["run_id"] for letter in letters) == [1, 2, 3]
    by_run = {letter["run_id"]: letter["id"] for letter in letters}
    # fetch 3's letter is not letter 3 (they were written in the order the sweep took them, oldest first)
    shown = cli(url, "dlq", "show", "run:3", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["run_id"] == 3
    numbered = json.loads(cli(url, "dlq", "show", str(by_run[2]), "--json").stdout)
    assert numbered["run_id"] == 2
    requeued = cli(url, "dlq", "requeue", "run:1")
    assert requeued.returncode == 0 and "Run scheduled for retry" in requeued.stdout, requeued.stderr
    engine = make_engine(url)
    with engine.connect() as conn:
        retry = conn.exec_driver_sql("SELECT state, original_run_id, retry_count FROM fetches WHERE is_retry").one()
    engine.dispose()
    assert tuple(retry) == ("again", 1, 1)
    refused = cli(url, "dlq", "show", "run:abc")
    assert refused.returncode == 2 and "'abc' is not a run id" in refused.stderr


def test_doctor_warns_about_naive_timestamps_when_the_server_is_not_on_utc(databases):
    url = adopted_database(databases)
    on_utc = cli(url, "doctor", SCRAPE_RUN_COMMAND="true")
    assert on_utc.returncode == 0 and "! time zone" not in on_utc.stdout, on_utc.stdout
    engine = make_engine(url)
    with engine.connect() as conn:
        database = conn.exec_driver_sql("SELECT current_database()").scalar_one()
        conn.exec_driver_sql(f"ALTER DATABASE {database} SET TimeZone = 'Europe/Paris'")
        conn.commit()
    engine.dispose()
    paris = cli(url, "doctor", SCRAPE_RUN_COMMAND="true")
    assert paris.returncode == 0, paris.stdout  # a warning, not a failure
    [warning] = [line for line in paris.stdout.splitlines() if line.startswith("! time zone")]
    assert "Europe/Paris" in warning and "begun, ended" in warning and "reads as UTC" in warning


def test_doctor_warns_about_status_values_the_mapping_leaves_out(databases):
    url = adopted_database(databases)
    engine = make_engine(url)
    with engine.begin() as conn:  # the scraper also writes 'queued_x', which STATUS_MAP does not mention
        conn.exec_driver_sql(
            "INSERT INTO fetches (url, state, begun) VALUES ('https://example.test/q', 'queued_x', now())"
        )
    engine.dispose()
    result = cli(url, "doctor", SCRAPE_RUN_COMMAND="true")
    assert result.returncode == 0, result.stdout
    [warning] = [line for line in result.stdout.splitlines() if line.startswith("! status values")]
    assert "of 4 rows sampled" in warning and "'queued_x' (1)" in warning and "STATUS_MAP" in warning
    clean = cli(url, "doctor", SCRAPE_RUN_COMMAND="true", STATUS_MAP=ENV["STATUS_MAP"] + ",queued=queued_x")
    assert "! status values" not in clean.stdout


def test_the_script_and_a_bulk_retry_work_on_an_adopted_table(databases):
    url = adopted_database(databases)
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    script = Path(__file__).resolve().parents[2] / "scripts" / "fix_stuck_runs_with_retry.py"
    fixed = subprocess.run(
        [sys.executable, str(script), "--max-retries", "0"],
        env={**base, "DATABASE_URL": url, **ENV, "SCRAPE_RUN_COMMAND": "true"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fixed.returncode == 0, fixed.stderr
    assert "failed 3 stuck run(s)" in fixed.stdout and "https://example.test/0" in fixed.stdout
    bulk = cli(url, "retry", "--error-like", "%permanently failed%", "--reset-budget", "--json")
    assert bulk.returncode == 0, bulk.stderr
    assert len(json.loads(bulk.stdout)["scheduled"]) == 3
    engine = make_engine(url)
    with engine.connect() as conn:
        states = conn.exec_driver_sql("SELECT state, count(*) FROM fetches GROUP BY state ORDER BY state").all()
    engine.dispose()
    assert [tuple(row) for row in states] == [("again", 3), ("bad", 3)]
    no_column = cli(url, "retry", "--search-query", "x%")
    assert no_column.returncode == 2 and "fetches has no search_query column" in no_column.stderr


def test_doctor_names_the_id_sequence_a_role_may_not_use(databases):
    url = adopted_database(databases)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP ROLE IF EXISTS sr_no_sequence")
        conn.exec_driver_sql("CREATE ROLE sr_no_sequence LOGIN")
        conn.exec_driver_sql("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO sr_no_sequence")
        conn.exec_driver_sql("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO sr_no_sequence")
        conn.exec_driver_sql("REVOKE USAGE ON SEQUENCE fetches_fetch_id_seq FROM sr_no_sequence")
    engine.dispose()
    as_role = sa.engine.make_url(url).set(username="sr_no_sequence", password=None)
    try:
        result = cli(as_role.render_as_string(hide_password=False), "doctor", SCRAPE_RUN_COMMAND="true")
        [line] = [line for line in result.stdout.splitlines() if line.startswith("✗ privileges")]
        assert "USAGE on sequence" in line and "fetches_fetch_id_seq" in line
        assert result.returncode == 1
    finally:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP OWNED BY sr_no_sequence")
            conn.exec_driver_sql("DROP ROLE sr_no_sequence")
        engine.dispose()
