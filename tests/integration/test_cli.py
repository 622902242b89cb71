"""The command line as an operator meets it: one line for a mistake, the right exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from db.engine import make_engine
from tests.cli import run
from tests.conftest import REPO
from tests.helpers import insert_run, row, rows
from tests.schema import TEXT_STATUS


def cli(
    *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """`stuck-runs *args` (in this process: tests/cli.py) with this environment cleared of settings, `env` over it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "STUCK_", "RETRY_", "SCRAPE_"))}
    return run([*args], env={**base, **(env or {})}, cwd=cwd, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_run_id_of_the_wrong_kind_is_one_line_and_exit_2(db_url):
    """Whether an id is well formed depends on the table's id type, known once it is reflected."""
    for args in (["history", "not-a-uuid"], ["retry", "12345"]):
        result = cli(*args, env={"DATABASE_URL": db_url})
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert f"'{args[1]}' is not a run id: ids of scrape_runs are UUIDs" in line


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["check"], {"STUCK_AFTER": "soon"}, "STUCK_AFTER='soon' is not a duration"),
        (["check", "--stuck-after", "4 hours"], {}, "--stuck-after='4 hours' is not a duration"),
        (["fix", "--max-retries", "-2"], {}, "--max-retries='-2' is not accepted"),
        (["check", "--batch-size", "lots"], {}, "--batch-size='lots'"),
        (["check"], {}, "DATABASE_URL is not set"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, env, fragment):
    result = cli(*args, env=env)
    assert result.returncode == 2
    assert fragment in one_line_error(result)


def test_an_unreachable_database_is_one_line_without_the_password():
    url = "postgresql://scraper:Sup3r-s3cret@127.0.0.1:1/scrapes"
    result = cli("check", env={"DATABASE_URL": url})
    assert result.returncode == 1
    line = one_line_error(result)
    assert "database error while connecting" in line and "127.0.0.1" in line
    assert "Sup3r-s3cret" not in result.stderr + result.stdout


def test_a_database_that_was_never_migrated_says_to_migrate(databases):
    url = databases.create()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
    engine.dispose()
    result = cli("check", env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert "run `stuck-runs migrate`" in one_line_error(result)
    migrated = cli("migrate", env={"DATABASE_URL": url})
    assert migrated.returncode == 0 and "Migrated scrape_runs from revision none to 0010" in migrated.stdout
    again = cli("migrate", env={"DATABASE_URL": url})
    assert "already at revision 0010; nothing changed" in again.stdout


def test_migrate_sql_prints_ddl_without_a_database():
    result = cli("migrate", "--sql")
    assert result.returncode == 0 and "CREATE INDEX CONCURRENTLY" in result.stdout


def test_check_dry_run_then_check_then_history(db_url):
    engine = make_engine(db_url)
    started = datetime.now(timezone.utc) - timedelta(minutes=150)
    with engine.begin() as conn:
        run_id = insert_run(conn, started_at=started)
    env = {"DATABASE_URL": db_url}

    dry = cli("check", "--dry-run", env=env)
    assert dry.returncode == 0 and "would fail 1 stuck run(s)" in dry.stdout
    assert "Run stuck for 2.5h - retry 1/4 scheduled" in dry.stdout
    with engine.connect() as conn:
        assert row(conn, run_id)["status"] == "running"

    done = cli("check", "--json", env=env)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["failed"] == 1 and report["retries_scheduled"] == 1
    assert report["attempts"][0]["message"] == "Run stuck for 2.5h - retry 1/4 scheduled"

    history = cli("history", str(run_id), env=env)
    assert history.returncode == 0
    assert "[RETRY 1/4] Data Architect in Belgium" in history.stdout and "pending_retry" in history.stdout
    assert "Total attempts: 1 · final status: pending_retry" in history.stdout  # the retry has not run
    engine.dispose()


def test_retry_refusals_exit_1_and_success_prints_the_attempt(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        completed = insert_run(conn, status="completed")
        failed = insert_run(conn, status="failed", error_message="boom")
    env = {"DATABASE_URL": db_url}
    refused = cli("retry", str(completed), env=env)
    assert refused.returncode == 1 and "completed: there is nothing to retry" in one_line_error(refused)
    missing = cli("retry", "00000000-0000-0000-0000-000000000000", env=env)
    assert missing.returncode == 1 and "not found" in one_line_error(missing)
    ok = cli("retry", str(failed), env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("Run scheduled for retry (attempt 1/4)")
    engine.dispose()


def test_the_env_file_is_read_and_the_script_takes_the_fix_flags(db_url, tmp_path):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        run_id = insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=3))
    (tmp_path / ".env").write_text(f"DATABASE_URL={db_url}\nSTUCK_AFTER=5h\nSCRAPE_RUN_COMMAND=true\n")
    script = str(REPO / "scripts" / "fix_stuck_runs_with_retry.py")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    patient = subprocess.run(
        [sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert patient.returncode == 0, patient.stderr
    assert "failed 0 stuck run(s)" in patient.stdout  # 3h is not over the .env's 5h
    eager = subprocess.run(
        [sys.executable, script, "--stuck-after", "2h", "--max-retries", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert eager.returncode == 0, eager.stderr
    assert "Run stuck for 3.0h - retry 1/2 scheduled" in eager.stdout
    with engine.connect() as conn:
        assert [r["max_retries"] for r in rows(conn, "status = 'pending_retry'")] == [2]
        assert row(conn, run_id)["status"] == "failed"
    engine.dispose()


def test_the_password_reaches_no_output_even_at_debug(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        insert_run(conn, started_at=datetime.now(timezone.utc) - timedelta(hours=3))
    engine.dispose()
    with_password = make_url(db_url).set(password="Hunter2-s3cret").render_as_string(hide_password=False)
    result = cli("--log-level", "DEBUG", "fix", env={"DATABASE_URL": with_password, "SCRAPE_RUN_COMMAND": "true"})
    assert result.returncode == 0, result.stderr
    assert "Run stuck for 3.0h" in result.stdout + result.stderr
    assert "Hunter2-s3cret" not in result.stdout + result.stderr


def test_retry_now_executes_here_and_reports_the_outcome(db_url, tmp_path):
    import shlex

    engine = make_engine(db_url)
    with engine.begin() as conn:
        ok = insert_run(conn, status="failed", search_query="ok please", error_message="boom")
        bad = insert_run(conn, status="failed", search_query="fail503 again", error_message="boom")
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tests' / 'fake_scraper.py'))} {{run_id}}"
    env = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": command}
    done = cli("retry", str(ok), "--now", env=env)
    assert done.returncode == 0, done.stderr
    assert "Run scheduled for retry (attempt 1/4)" in done.stdout and "Executed: completed" in done.stdout
    failed = cli("retry", str(bad), "--now", env=env)
    assert failed.returncode == 1
    assert (
        "Executed: failed — requests.exceptions.HTTPError: 503 Server Error: Service Unavailable - retry 2/4"
        in failed.stdout
    )
    with engine.connect() as conn:
        assert [r["status"] for r in rows(conn, "original_run_id = :r", r=ok)] == ["completed"]
    engine.dispose()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["retry"], "give a RUN_ID, or filters"),
        (["retry", "00000000-0000-0000-0000-000000000001", "--error-like", "%x%"], "not both"),
        (["retry", "--error-like", "%x%", "--now"], "--now executes one retry"),
        (["retry", "--since", "yesterday"], "--since='yesterday' is not a duration"),
        (["retry", "--status", "lost"], "Invalid value for '--status'"),
    ],
)
def test_retry_usage_errors(args, fragment):
    result = cli(*args, env={"DATABASE_URL": "postgresql://u@h/db"})
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_bulk_retry_from_the_command_line(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        for i in range(3):
            insert_run(
                conn,
                status="failed",
                search_query=f"q{i}",
                error_message="HTTP 503",
                completed_at=datetime.now(timezone.utc) - timedelta(hours=i),
            )
    env = {"DATABASE_URL": db_url}
    dry = cli("retry", "--error-like", "%503%", "--since", "1d", "--spread", "1h", "--dry-run", env=env)
    assert dry.returncode == 0 and "Would retry 3 of 3 matching failed chain(s)" in dry.stdout
    done = cli("retry", "--error-like", "%503%", "--json", env=env)
    assert len(json.loads(done.stdout)["scheduled"]) == 3
    engine.dispose()


def test_no_help_text_and_no_readme_line_cites_the_spec_which_is_not_in_the_repository():
    """The SPEC is not shipped: an operator reading `--help` or the README gets a README section
    or plain words instead. `serve --help` says what it serves: the pages too."""
    from click.testing import CliRunner

    from scheduler.cli import COMMANDS
    from scheduler.cli import cli as group

    runner = CliRunner()
    texts = {"stuck-runs": runner.invoke(group, ["--help"]).output}
    for name in COMMANDS:
        texts[name] = runner.invoke(group, [name, "--help"]).output
    for sub in ("list", "show", "requeue", "purge"):
        texts[f"dlq {sub}"] = runner.invoke(group, ["dlq", sub, "--help"]).output
    cited = {name: text for name, text in texts.items() if "SPEC" in text}
    assert cited == {}
    readme = (REPO / "README.md").read_text()
    assert [line for line in readme.splitlines() if "SPEC §" in line or "SPEC's" in line] == []
    assert "pages" in texts["serve"] and "/api/openapi.json" in texts["serve"]
