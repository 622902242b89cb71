"""Learned limits and their evidence (SPEC §14) over a real fleet's history in a real PostgreSQL:
thousands of completed runs of three spiders of very different lengths and one with too few runs
(tests/fleet_history.py), in one database for the module. Every count is checked against a count
by hand in Python from the same formulas; the clock is steered with freezegun."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from db.engine import make_engine
from db.layout import Layout
from db.migrate import migrate
from jobs import learning
from jobs.events import LimitsInForce
from jobs.learning import LearnSettings
from jobs.limits import current_limits, learned_limit, learning_rule
from jobs.runtime import Runtime
from jobs.settings import load_settings
from jobs.thresholds import parse_what_if, thresholds
from scheduler.metrics import Metrics
from tests.cli import REPO, run
from tests.conftest import Databases
from tests.fleet_history import FLEET, NOW, STUCK, insert_fleet, percentile
from tests.learning_plans import checks_the_window, executed_scans
from tests.web import READER, InProcessWeb

SPIDERS = {spider.kind: spider for spider in FLEET}
ENV = {"COLUMN_MAP": "kind=spider", "STUCK_AFTER": "8h", "SCRAPE_RUN_COMMAND": "true"}


@pytest.fixture(scope="module")
def fleet_url(server_url, templates):
    databases = Databases(server_url)
    url = databases.create(templates["text_tz"])
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN spider TEXT")
    migrate(engine, "scrape_runs", layout=Layout(columns={"kind": "spider"}))  # the learning index, now kind is mapped
    with engine.begin() as conn:
        insert_fleet(conn)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE scrape_runs")
    engine.dispose()
    yield url
    databases.drop_all()


@pytest.fixture
def fleet(fleet_url):
    """The fleet's database with no learned limits stored yet."""
    engine = make_engine(fleet_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM stuck_runs_thresholds")
    yield fleet_url
    engine.dispose()


def runtime(url: str, **env: str) -> Runtime:
    return Runtime.open(load_settings({"DATABASE_URL": url, **ENV, **env}))


def stored_rows(url: str) -> list[tuple]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            'SELECT kind, runs, "limit", computed_at FROM stuck_runs_thresholds ORDER BY kind'
        ).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def by_kind(result) -> dict:
    return {k.kind: k for k in result.kinds}


def test_each_kinds_runtimes_are_the_hand_counted_ones_and_reading_them_writes_nothing(fleet) -> None:
    with freeze_time(NOW):
        rt = runtime(fleet)
        try:
            result = by_kind(thresholds(rt))
        finally:
            rt.close()
    for kind, spider in SPIDERS.items():
        seen, runtimes = result[kind], spider.in_window()
        assert seen.runs == len(runtimes), kind
        for got, fraction in ((seen.p50, 0.5), (seen.p95, 0.95), (seen.p99, 0.99)):
            assert abs(got.total_seconds() - percentile(runtimes, fraction)) < 0.001, (kind, fraction)
        assert seen.longest == timedelta(seconds=max(runtimes))
        assert (seen.limit, seen.source) == (timedelta(hours=8), "default")
    assert result["jobs_de"].running == 3 and result["jobs_de"].oldest_running == timedelta(seconds=240)
    assert None not in result  # every run has a kind: no row for runs of none
    assert stored_rows(fleet) == []  # learning is off: nothing learned, nothing stored


def test_learned_at_most_hourly_by_whichever_process_needs_them_first(fleet) -> None:
    hand = {
        kind: learned_limit(timedelta(seconds=percentile(spider.in_window(), 0.99)), 2, timedelta(minutes=10))
        for kind, spider in SPIDERS.items()
        if len(spider.in_window()) >= 30
    }
    with freeze_time(NOW) as clock:
        rt = runtime(fleet, LEARN_THRESHOLDS="on")
        learn = LearnSettings.of(rt.settings)
        try:
            first = learning.learned(rt, learn, learning_rule(learn))
            limits = current_limits(rt)  # reads what was just stored
            clock.tick(timedelta(minutes=59))
            within_the_hour = learning.learned(rt, learn, learning_rule(learn))
            clock.tick(timedelta(minutes=1, seconds=1))
            after_an_hour = learning.learned(rt, learn, learning_rule(learn))
        finally:
            rt.close()
    assert first.computed and not within_the_hour.computed and after_an_hour.computed
    assert within_the_hour.computed_at == NOW and after_an_hour.computed_at == NOW + timedelta(hours=1, seconds=1)
    assert {kind: learned.limit for kind, learned in limits.learned.items()} == hand  # rare_spider: too few runs
    assert limits.learned["jobs_de"].runs == len(SPIDERS["jobs_de"].in_window())
    stored = {kind: (runs, limit) for kind, runs, limit, _ in stored_rows(fleet)}
    assert stored["rare_spider"] == (12, None) and stored["jobs_de"][1] == hand["jobs_de"]
    with freeze_time(NOW + timedelta(hours=1, seconds=2)):
        rt = runtime(fleet, LEARN_THRESHOLDS="on", LEARN_MARGIN="3")  # other settings: learned again at once
        try:
            learn = LearnSettings.of(rt.settings)
            assert learning.learned(rt, learn, learning_rule(learn)).computed
        finally:
            rt.close()


def test_a_kind_with_too_few_runs_falls_back_and_says_so(fleet) -> None:
    with freeze_time(NOW):
        shown = run(["thresholds"], env={"DATABASE_URL": fleet, **ENV, "LEARN_THRESHOLDS": "on", "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    assert "rare_spider: not learned: 12 completed run(s) in 30d, fewer than LEARN_MIN_RUNS=30" in shown.stdout
    rare = next(line for line in shown.stdout.splitlines() if line.startswith("rare_spider "))
    assert rare.split()[6:8] == ["8h", "default"], rare
    jobs = next(line for line in shown.stdout.splitlines() if line.startswith("jobs_de "))
    assert jobs.split()[7] == "learned", jobs


def test_what_if_counts_are_the_hand_counted_ones_and_it_changes_nothing(fleet) -> None:
    engine = make_engine(fleet)
    checksum = "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM scrape_runs t"
    with engine.connect() as conn:
        before = conn.exec_driver_sql(checksum).scalar()
    with freeze_time(NOW):
        rt = runtime(fleet)
        try:
            result = by_kind(thresholds(rt, parse_what_if("jobs_de=8m,sitemap_full=6h,learn-margin=1.5")))
        finally:
            rt.close()
    shop = SPIDERS["shop_fr"].in_window()
    shop_limit = learned_limit(timedelta(seconds=percentile(shop, 0.99)), 1.5, timedelta(minutes=10))
    jobs, sitemap = SPIDERS["jobs_de"].in_window(), SPIDERS["sitemap_full"].in_window()
    hand = {  # kind: (limit, source, completed runs that ran longer)
        "jobs_de": (timedelta(minutes=8), "configured", sum(r > 480 for r in jobs)),
        "sitemap_full": (timedelta(hours=6), "configured", sum(r > 6 * 3600 for r in sitemap)),
        "shop_fr": (shop_limit, "learned", sum(r > shop_limit.total_seconds() for r in shop)),
        "rare_spider": (timedelta(hours=8), "default", 0),
    }
    assert {kind: (k.limit, k.source, k.over_limit) for kind, k in result.items()} == hand
    assert hand["jobs_de"][2] > 0 and hand["sitemap_full"][2] > 0  # the counts are not vacuous
    # Today: 8h for all, which no completed run exceeded; the stuck runs ran 8h02m / 8h05m.
    assert {kind: (k.limit_now, k.over_limit_now) for kind, k in result.items()} == {
        kind: (timedelta(hours=8), 0) for kind in hand
    }
    ran = {kind: timedelta(seconds=seconds) for kind, (_, seconds) in STUCK.items()}
    caught = result["jobs_de"]
    assert (caught.caught, caught.caught_past_median) == (5, ran["jobs_de"] - timedelta(minutes=8))
    assert result["sitemap_full"].caught_past_most == ran["sitemap_full"] - timedelta(hours=6)
    with engine.connect() as conn:
        assert conn.exec_driver_sql(checksum).scalar() == before
    engine.dispose()
    assert stored_rows(fleet) == []  # not even the learned limits were stored


LEARNER = """
import json, sys
from jobs import learning
from jobs.learning import LearnSettings
from jobs.limits import learning_rule
from jobs.runtime import Runtime
from jobs.settings import load_settings
rt = Runtime.open(load_settings({"DATABASE_URL": sys.argv[1], "COLUMN_MAP": "kind=spider", "LEARN_THRESHOLDS": "on"}))
learn = LearnSettings.of(rt.settings)
print("waiting", flush=True)
got = learning.learned(rt, learn, learning_rule(learn))
limits = {k.kind: k.limit.total_seconds() for k in got.kinds if k.limit is not None}
print(json.dumps({"computed": got.computed, "at": got.computed_at.isoformat(), "limits": limits}), flush=True)
"""


def test_two_processes_needing_learned_limits_at_once_compute_them_once(fleet) -> None:
    engine = make_engine(fleet)
    with engine.connect() as holder:
        holder.begin()
        holder.execute(sa.text("SELECT pg_advisory_xact_lock(:ns, 0)"), {"ns": _learning_namespace(fleet)})
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", LEARNER, fleet],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        # Both found nothing stored and wait for the learning lock the test holds: then release them together.
        deadline = time.monotonic() + 30
        while _waiting_for_advisory_locks(engine) < 2:
            assert time.monotonic() < deadline, [p.communicate(timeout=5) for p in procs]
            assert all(p.poll() is None for p in procs)
            time.sleep(0.02)
        holder.rollback()
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        answers.append(json.loads(out.splitlines()[-1]))
    engine.dispose()
    assert sorted(a["computed"] for a in answers) == [False, True]  # one computed, the other read its rows
    assert answers[0]["at"] == answers[1]["at"] and answers[0]["limits"] == answers[1]["limits"]
    assert len({at for *_, at in stored_rows(fleet)}) == 1


def _learning_namespace(url: str) -> int:
    from db import locks
    from db.queries.thresholds import LEARNING

    return locks.namespace("scrape_runs", LEARNING)


def _waiting_for_advisory_locks(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        return conn.exec_driver_sql(waiting).scalar()


def test_the_command_the_api_and_the_stats_page_show_the_same_numbers(fleet_url) -> None:
    env = {"DATABASE_URL": fleet_url, **ENV}
    web = InProcessWeb(fleet_url, **ENV)  # built before the clock is frozen (pydantic subclasses `date`)
    try:
        with freeze_time(NOW):
            shown = run(["thresholds", "--json", "--what-if", "jobs_de=20m"], env=env)
            answer = web.client(READER).get("/api/thresholds", params={"what_if": "jobs_de=20m"})
            page = web.client(READER).get("/stats")
            refused = web.client(READER).get("/api/thresholds", params={"what_if": "jobs_de=soon"})
    finally:
        web.stop()
    assert shown.returncode == 0, shown.stderr
    assert answer.status_code == 200 and answer.json()["data"] == json.loads(shown.stdout)
    jobs = next(k for k in answer.json()["data"]["kinds"] if k["kind"] == "jobs_de")
    assert (jobs["limit"], jobs["source"], jobs["limit_now"]) == (1200.0, "configured", 8 * 3600.0)
    assert page.status_code == 200 and 'id="thresholds"' in page.text and "sitemap_full" in page.text
    assert refused.status_code == 400 and "--what-if: jobs_de='soon' is not a duration" in refused.json()["error"]


@pytest.mark.parametrize(
    ("proposal", "said"),
    [
        ("jobs_de", "--what-if: 'jobs_de' is not key=value"),
        ("jobs_de=soon", "--what-if: jobs_de='soon' is not a duration"),
        ("learn-margin=0.5", "--what-if: learn-margin='0.5' is not accepted: use a factor from 1 to 100"),
        ("learn-speed=2", "--what-if: learn-speed is not a learning setting"),
        ("jobs_de=1h,jobs_de=2h", "--what-if: jobs_de is given twice"),
        (",", "--what-if proposes nothing"),
    ],
)
def test_a_bad_what_if_is_refused_in_one_line_before_anything_is_read(proposal: str, said: str) -> None:
    refused = run(["thresholds", "--what-if", proposal], env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"})
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"stuck-runs: {said}"), refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr and not refused.stdout


def test_a_metric_per_kinds_limit_follows_the_limits_in_force() -> None:
    from jobs.limits import LearnedLimit, Limits

    metrics = Metrics()
    learned = {"jobs_de": LearnedLimit(timedelta(minutes=18), 3702, NOW)}
    metrics(LimitsInForce(Limits(timedelta(hours=8), {"sitemap_full": timedelta(hours=9)}, learned)))
    value = metrics.registry.get_sample_value
    assert value("stuck_runs_limit_seconds", {"kind": "jobs_de", "source": "learned"}) == 18 * 60
    assert value("stuck_runs_limit_seconds", {"kind": "sitemap_full", "source": "configured"}) == 9 * 3600
    assert value("stuck_runs_limit_seconds", {"kind": "", "source": "default"}) == 8 * 3600
    metrics(LimitsInForce(Limits(timedelta(hours=8), {"jobs_de": timedelta(minutes=30)}, learned)))
    assert value("stuck_runs_limit_seconds", {"kind": "jobs_de", "source": "configured"}) == 30 * 60
    assert value("stuck_runs_limit_seconds", {"kind": "jobs_de", "source": "learned"}) is None  # its old series went
    assert value("stuck_runs_limit_seconds", {"kind": "sitemap_full", "source": "configured"}) is None


def test_the_learning_index_serves_the_counting(fleet_url) -> None:
    """Moving the counts on reads two ranges of the learning index, never the table."""
    from db.queries.thresholds import ThresholdStatements
    from db.table import load_runs_table

    engine = make_engine(fleet_url)
    with engine.connect() as conn:
        runs = load_runs_table(conn, "scrape_runs", layout=Layout(columns={"kind": "spider"}))
        statement = ThresholdStatements(runs).runtimes().compile(dialect=engine.dialect)
        conn.exec_driver_sql("SET enable_seqscan = off")  # a small table: whether the index can serve it
        moved = learning.counting_plan(
            learning.Learned((), NOW, timedelta(days=30), "", (NOW - timedelta(days=30), NOW)),
            NOW + timedelta(hours=1),
            timedelta(days=30),
        )
        plan = conn.exec_driver_sql(f"EXPLAIN {statement}", {**statement.params, **moved}).scalars().all()
    engine.dispose()
    scans = [line for line in plan if "scrape_runs" in line and "Scan" in line]
    assert len(scans) == 2 and all("Index Only Scan using ix_scrape_runs_completed_by_kind" in s for s in scans), plan


def test_the_first_count_reads_the_runs_grouped_from_the_runtime_index(fleet_url) -> None:
    """Counting a window from scratch reads each run's kind and whole seconds from revision 0010's
    index, in the order it groups them: a GroupAggregate over an index-only scan, with no hashing of
    the pairs and no sort (ten million runs in bench.learning)."""
    from db.queries.thresholds import ThresholdStatements
    from db.table import load_runs_table

    engine = make_engine(fleet_url)
    with engine.connect() as conn:
        runs = load_runs_table(conn, "scrape_runs", layout=Layout(columns={"kind": "spider"}))
        statement = ThresholdStatements(runs).first_count().compile(dialect=engine.dialect)
        # A small table: whether the index can serve the grouping at all, not what it costs here.
        for setting in ("enable_seqscan", "enable_hashagg", "enable_sort", "max_parallel_workers_per_gather"):
            conn.exec_driver_sql(f"SET {setting} = 0")
        fresh = learning.counting_plan(None, NOW, timedelta(days=30))
        plan = conn.exec_driver_sql(f"EXPLAIN {statement}", {**statement.params, **fresh}).scalars().all()
        conn.rollback()
    engine.dispose()
    assert any("GroupAggregate" in line for line in plan), plan
    assert any("Index Only Scan using ix_scrape_runs_runtime_by_kind" in line for line in plan), plan
    assert not any("Sort" in line or "HashAggregate" in line for line in plan), plan


def statements_of_a_first_learning(url: str, **env: str) -> list[tuple[str, object]]:
    """What a first learning (nothing stored yet) sends to the server: each statement and its parameters."""
    sent: list[tuple[str, object]] = []
    with freeze_time(NOW):
        rt = runtime(url, LEARN_THRESHOLDS="on", **env)
        listen = lambda conn, cursor, statement, params, *_: sent.append((statement, params))  # noqa: E731
        sa.event.listen(rt.engine, "before_cursor_execute", listen)
        try:
            learn = LearnSettings.of(rt.settings)
            assert learning.learned(rt, learn, learning_rule(learn)).computed
        finally:
            rt.close()
    return sent


def test_the_first_count_is_a_read_the_server_may_split_over_parallel_workers(fleet) -> None:
    """The first count of a window reads all of it (ten million runs in bench.learning): the statement
    that reads the runs table writes nothing, so PostgreSQL may run it in parallel (it never runs a
    statement that writes so); the counts are stored by another statement."""
    read = statements_of_a_first_learning(fleet)
    counting = [
        (statement, params) for statement, params in read if "FROM scrape_runs" in statement and "count(" in statement
    ]
    assert len(counting) == 1, [statement for statement, _ in read]
    engine = make_engine(fleet)
    with engine.connect() as conn:  # a small table: parallel made free, to see whether it may be used at all
        for setting in (
            "parallel_setup_cost",
            "parallel_tuple_cost",
            "min_parallel_table_scan_size",
            "min_parallel_index_scan_size",
        ):
            conn.exec_driver_sql(f"SET {setting} = 0")
        plan = conn.exec_driver_sql(f"EXPLAIN {counting[0][0]}", counting[0][1]).scalars().all()
        conn.rollback()
    engine.dispose()
    assert any("Gather" in line for line in plan), plan


def test_counts_moved_on_an_hour_later_are_a_count_from_scratch(fleet) -> None:
    """An hour later, with runs completed meanwhile and runs gone out of the window, the counts moved on
    give what counting the new window from scratch gives, and what a count by hand gives."""
    later = NOW + timedelta(hours=1, minutes=1)
    engine = make_engine(fleet)
    with engine.begin() as conn:  # 40 jobs_de runs of 1000 s completed in the hour
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, spider, started_at, completed_at)"
                " SELECT 'late ' || g, 'web', 'completed', 'jobs_de', :t - g * interval '1 minute' - interval '1000s',"
                " :t - g * interval '1 minute' FROM generate_series(1, 40) g"
            ),
            {"t": later},
        )
    try:
        with freeze_time(NOW) as clock:
            rt = runtime(fleet, LEARN_THRESHOLDS="on")
            learn = LearnSettings.of(rt.settings)
            try:
                assert learning.learned(rt, learn, learning_rule(learn)).computed
                clock.move_to(later)
                moved = learning.learned(rt, learn, learning_rule(learn))
                with rt.engine.connect() as conn:
                    q = learning.ThresholdStatements(rt.runs)
                    afresh = learning.compute(conn, q, later, learn, learning_rule(learn))  # from scratch
            finally:
                rt.close()
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM scrape_runs WHERE search_query LIKE 'late %'"))
        engine.dispose()
    assert moved.computed and moved.counted == (later - timedelta(days=30), later)
    assert moved.kinds == afresh.kinds
    spider, shift = SPIDERS["jobs_de"], (later - NOW).total_seconds()
    hand = [spider.runtime(g) for g in range(1, spider.runs + 1) if spider.completed_ago(g) + shift <= 30 * 86400]
    hand += [1000] * 40
    jobs = {k.kind: k for k in moved.kinds}["jobs_de"]
    assert jobs.runs == len(hand)
    assert abs(jobs.p99.total_seconds() - percentile(hand, 0.99)) < 0.001


def test_doctor_shows_the_limits_and_warns_about_what_would_make_them_wrong(db_url) -> None:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD spider TEXT, ADD budget INTEGER, ADD items TEXT")
        conn.exec_driver_sql(  # a budget below zero, one of twelve years; a progress that is no number
            "INSERT INTO scrape_runs (search_query, location_query, status, spider, budget, items, started_at) VALUES"
            " ('a', 'b', 'running', 'jobs_de', -60, 'lots', now()),"
            " ('c', 'd', 'running', 'jobs_de', 400000000, '12', now())"
        )
    engine.dispose()
    env = {
        "DATABASE_URL": db_url,
        "SCRAPE_RUN_COMMAND": "true",
        "COLUMN_MAP": "kind=spider,max_runtime=budget,progress=items",
        "STUCK_AFTER_BY_KIND": "jobs_de=20m,job_de=1h",
    }
    checked = run(["doctor"], env=env)
    assert checked.returncode == 0, checked.stdout  # warnings, not failures
    lines = {line.split(":")[0]: line for line in checked.stdout.splitlines()}
    resolved = "✓ limits: default 1h (STUCK_AFTER); job_de 1h (configured); jobs_de 20m (configured)"
    assert lines["✓ limits"].startswith(resolved)
    assert "'job_de', which no run completed in 30d nor any running run has in spider" in lines["! limits by kind"]
    assert "of 2 rows sampled with a budget, 1 are negative and 1 longer than ten years" in lines["! max_runtime"]
    assert "items (TEXT) is not a number column; of 2 values sampled, 1 are not numbers" in lines["! progress"]
    learning = run(["doctor"], env={**env, "LEARN_THRESHOLDS": "on", "COLUMN_MAP": "kind=spider"})
    assert "nothing learned yet: the first process that needs the limits learns them" in learning.stdout
    assert "! max_runtime" not in learning.stdout and "! progress" not in learning.stdout


# README's worked example ("Each run by its own clock"): the commands, and the settings over ENV.
README_COMMANDS = (
    (["thresholds"], {}),
    (["thresholds", "--what-if", "learn=on"], {}),
    (["thresholds", "--what-if", "learn=on,learn-margin=1.5"], {}),
    (["thresholds"], {"LEARN_THRESHOLDS": "on", "LEARN_MARGIN": "1.5"}),
)


def readme_env(url: str, **env: str) -> dict[str, str]:
    return {"DATABASE_URL": url, **ENV, "COLUMNS": "200", **env}


def test_the_readme_shows_the_worked_examples_real_output(fleet) -> None:
    readme = (REPO / "README.md").read_text()
    with freeze_time(NOW):
        for args, env in README_COMMANDS:
            shown = run(args, env=readme_env(fleet, **env))
            assert shown.returncode == 0, shown.stderr
            block = "\n".join(shown.stdout.splitlines())
            assert block in readme, f"README lacks the output of stuck-runs {' '.join(args)} ({env}):\n{block}"


# -- the first count when every completed run is inside the window (ten million in bench.learning) ---


def first_count_run(conn: sa.Connection, runs, window: timedelta, **more: object) -> tuple[list[tuple], list[dict]]:
    """The first count of the window ending NOW (parameters `more` over its own): its rows, and the
    scans of the runs table it ran."""
    from db.queries.thresholds import ThresholdStatements

    statement = ThresholdStatements(runs).first_count().compile(dialect=conn.dialect)
    params = {**statement.params, **learning.counting_plan(None, NOW, window), **more}
    rows = conn.exec_driver_sql(str(statement), params).all()
    rows = sorted((tuple(r) for r in rows), key=lambda r: (r[0] is None, r[0] or "", r[1]))
    return rows, executed_scans(conn, str(statement), params, "scrape_runs")


@pytest.mark.parametrize("days", [60, 30])
def test_the_first_count_checks_runs_against_the_window_only_when_some_completed_run_lies_outside_it(
    fleet_url, days: int
) -> None:
    """Over 60 days every completed run of the fleet is inside the window: the first count reads each
    (kind, whole seconds) pair's runs from revision 0010's index and counts them there, no run's
    completion checked against the window (ten million of them in bench.learning). Over 30 days
    older runs exist: each run is checked. Either way the counts are the hand-counted ones."""
    from db.table import load_runs_table

    window = timedelta(days=days)
    engine = make_engine(fleet_url)
    with engine.connect() as conn:
        runs = load_runs_table(conn, "scrape_runs", layout=Layout(columns={"kind": "spider"}))
        rows, scans = first_count_run(conn, runs, window)
        conn.rollback()
    engine.dispose()
    inside = all(spider.completed_ago(spider.runs) <= window.total_seconds() for spider in FLEET)
    assert inside == (days == 60)
    assert checks_the_window(scans) == (not inside), scans
    if inside:
        assert all(
            scan.get("Index Name") in {"ix_scrape_runs_runtime_by_kind", "ix_scrape_runs_completed_by_kind"}
            for scan in scans
        ), scans
    counted: dict[str, list[int]] = {}
    for kind, seconds, number in rows:
        counted.setdefault(kind, []).extend([seconds] * number)
    assert counted == {kind: sorted(spider.in_window(window)) for kind, spider in SPIDERS.items()}


def test_the_first_count_of_a_window_holding_every_run_counts_runs_of_no_kind_and_not_what_lies_beyond(
    fleet,
) -> None:
    """Every completed run inside 60 days, with runs of no kind and a run that never started among
    them: counted as checking each against the window counts them. A run completed after the
    window's end (a clock ahead) or one before its start makes the count check every run again."""
    from db.table import load_runs_table

    window = timedelta(days=60)
    insert = sa.text(
        "INSERT INTO scrape_runs (search_query, location_query, status, spider, started_at, completed_at)"
        " VALUES ('edge', 'web', 'completed', :kind, :started, :completed)"
    )
    beyond_run = sa.text(
        "INSERT INTO scrape_runs (search_query, location_query, status, spider, started_at, completed_at)"
        " VALUES ('beyond', 'web', 'completed', 'jobs_de', :completed - interval '5 seconds', :completed)"
    )
    ended = NOW - timedelta(days=1)
    engine = make_engine(fleet)
    try:
        with engine.begin() as conn:
            for kind, ran in ((None, 100), (None, 100), (None, 250), ("jobs_de", None)):
                started = None if ran is None else ended - timedelta(seconds=ran)
                conn.execute(insert, {"kind": kind, "started": started, "completed": ended})
        hand = {kind: sorted(spider.in_window(window)) for kind, spider in SPIDERS.items()} | {None: [100, 100, 250]}
        for beyond in (None, NOW + timedelta(hours=1), NOW - window - timedelta(seconds=1)):
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM scrape_runs WHERE search_query = 'beyond'"))
                if beyond is not None:  # a jobs_de run of 5 s completed there
                    conn.execute(beyond_run, {"completed": beyond})
            with engine.connect() as conn:
                runs = load_runs_table(conn, "scrape_runs", layout=Layout(columns={"kind": "spider"}))
                rows, scans = first_count_run(conn, runs, window)
                conn.rollback()
            counted: dict[str | None, list[int]] = {}
            for kind, seconds, number in rows:
                counted.setdefault(kind, []).extend([seconds] * number)
            assert counted == hand, beyond
            assert checks_the_window(scans) == (beyond is not None), (beyond, scans)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM scrape_runs WHERE search_query IN ('edge', 'beyond')"))
        engine.dispose()


@pytest.mark.parametrize("window", ["60d", "30d"])
def test_the_first_count_of_a_window_holding_every_run_is_not_compiled_by_jit(fleet, window: str) -> None:
    """Counted pair by pair in the index, the first count evaluates almost no expression per run, so
    a server's JIT would only add its compilation (about 0.2 s of 51 functions on PostgreSQL 15 at
    ten million runs, BENCHMARKS.md): it is turned off for that count's transaction. A count that
    checks each run against the window keeps it (there it gains more than it costs)."""
    sent = [statement for statement, _ in statements_of_a_first_learning(fleet, LEARN_WINDOW=window)]
    counting = next(i for i, statement in enumerate(sent) if "WITH RECURSIVE pairs" in statement)
    assert ("SET LOCAL jit = off" in sent[:counting]) == (window == "60d"), sent


def test_the_first_count_of_a_window_with_more_pairs_than_it_walks_checks_each_run(fleet_url) -> None:
    """Each (kind, whole seconds) pair costs a walk and a count (a few microseconds): a fleet whose
    runs spread over many more pairs than their number warrants (one run in each) would pay that for
    every run. Past `sr_pairs_at_most` pairs the count is made by checking each run against the
    window, as before; the counts are the same."""
    from db.table import load_runs_table

    window = timedelta(days=60)
    engine = make_engine(fleet_url)
    with engine.connect() as conn:
        runs = load_runs_table(conn, "scrape_runs", layout=Layout(columns={"kind": "spider"}))
        walked, walked_scans = first_count_run(conn, runs, window)
        fallen, fallen_scans = first_count_run(conn, runs, window, sr_pairs_at_most=10)
        conn.rollback()
    engine.dispose()
    assert not checks_the_window(walked_scans) and checks_the_window(fallen_scans), fallen_scans
    assert walked == fallen
