"""SPEC §14 in the sweep, on a real PostgreSQL: each running run judged by its own limit (its
`max_runtime`, its kind's configured limit, its kind's learned limit, the default, in that
order), a heartbeat's staleness beside the caps, stalled progress, and the dry run listing
exactly what the sweep fails. Each rule has a case one second on each side of its threshold."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from loguru import logger

from db.layout import Layout, parse_column_map
from jobs.limits import LearnedLimit, Limits
from jobs.stuck import sweep_stuck_runs
from tests.helpers import insert_run, make_runtime, rows

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
S = timedelta(seconds=1)
ROLES = "kind=spider,max_runtime=budget,progress=items"
COLUMNS = "ADD COLUMN spider TEXT, ADD COLUMN budget INTERVAL, ADD COLUMN items BIGINT, ADD COLUMN hb TIMESTAMPTZ"
LEARNED_AT = datetime(2026, 11, 22, 8, 0, tzinfo=timezone.utc)
pytestmark = pytest.mark.usefixtures("frozen")


@pytest.fixture
def frozen():
    with freeze_time(NOW) as frozen:
        yield frozen


def roles_runtime(db_url: str, **settings):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE scrape_runs {COLUMNS}")
    engine.dispose()
    return make_runtime(db_url, layout=Layout(columns=parse_column_map(ROLES)), **settings)


def learned(minutes: float, runs: int = 412) -> LearnedLimit:
    return LearnedLimit(timedelta(minutes=minutes), runs, LEARNED_AT)


def run(conn, name: str, ran: timedelta, **columns) -> tuple[str, object]:
    return name, insert_run(conn, started_at=NOW - ran, search_query=name, **columns)


def name(attempt) -> str:
    return attempt.label.split("] ")[-1].split(" in ")[0]


def failed_and_planned(rt, limits: Limits) -> tuple[dict[str, str], set[str]]:
    """What the dry run lists (by name), then what the sweep fails: name -> message + reason."""
    planned = {name(a) for a in sweep_stuck_runs(rt, dry_run=True, keep=None, limits=limits).attempts}
    result = sweep_stuck_runs(rt, keep=None, limits=limits)
    failed = {name(a): f"{a.message} ({a.reason})" for a in result.attempts}
    return failed, planned


def test_each_step_of_the_precedence_on_each_side_of_its_threshold(db_url):
    rt = roles_runtime(db_url)
    limits = Limits(
        default=timedelta(hours=1),
        configured={"jobs_de": timedelta(minutes=15)},
        learned={"jobs_de": learned(60), "sitemap": learned(300)},
    )
    with rt.engine.begin() as conn:
        for ran, suffix in ((timedelta(minutes=30), "at"), (timedelta(minutes=30) + S, "past")):
            run(conn, f"own-{suffix}", ran, spider="sitemap", budget=timedelta(minutes=30))  # own beats learned 5h
        for ran, suffix in ((timedelta(minutes=15), "at"), (timedelta(minutes=15) + S, "past")):
            run(conn, f"configured-{suffix}", ran, spider="jobs_de")  # configured beats learned 1h
        for ran, suffix in ((timedelta(hours=5), "at"), (timedelta(hours=5) + S, "past")):
            run(conn, f"learned-{suffix}", ran, spider="sitemap")  # learned beats the default
        for ran, suffix in ((timedelta(hours=1), "at"), (timedelta(hours=1) + S, "past")):
            run(conn, f"default-{suffix}", ran, spider="unknown")
            run(conn, f"nokind-{suffix}", ran)
    failed, planned = failed_and_planned(rt, limits)
    assert failed == {
        "own-past": "Run stuck for 0.5h - retry 1/4 scheduled (limit 0.5h, the run's own max_runtime)",
        "configured-past": "Run stuck for 0.3h - retry 1/4 scheduled (limit 0.3h, configured for spider=jobs_de)",
        "learned-past": "Run stuck for 5.0h - retry 1/4 scheduled (limit 5.0h, learned for spider=sitemap from 412 runs)",
        "default-past": "Run stuck for 1.0h - retry 1/4 scheduled (limit 1.0h, the default (STUCK_AFTER))",
        "nokind-past": "Run stuck for 1.0h - retry 1/4 scheduled (limit 1.0h, the default (STUCK_AFTER))",
    }
    assert planned == set(failed)
    with rt.engine.connect() as conn:
        assert sorted(r["search_query"] for r in rows(conn, "status = 'running'")) == sorted(
            n.replace("past", "at") for n in failed
        )


def test_a_per_run_limit_beats_a_learned_one_both_ways(db_url):
    rt = roles_runtime(db_url)
    limits = Limits(default=timedelta(hours=1), learned={"sitemap": learned(300)})
    with rt.engine.begin() as conn:
        run(conn, "shorter", timedelta(minutes=11), spider="sitemap", budget=timedelta(minutes=10))
        run(conn, "longer", timedelta(hours=6), spider="sitemap", budget=timedelta(hours=8))  # past the learned 5h
        run(conn, "plain", timedelta(hours=2))
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    try:
        failed, planned = failed_and_planned(rt, limits)
    finally:
        logger.remove(sink)
    assert set(failed) == planned == {"shorter", "plain"}
    # The log line names a limit that is not the default (its JSON carries every one as `limit`).
    assert sorted(lines) == [
        "plain in Belgium: Run stuck for 2.0h - retry 1/4 scheduled",
        "shorter in Belgium: Run stuck for 0.2h - retry 1/4 scheduled (limit 0.2h, the run's own max_runtime)",
    ]


def test_learned_limits_count_only_with_learning_on_and_the_flat_threshold_ignores_every_limit(db_url):
    rt = roles_runtime(db_url)
    with rt.engine.begin() as conn:
        run(conn, "long-own", timedelta(minutes=50), spider="sitemap", budget=timedelta(hours=8))
        run(conn, "short-kind", timedelta(minutes=20), spider="jobs_de")
    flat = sweep_stuck_runs(rt, dry_run=True, keep=None, limits=Limits.flat(timedelta(minutes=40)))
    assert {name(a) for a in flat.attempts} == {"long-own"}
    assert flat.attempts[0].reason == "limit 0.7h, the default (STUCK_AFTER)"


def test_a_heartbeat_is_stale_after_stuck_after_and_caps_count_from_the_start(db_url):
    rt = roles_runtime(db_url, heartbeat_column="hb")
    limits = Limits(default=timedelta(hours=1), configured={"jobs_de": timedelta(hours=2)})
    fresh = NOW - timedelta(minutes=1)
    with rt.engine.begin() as conn:
        run(conn, "nocap-alive", timedelta(hours=10), hb=fresh)  # STUCK_AFTER is no cap
        run(conn, "cap-at", timedelta(hours=2), hb=fresh, spider="jobs_de")
        run(conn, "cap-past", timedelta(hours=2) + S, hb=fresh, spider="jobs_de")
        run(conn, "own-past", timedelta(minutes=30) + S, hb=fresh, budget=timedelta(minutes=30))
        run(conn, "stale-at", timedelta(hours=1, minutes=30), hb=NOW - timedelta(hours=1), spider="jobs_de")
        run(conn, "stale-past", timedelta(hours=1, minutes=30), hb=NOW - timedelta(hours=1) - S, spider="jobs_de")
        run(conn, "null-past", timedelta(hours=1) + S, spider="jobs_de")  # NULL heartbeat: started_at
    failed, planned = failed_and_planned(rt, limits)
    assert failed == {
        # A cap's hours from started_at, staleness's from the heartbeat.
        "cap-past": "Run stuck for 2.0h - retry 1/4 scheduled (limit 2.0h, configured for spider=jobs_de)",
        "own-past": "Run stuck for 0.5h - retry 1/4 scheduled (limit 0.5h, the run's own max_runtime)",
        "stale-past": "Run stuck for 1.0h - retry 1/4 scheduled (limit 2.0h, configured for spider=jobs_de)",
        "null-past": "Run stuck for 1.0h - retry 1/4 scheduled (limit 2.0h, configured for spider=jobs_de)",
    }
    assert planned == set(failed)


def test_progress_that_stands_still_moves_goes_null_or_ends(db_url, frozen):
    rt = roles_runtime(db_url, batch_size=2)
    limits = Limits(default=timedelta(hours=8), stall_after=timedelta(minutes=45))
    with rt.engine.begin() as conn:
        ids = dict(
            run(conn, name, timedelta(minutes=5), items=10)
            for name in ("still", "still-2", "still-at", "moves", "goes-null", "ends")
        )
        run(conn, "no-progress", timedelta(minutes=5))  # NULL from the start
    assert sweep_stuck_runs(rt, limits=limits).failed == 0  # the first sweep records what each run shows
    frozen.tick(timedelta(minutes=45))
    assert sweep_stuck_runs(rt, limits=limits).failed == 0  # exactly STALL_AFTER: not yet
    frozen.tick(timedelta(minutes=3))
    with rt.engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET items = 11 WHERE id = :id"), {"id": ids["moves"]})
        conn.execute(sa.text("UPDATE scrape_runs SET items = NULL WHERE id = :id"), {"id": ids["goes-null"]})
        conn.execute(sa.text("UPDATE scrape_runs SET status = 'completed' WHERE id = :id"), {"id": ids["ends"]})
        # "still-at" moved at the second sweep, so it stood still 3 minutes only.
        conn.execute(
            sa.text("UPDATE stuck_runs_progress SET changed_at = :at WHERE run_id = :id"),
            {"at": NOW + timedelta(minutes=45), "id": str(ids["still-at"])},
        )
    failed, planned = failed_and_planned(rt, limits)
    assert failed == {
        name: "Run stalled: no progress for 0.8h - retry 1/4 scheduled (no progress allowed for 0.8h (STALL_AFTER))"
        for name in ("still", "still-2")
    }
    assert planned == set(failed)
    with rt.engine.connect() as conn:
        recorded = dict(conn.execute(sa.text("SELECT run_id, progress FROM stuck_runs_progress")).all())
        letters = conn.execute(sa.text("SELECT count(*) FROM scrape_run_dead_letters")).scalar()
    # The ended run's record went at the last sweep (the two failed ones go at the next).
    assert str(ids["ends"]) not in recorded and recorded[str(ids["moves"])] == "11"
    assert recorded[str(ids["goes-null"])] is None and letters == 0
    assert sweep_stuck_runs(rt, limits=limits).failed == 0
    with rt.engine.connect() as conn:
        left = {r for (r,) in conn.execute(sa.text("SELECT run_id FROM stuck_runs_progress"))}
    assert str(ids["still"]) not in left and str(ids["moves"]) in left


def test_the_progress_upkeep_neither_writes_nor_locks_a_counter_that_stood_still(db_url, frozen):
    """In a mass event every running run is offered to the upkeep: one whose counter stood still is
    left alone, not even locked (an upsert that locks 100,000 unchanged records was most of the
    limits' cost in bench.limits). Here a record another transaction holds does not make it wait."""
    from jobs.limits import runtime_judging_params

    rt = roles_runtime(db_url)
    limits = Limits(default=timedelta(hours=8))
    with rt.engine.begin() as conn:
        ids = dict(run(conn, name, timedelta(minutes=5), items=10) for name in ("still", "moves"))
    assert sweep_stuck_runs(rt, limits=limits).failed == 0  # records both
    frozen.tick(timedelta(minutes=10))
    with rt.engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET items = 11 WHERE id = :id"), {"id": ids["moves"]})
    holder = rt.engine.connect()
    try:
        holder.execute(
            sa.text("SELECT 1 FROM stuck_runs_progress WHERE run_id = :id FOR UPDATE"), {"id": str(ids["still"])}
        )
        with rt.engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL lock_timeout = '3s'")  # waiting for the holder would fail here
            conn.execute(rt.queries.progress_upkeep, runtime_judging_params(rt, limits, rt.clock.now()))
    finally:
        holder.rollback()
        holder.close()
    with rt.engine.connect() as conn:
        recorded = {
            r: (p, at)
            for r, p, at in conn.execute(sa.text("SELECT run_id, progress, changed_at FROM stuck_runs_progress"))
        }
    assert recorded[str(ids["still"])] == ("10", NOW)
    assert recorded[str(ids["moves"])] == ("11", NOW + timedelta(minutes=10))


def test_a_stall_defaults_to_the_runs_own_limit_and_a_spent_budget_says_so(db_url, frozen):
    # Beside a heartbeat a run that beats but does nothing is found by its progress: no stall
    # limit set, its own limit (here the default) is how long the counter may stand still.
    rt = roles_runtime(db_url, heartbeat_column="hb")
    limits = Limits(default=timedelta(minutes=48))
    with rt.engine.begin() as conn:
        stalls = run(conn, "stalls", timedelta(minutes=1), items=3, retry_count=4, max_retries=4, is_retry=True)[1]
        run(conn, "long", timedelta(minutes=1), items=3, budget=timedelta(hours=8))  # its own limit: 8h
    sweep_stuck_runs(rt, limits=limits)
    frozen.tick(timedelta(minutes=48) + S)
    with rt.engine.begin() as conn:
        conn.execute(sa.text("UPDATE scrape_runs SET hb = :now"), {"now": NOW + timedelta(minutes=48)})
    failed, _ = failed_and_planned(rt, limits)
    assert failed == {
        "stalls": "Run stalled: no progress for 0.8h - permanently failed after 4 attempts"
        " (limit 0.8h, the default (STUCK_AFTER))"
    }
    with rt.engine.connect() as conn:
        letter = conn.execute(sa.text("SELECT run_id, last_error, detail FROM scrape_run_dead_letters")).one()
    assert letter.run_id == stalls and letter.detail == "limit 0.8h, the default (STUCK_AFTER)"
    assert letter.last_error == "Run stalled: no progress for 0.8h - permanently failed after 4 attempts"


def test_the_scripts_max_duration_hours_sets_only_the_default(db_url):
    from jobs.recovery import fix_stuck_runs_with_retry

    rt = roles_runtime(db_url, stuck_after_by_kind={"sitemap": timedelta(hours=8), "jobs_de": timedelta(minutes=15)})
    with rt.engine.begin() as conn:
        run(conn, "sitemap", timedelta(hours=3), spider="sitemap")  # its kind's 8h, not the script's 2h
        run(conn, "jobs_de", timedelta(minutes=20), spider="jobs_de")  # its kind's 15m, not 2h
        run(conn, "plain", timedelta(hours=3))
    fixed = fix_stuck_runs_with_retry(2, runtime=rt, dry_run=True)
    assert {name(a) for a in fixed.sweep.attempts} == {"jobs_de", "plain"}
