"""`--json` is for scripts: a refusal is JSON on stdout too, beside its one line on stderr; and exit codes."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from tests.helpers import insert_run
from tests.integration.test_cli import cli, one_line_error


@pytest.mark.parametrize(
    ("args", "env", "code", "fragment"),
    [
        (["check", "--json"], {"STUCK_AFTER": "soon"}, 2, "STUCK_AFTER='soon' is not a duration"),
        (["status", "--json"], {}, 2, "DATABASE_URL is not set"),
        (["check", "--json", "--column-map", "nope"], {}, 2, "--column-map: 'nope' is not role=column"),
        (["retry", "--json", "--limit", "0"], {}, 2, "--limit"),
    ],
)
def test_a_json_refusal_is_json(args, env, code, fragment):
    result = cli(*args, env=env)
    assert result.returncode == code
    assert fragment in one_line_error(result)
    refusal = json.loads(result.stdout)
    assert refusal["success"] is False and refusal["exit_code"] == code and fragment in refusal["error"]


def test_a_json_refusal_from_the_database_is_json(db_url):
    result = cli("retry", "00000000-0000-0000-0000-000000000000", "--json", env={"DATABASE_URL": db_url})
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == one_line_error(result).removeprefix("stuck-runs: ")


def test_without_json_a_refusal_prints_nothing_on_stdout():
    result = cli("check", env={"STUCK_AFTER": "soon"})
    assert result.returncode == 2 and result.stdout == ""


def test_doctor_calls_a_bad_setting_a_configuration_error(db_url):
    bad = cli("doctor", env={"DATABASE_URL": db_url, "STUCK_AFTER": "soon"})
    assert bad.returncode == 2  # as every other command says a bad setting
    assert "✗ configuration: STUCK_AFTER='soon' is not a duration" in bad.stdout
    failing = cli("doctor", env={"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": "no-such-scraper"})
    assert failing.returncode == 1 and "✗ executor" in failing.stdout  # a failed check, not a bad setting


def test_an_explicit_status_is_a_bulk_filter(db_url):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        insert_run(conn, status="failed", started_at=datetime.now(timezone.utc), error_message="HTTP 503")
    engine.dispose()
    result = cli("retry", "--status", "failed", "--dry-run", env={"DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr  # it used to say "give a RUN_ID, or filters (… --status …)"
    assert result.stdout.startswith("Would retry 1 of 1 matching failed chain(s)")
