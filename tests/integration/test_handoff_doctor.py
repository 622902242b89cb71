"""doctor checks the executor of SPEC §12: the webhook's host resolves and it answers (a warning
when it does not), the hand-off's queued value is one the status column takes."""

from __future__ import annotations

import socket

import sqlalchemy as sa

from tests.integration.test_cli import cli
from tests.receiver import start_receiver


def doctor(url: str, **env: str):
    return cli("doctor", env={"DATABASE_URL": url, **env})


def line_of(result, name: str) -> str:
    [line] = [line for line in result.stdout.splitlines() if f" {name}:" in line[:20]]
    return line


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_webhook_that_answers_passes(db_url, tmp_path):
    receiver = start_receiver(tmp_path)
    try:
        result = doctor(db_url, SCRAPE_RUN_WEBHOOK=receiver.url + "/retry/{run_id}")
    finally:
        receiver.stop()
    assert result.returncode == 0, result.stdout
    assert line_of(result, "executor").startswith(f"✓ executor: webhook {receiver.url}/ answers (HTTP ")
    assert [r["method"] for r in receiver.requests()] == ["OPTIONS"]  # doctor never POSTs a retry


def test_a_webhook_nobody_answers_is_a_warning(db_url):
    result = doctor(db_url, SCRAPE_RUN_WEBHOOK=f"http://127.0.0.1:{closed_port()}/retry/{{run_id}}")
    assert result.returncode == 0, result.stdout
    assert line_of(result, "executor").startswith("! executor: webhook http://127.0.0.1:")
    assert "does not answer (ConnectError): deliveries wait until it does" in result.stdout


def test_a_webhook_host_that_does_not_resolve_fails(db_url):
    result = doctor(db_url, SCRAPE_RUN_WEBHOOK="https://no-such-host.invalid/retry/{run_id}?token=hunter2hunter2")
    assert result.returncode == 1, result.stdout
    assert line_of(result, "executor").startswith(
        "✗ executor: SCRAPE_RUN_WEBHOOK: host 'no-such-host.invalid' does not resolve"
    )
    assert "hunter2" not in result.stdout + result.stderr


def test_a_hand_off_value_the_status_column_takes_passes(db_url):
    result = doctor(db_url, SCRAPE_RUN_HANDOFF="queued", STATUS_MAP="queued=pending", SCRAPE_RUN_COMMAND="")
    assert result.returncode == 0, result.stdout
    assert "✓ executor: hand-off: due retries become 'pending'" in result.stdout
    assert "✓ hand-off: status takes 'pending' (queued)" in result.stdout


def test_a_hand_off_value_the_enum_lacks_or_a_check_forbids_is_refused_with_the_table(variant_url):
    engine = sa.create_engine(variant_url)
    with engine.begin() as conn:
        is_enum = conn.execute(
            sa.text(
                "SELECT t.typtype = 'e' FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
                " WHERE a.attrelid = 'scrape_runs'::regclass AND a.attname = 'status'"
            )
        ).scalar_one()
        if not is_enum:
            conn.exec_driver_sql(
                "ALTER TABLE scrape_runs ADD CONSTRAINT known_states CHECK "
                "(status IN ('running', 'completed', 'failed', 'pending_retry', 'cancelled'))"
            )
    engine.dispose()
    result = doctor(variant_url, SCRAPE_RUN_HANDOFF="queued", STATUS_MAP="queued=pending")
    assert result.returncode == 1, result.stdout
    # Refused with the table, as every command refuses it: the fix is migrate's.
    expected = (
        "✗ table: scrape_runs has CHECK constraint known_states on status that forbids 'pending': "
        "run `stuck-runs migrate --extend-check`"
        if not is_enum
        else "✗ table: table scrape_runs is not migrated (missing status value 'pending'): run `stuck-runs migrate`"
    )
    assert expected in result.stdout, result.stdout
    assert "✓ hand-off" not in result.stdout
