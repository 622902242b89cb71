"""`status`, `stats`, the metrics and the pages show retries handed to the fleet (SPEC §12) apart
from those stuck-runs executes itself: rows written with SQL in a migrated table, read through
the real CLI, a real `serve` and the metrics' registry."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from db.layout import Layout
from jobs.events import ProcessorPassFinished, RetryEnded
from jobs.retries import ProcessResult, RetryOutcome
from jobs.rules import RetryPolicy
from jobs.runtime import Runtime
from jobs.settings import Settings
from scheduler.daemon import Daemon
from scheduler.metrics import Metrics
from tests.helpers import insert_run
from tests.integration.test_cli import cli
from tests.web import READER, WebServer

NOW = datetime.now(timezone.utc)
QUEUED = {"STATUS_MAP": "queued=pending"}  # the scraper's workers pick up `pending` runs


def retry(conn, status: str, how: str | None, *, ended: bool = True) -> object:
    """A retry of a chain of its own, handed off `how` (None: executed here); an ended one
    completed an hour ago, one not ended started five minutes ago."""
    root = insert_run(
        conn,
        status="failed",
        failure_pattern="stuck",
        started_at=NOW - timedelta(hours=8),
        completed_at=NOW - timedelta(hours=6),
    )
    times = (
        {"started_at": NOW - timedelta(hours=2), "completed_at": NOW - timedelta(hours=1)}
        if ended
        else {"started_at": NOW - timedelta(minutes=5)}
    )
    return insert_run(conn, status=status, is_retry=True, retry_count=1, original_run_id=root, handed_off=how, **times)


@pytest.fixture
def fleet(engine):
    """Retries ended in the last day: here 1 of 2 succeeded, webhook 2 of 3, queue 0 of 1; and now
    one retry executing here, two running at the fleet (webhook, queue), one in the fleet's queue
    (`pending`), and a run that is not a retry running."""
    with engine.begin() as conn:
        for status, how in [
            ("completed", None),
            ("failed", None),
            ("completed", "webhook"),
            ("completed", "webhook"),
            ("failed", "webhook"),
            ("failed", "queue"),
        ]:
            retry(conn, status, how)
        for status, how in [("running", None), ("running", "webhook"), ("running", "queue"), ("pending", "queue")]:
            retry(conn, status, how, ended=False)
        insert_run(conn, status="running", started_at=NOW - timedelta(minutes=5))


def run_cli(db_url: str, *args: str, **env: str):
    result = cli(*args, env={"DATABASE_URL": db_url, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout


def table_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the table under `header` (its first column's name), split on runs of spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    found = []
    for line in lines[start + 1 :]:
        if not line or line.isupper():  # the next table's header
            break
        found.append(re.split(r" {2,}", line.strip()))
    return found


# -- status ---------------------------------------------------------------------------------------


def test_status_counts_hand_offs_apart_from_retries_executing_here(db_url, fleet):
    runs = json.loads(run_cli(db_url, "status", "--json", **QUEUED))["runs"]
    assert runs["running"] == 4  # every running run, wherever it runs
    assert runs["running_retries"] == 1  # executing here only
    assert (runs["handed_off_queued"], runs["handed_off_running"], runs["handed_off"]) == (1, 2, 3)
    human = run_cli(db_url, "status", **QUEUED)
    assert "Runs: 4 running (0 stuck)" in human
    assert "Handed to the fleet: 3 (1 queued, 2 running)" in human.splitlines()


def test_status_without_queued_mapped_counts_none_queued(db_url, fleet):
    """`pending` means nothing to stuck-runs until STATUS_MAP says it is the fleet's queue."""
    runs = json.loads(run_cli(db_url, "status", "--json"))["runs"]
    assert (runs["handed_off_queued"], runs["handed_off_running"], runs["running_retries"]) == (0, 2, 1)
    assert "Handed to the fleet: 2 (0 queued, 2 running)" in run_cli(db_url, "status").splitlines()


def test_status_names_the_fleet_only_when_retries_are_or_were_handed_off(db_url):
    assert "Handed to the fleet" not in run_cli(db_url, "status")
    handing = run_cli(db_url, "status", SCRAPE_RUN_HANDOFF="queued", **QUEUED)
    assert "Handed to the fleet: 0 (0 queued, 0 running)" in handing.splitlines()
    webhook = run_cli(db_url, "status", SCRAPE_RUN_WEBHOOK="http://127.0.0.1:9/runs/{run_id}")
    assert "Handed to the fleet: 0 (0 queued, 0 running)" in webhook.splitlines()


def test_status_on_an_enum_table_without_queued_reads(databases, templates):
    """An enum may lack the queued word: the count must never compare the column with it."""
    url = databases.create(templates["enum_naive"])
    runs = json.loads(run_cli(url, "status", "--json"))["runs"]
    assert (runs["handed_off_queued"], runs["handed_off_running"]) == (0, 0)


# -- stats ----------------------------------------------------------------------------------------

BY_HOW = [
    {"how": "here", "retries": 2, "succeeded": 1, "success_rate": 0.5},
    {"how": "webhook", "retries": 3, "succeeded": 2, "success_rate": 2 / 3},
    {"how": "queue", "retries": 1, "succeeded": 0, "success_rate": 0.0},
]


def test_stats_split_the_retries_that_ended_by_how_they_ran(db_url, fleet):
    stats = json.loads(run_cli(db_url, "stats", "--since", "1d", "--json", **QUEUED))
    assert (stats["retries"], stats["succeeded"], stats["chains"]) == (6, 3, 6)  # the totals keep their meaning
    assert stats["by_how"] == BY_HOW
    assert sum(h["retries"] for h in stats["by_how"]) == stats["retries"]
    assert stats["handed_off"] == 4
    assert (stats["pending"], stats["running"]) == (0, 1)  # running: executing here
    assert (stats["handed_off_queued"], stats["handed_off_running"]) == (1, 2)
    human = run_cli(db_url, "stats", "--since", "1d", **QUEUED)
    assert "  not counted above: 0 pending and 1 running now, 0 cancelled before they ran" in human
    assert "  handed to the fleet, not ended yet (nor counted above): 3 (1 queued, 2 running)" in human.splitlines()
    assert table_rows(human, "RAN ") == [
        ["here", "2", "1", "50.0%"],
        ["fleet (webhook)", "3", "2", "66.7%"],
        ["fleet (queue)", "1", "0", "0.0%"],
    ]


def test_stats_without_hand_offs_print_as_before(db_url, engine):
    with engine.begin() as conn:
        retry(conn, "completed", None)
    human = run_cli(db_url, "stats", "--since", "1d")
    assert "RAN " not in human and "fleet" not in human
    stats = json.loads(run_cli(db_url, "stats", "--since", "1d", "--json"))
    assert stats["by_how"][0] == {"how": "here", "retries": 1, "succeeded": 1, "success_rate": 1.0}
    assert [h["retries"] for h in stats["by_how"][1:]] == [0, 0] and stats["handed_off"] == 0
    handing = run_cli(db_url, "stats", "--since", "1d", SCRAPE_RUN_HANDOFF="queued", **QUEUED)
    assert table_rows(handing, "RAN ")[1:] == [["fleet (webhook)", "0", "0", "-"], ["fleet (queue)", "0", "0", "-"]]


# -- the HTTP API and the pages -------------------------------------------------------------------


def test_the_api_and_the_pages_show_the_hand_offs(db_url, fleet):
    server = WebServer(db_url, **QUEUED)
    try:
        with server.client(READER) as http:
            status = http.get("/api/status").json()
            stats = http.get("/api/stats", params={"since": "1d"}).json()
            overview = http.get("/")
            page = http.get("/stats", params={"since": "1d"})
    finally:
        server.stop()
    runs = status["data"]["runs"]
    assert (runs["running_retries"], runs["handed_off_queued"], runs["handed_off_running"]) == (1, 1, 2)
    assert stats["data"]["by_how"] == BY_HOW
    assert (stats["data"]["handed_off_queued"], stats["data"]["handed_off_running"]) == (1, 2)
    assert overview.status_code == 200, overview.text
    card = re.search(r'<div class="card" id="handed-off">(.*?)</div>', overview.text).group(1)
    assert '<p class="number">3</p>' in card and "1 queued · 2 running" in card
    assert "1 of them retries executing here · 2 retries at the fleet" in overview.text
    assert page.status_code == 200, page.text
    cells = re.findall(r"<td>(.*?)</td>", re.search(r'<table id="by-how">(.*?)</table>', page.text, re.S).group(1))
    assert cells == ["here", "2", "1", "50%", "fleet (webhook)", "3", "2", "67%", "fleet (queue)", "1", "0", "0%"]
    assert "1 queued · 2 running" in page.text


def test_the_pages_leave_the_fleet_out_where_nothing_is_handed_off(web):
    with web.client(READER) as http:
        overview, page = http.get("/"), http.get("/stats")
    assert overview.status_code == page.status_code == 200
    assert 'id="handed-off"' not in overview.text and 'id="handed-off"' not in page.text
    assert 'id="by-how"' not in page.text


# -- metrics --------------------------------------------------------------------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_metrics_count_hand_offs_and_postponements_never_as_executions():
    metrics = Metrics("webhook")
    assert sample(metrics, "stuck_runs_retries_handed_off_total", how="webhook") == 0  # a series from the start
    for status in ("handed_off", "handed_off", "postponed", "completed", "failed"):
        metrics(RetryEnded(RetryOutcome("r", "[RETRY 1/4] q in b", status)))
    assert sample(metrics, "stuck_runs_retries_handed_off_total", how="webhook") == 2
    assert sample(metrics, "stuck_runs_retries_postponed_total") == 1
    assert sample(metrics, "stuck_runs_retries_succeeded_total") == 1
    assert sample(metrics, "stuck_runs_retries_failed_total") == 1
    assert sample(metrics, "stuck_runs_retries_started_total") == 0  # only a 'started' event counts a start
    metrics(ProcessorPassFinished(ProcessResult(executed=(RetryOutcome("r", "q", "handed_off"),))))  # a pass adds none
    assert sample(metrics, "stuck_runs_retries_handed_off_total", how="webhook") == 2


def test_the_daemon_s_gauges_read_hand_offs_apart_from_retries_executing_here(db_url, fleet):
    settings = Settings(
        database_url=db_url, policy=RetryPolicy(), handoff="queued", layout=Layout(statuses={"queued": ("pending",)})
    )
    rt = Runtime.open(settings)
    try:
        metrics = Metrics(settings.hands_off)
        Daemon(rt, metrics=metrics)._count_for_metrics()
    finally:
        rt.close()
    assert sample(metrics, "stuck_runs_running_retries") == 1
    assert sample(metrics, "stuck_runs_handed_off_retries", state="queued") == 1
    assert sample(metrics, "stuck_runs_handed_off_retries", state="running") == 2
    assert sample(metrics, "stuck_runs_retries_handed_off_total", how="queue") == 0
