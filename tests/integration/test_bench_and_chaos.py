"""Reduced runs of the benchmarks and the chaos suite, for CI: their correctness, not timings.
Minutes of computing: a CI step of their own, `pytest -m trials` (.ci/run), not the default run.

The figures themselves come from the full runs (`python -m bench`, `python -m chaos`) and are
written in BENCHMARKS.md and RELIABILITY.md; wall-clock numbers are not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import anatomy
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.trials]


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_quick_benchmarks_do_the_same_work_as_the_floor_and_never_scan_the_table(tmp_path):
    figures = tmp_path / "bench.json"
    result = run("-m", "bench", "--quick", "--out", "-", "--json", str(figures), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(figures.read_text())
    for sweep in report["sweeps"]:
        assert sweep["same_outcome"], sweep  # ours, the floor and row by row leave identical tables
        assert sweep["outcome"] == [sweep["stuck"], sweep["stuck"]]
    assert not any(idle["seq_scan_of_scrape_runs"] for idle in report["idle"])
    # Every variant of the anatomy handled all K runs (it refuses to report otherwise).
    assert [v["name"] for v in report["anatomy"]["variants"]][0] == "floor"
    names = [v["name"] for v in report["anatomy"]["variants"]]
    assert len(names) == 5 + len(anatomy.BATCH_SIZES) and "ours, BATCH_SIZE 1000" in names
    assert all(v["ms_per_batch"] for v in report["anatomy"]["variants"] if v["name"].startswith("ours"))
    # The whole command and the row-by-row script did the same work as the rest.
    assert all({"command", "row_by_row_script"} <= set(sweep["seconds"]) for sweep in report["sweeps"])
    assert report["startup"]["commands"]["--help"]["median_s"] > 0
    for claims in report["claims"]:
        assert claims["claimed"] == claims["unique"] == report["config"]["claim_retries"]


def test_a_few_chaos_trials_find_no_violation():
    result = run("-m", "chaos", "--trials", "3", "--quick", "--seed", "7", "--out", "-", timeout=900)
    trials = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [t["kind"] for t in trials] == ["command", "webhook", "handoff"]
    # Each trial's violations in full, so a failure in CI says what broke without a rerun.
    assert {t["seed"]: t["violations"] for t in trials} == {t["seed"]: [] for t in trials}
    assert all(t["stuck_failed"] > 0 and t["retries"] > 0 for t in trials)
    command, webhook, handoff = trials
    assert command["executions"] > 0 and command["handed_off"] == 0
    assert webhook["acknowledged"] > 0 and webhook["handed_off"] > 0
    assert handoff["worker_claims"] > 0 and handoff["handed_off"] > 0
    assert result.returncode == 0


def test_the_hand_over_bench_hands_every_retry_to_each_engine_on_a_small_pool(tmp_path):
    figures = tmp_path / "handover.json"
    result = run("-m", "bench.handover", "--plan", "4:10", "--whole", "--json", str(figures), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(figures.read_text())["results"]
    assert [r["engine"] for r in results] == ["scrapyd", "celery", "webhook"]
    for engine in results:
        assert engine["all_handed"] and engine["pass_errors"] == 0, engine
        assert engine["floor_refused"] == 0, engine  # the floor handed as many, so the ratio compares like with like
        assert 1 <= engine["peak_sessions"] <= 8, engine  # SPEC §12: a small pool whatever the cap
        # The engine itself (Scrapyd's queue, the broker's list, the receiver's log) received each
        # handed retry once and nothing else, from ours and from the whole command; the floor's all.
        assert engine["exactly_once"] and engine["whole_exactly_once"] and engine["whole_all_handed"], engine
        assert engine["floor_received"], engine
