"""monitoring/ (SPEC §15): the alerting rules pass `promtool check rules` and their own `promtool
test rules` cases, each rule has what an on-call person needs (severity, summary, description, a
runbook in the README), and every metric the rules and the Grafana dashboard name is one the
daemon really serves after a sweep."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from jobs.control import pause_retries, resume_retries
from jobs.events import CHECKER, DAEMON, PROCESSOR, JobRun, JobRunsEnded
from jobs.fleet_health import fleet_health
from jobs.stuck import sweep_stuck_runs
from scheduler.metrics import Metrics
from tests.conftest import REPO
from tests.helpers import insert_stuck_runs, make_runtime
from tests.services import require_service

KIT = REPO / "monitoring"
RULES = KIT / "stuck-runs-alerts.yml"
RULE_TESTS = sorted((KIT / "tests").glob("*.yml"))
DASHBOARD = KIT / "grafana-dashboard.json"
METRIC = re.compile(r"\bstuck_runs_[a-z_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    require_service("promtool", tool is not None, "apt-get install prometheus, Debian's package that provides it")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=KIT)


def rules() -> dict[str, str]:
    """Each alert's name and its text in the rules file (from its `- alert:` to the next)."""
    parts = re.split(r"^      - alert: ", RULES.read_text(), flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, spaces as hyphens, punctuation dropped."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_promtool_checks_the_rules_and_runs_their_tests():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
    tested = promtool("test", "rules", *map(str, RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_rule_is_tested_firing_and_silent_and_has_its_runbook():
    found = rules()
    assert set(found) == {
        "StuckRunsFound",
        "StuckRunsPermanentFailures",
        "StuckRunsRetryFailureRate",
        "StuckRunsCheckerSilent",
        "StuckRunsNoDaemon",
        "StuckRunsPausedForADay",
    }
    readme = (REPO / "README.md").read_text()
    cases = "\n".join(path.read_text() for path in RULE_TESTS)
    for name, text in found.items():
        assert re.search(r"severity: (warning|critical)\n", text), name
        for annotation in ("summary", "description", "runbook_url"):
            assert re.search(rf"^          {annotation}: \S", text, flags=re.MULTILINE), (name, annotation)
        anchor = re.search(r'runbook_url: "README\.md#([\w-]+)"', text)[1]
        assert anchor in anchors(readme), f"{name}: README has no heading for #{anchor}"
        # Both ways in the promtool cases: an evaluation expecting it, one expecting silence.
        evaluations = re.findall(rf"alertname: {name}\n\s+exp_alerts:( \[\])?", cases)
        assert "" in evaluations and " []" in evaluations, f"{name}: needs a firing and a silent case"


@pytest.fixture
def served_names(db_url: str) -> set[str]:
    """The metric names a daemon's registry exposes after a sweep that failed stuck runs, a pause,
    and a heartbeat's reading of the fleet: what Prometheus would scrape from /metrics."""
    intervals = {CHECKER: timedelta(hours=1), PROCESSOR: timedelta(minutes=30)}
    metrics = Metrics("webhook", intervals)
    rt = make_runtime(db_url)
    try:
        rt.events.subscribe(metrics)
        engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            insert_stuck_runs(conn, 3, datetime.now(timezone.utc) - timedelta(hours=3))
        engine.dispose()
        started = datetime.now(timezone.utc)
        result = sweep_stuck_runs(rt)
        # What the daemon publishes when its checker's run ends (scheduler/daemon.py).
        checker = JobRun(CHECKER, "ok", result.counts())
        rt.events.publish(JobRunsEnded((checker,), started, datetime.now(timezone.utc), via=DAEMON))
        pause_retries(rt)
        with rt.engine.connect() as conn:
            health = fleet_health(rt, conn)
        metrics.counts(0, 0)
        metrics.health(health.live_daemons, health.paused_at)
        exposition = generate_latest(metrics.registry).decode()
        assert metrics.paused_since._value.get() == health.paused_at.timestamp() > 0
        resume_retries(rt)
        with rt.engine.connect() as conn:
            assert fleet_health(rt, conn).paused_at is None
    finally:
        rt.close()
    assert result.failed == 3
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        names.add(family.name + "_total" if family.type == "counter" else family.name)  # a counter with no child yet
    assert "stuck_runs_stuck_detected_total 3.0" in exposition
    return names


def test_every_metric_the_rules_and_the_dashboard_name_is_served(served_names):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {
        "rules": set(METRIC.findall(RULES.read_text())),
        "rule tests": set(METRIC.findall("\n".join(p.read_text() for p in RULE_TESTS))),
        "dashboard": set(METRIC.findall("\n".join(exprs))),
    }
    for where, names in named.items():
        assert names, where
        assert names <= served_names, f"{where} name metrics nobody serves: {sorted(names - served_names)}"


def test_the_dashboard_is_importable_as_it_is():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    [source] = [i for i in dashboard["__inputs"] if i["type"] == "datasource"]
    assert source["pluginId"] == "prometheus"
    reference = "${" + source["name"] + "}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 6
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"] and panel["gridPos"], panel
        assert panel["datasource"]["uid"] == reference
        assert all(target["expr"].strip() and target["datasource"]["uid"] == reference for target in panel["targets"])


def test_every_dashboard_query_is_promql_that_promtool_accepts(tmp_path):
    """promtool parses each panel's query as a recording rule's: a typo fails here, not in Grafana."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    records = "".join(
        f"      - record: dashboard_query_{i}\n        expr: {json.dumps(e)}\n" for i, e in enumerate(exprs)
    )
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(f"groups:\n  - name: dashboard\n    rules:\n{records}")
    checked = promtool("check", "rules", str(rules_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout


def test_the_readme_names_the_kits_files():
    readme = (REPO / "README.md").read_text()
    for path in (RULES, DASHBOARD, *RULE_TESTS):
        assert str(Path(path).relative_to(REPO)) in readme, path
