"""A property of SPEC §14: for any fleet (kinds, own limits, start times, heartbeats, progress
and what the last sweep recorded of it) and any limits, the sweep fails exactly the runs an
oracle says, the dry run lists exactly those and `status` counts as many stuck now.

The oracle is SPEC §14 read in plain Python, on purpose not jobs.limits nor the SQL. Times are
drawn from values one second on each side of the limits, where a `<` for a `<=` would show.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.layout import Layout, parse_column_map
from jobs.clock import ScaledClock
from jobs.limits import LearnedLimit, Limits, runtime_judging_params
from jobs.rules import RetryPolicy
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.stuck import sweep_stuck_runs

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
KINDS = (None, "a", "b", "c")
LIMITS = (300, 600, 1800, 3600)
AGES = (0, 299, 300, 301, 599, 600, 601, 1799, 1800, 1801, 3599, 3600, 3601, 7200)


@dataclass(frozen=True)
class Drawn:
    kind: str | None
    own: int | None  # max_runtime, seconds
    started: int  # seconds ago
    heartbeat: int | None  # seconds ago
    progress: int | None  # the counter now
    recorded: tuple[int | None, int] | None  # the last sweep's record: value, changed seconds ago


runs = st.builds(
    Drawn,
    kind=st.sampled_from(KINDS),
    own=st.none() | st.sampled_from(LIMITS),
    started=st.sampled_from(AGES),
    heartbeat=st.none() | st.sampled_from(AGES),
    progress=st.none() | st.sampled_from((1, 2)),
    recorded=st.none() | st.tuples(st.none() | st.sampled_from((1, 2)), st.sampled_from(AGES)),
)
per_kind = st.dictionaries(st.sampled_from(KINDS[1:]), st.sampled_from(LIMITS), max_size=3)
limits_drawn = st.tuples(st.sampled_from(LIMITS), per_kind, per_kind, st.none() | st.sampled_from(LIMITS))


def oracle(run: Drawn, default: int, configured: dict, learned: dict, stall_after: int | None, heartbeat: bool) -> bool:
    """SPEC §14, read as it is written."""
    if run.own is not None:
        limit = run.own
    elif run.kind in configured:
        limit = configured[run.kind]
    elif run.kind in learned:
        limit = learned[run.kind]
    else:
        limit = default
    if not heartbeat:
        stuck = run.started > limit
    else:
        sign = run.heartbeat if run.heartbeat is not None else run.started
        cap = run.own if run.own is not None else configured.get(run.kind, learned.get(run.kind))
        stuck = sign > default or (cap is not None and run.started > cap)
    stalled = (
        run.progress is not None
        and run.recorded is not None
        and run.recorded[0] == run.progress
        and run.recorded[1] > (stall_after if stall_after is not None else limit)
    )
    return stuck or stalled


@pytest.fixture
def fleet_runtimes(db_url):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE scrape_runs ADD COLUMN spider TEXT, ADD COLUMN limit_s INTEGER, ADD COLUMN items INTEGER,"
            " ADD COLUMN hb TIMESTAMPTZ"
        )
    engine.dispose()
    layout = Layout(columns=parse_column_map("kind=spider,max_runtime=limit_s,progress=items"))
    clock = ScaledClock(NOW, 1)  # never run: it stands at NOW
    runtimes = {
        hb: Runtime.open(
            Settings(database_url=db_url, policy=RetryPolicy(), layout=layout, heartbeat_column="hb" if hb else None),
            clock=clock,
        )
        for hb in (False, True)
    }
    yield runtimes
    for rt in runtimes.values():
        rt.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=st.lists(runs, max_size=8), drawn=limits_drawn, heartbeat=st.booleans())
def test_the_sweep_fails_exactly_what_the_spec_says(fleet_runtimes, fleet, drawn, heartbeat):
    rt = fleet_runtimes[heartbeat]
    default, configured, learned, stall_after = drawn
    limits = Limits(
        default=timedelta(seconds=default),
        configured={k: timedelta(seconds=v) for k, v in configured.items()},
        learned={k: LearnedLimit(timedelta(seconds=v), 50, NOW) for k, v in learned.items()},
        stall_after=timedelta(seconds=stall_after) if stall_after is not None else None,
    )
    ago = lambda seconds: None if seconds is None else NOW - timedelta(seconds=seconds)  # noqa: E731
    with rt.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE scrape_runs, stuck_runs_progress, scrape_run_dead_letters")
        for number, run in enumerate(fleet):
            run_id = conn.execute(
                sa.text(
                    "INSERT INTO scrape_runs (search_query, location_query, status, started_at, spider, limit_s, items, hb)"
                    " VALUES (:name, 'x', 'running', :started, :kind, :own, :items, :hb) RETURNING id"
                ),
                {
                    "name": f"r{number}",
                    "started": ago(run.started),
                    "kind": run.kind,
                    "own": run.own,
                    "items": run.progress,
                    "hb": ago(run.heartbeat),
                },
            ).scalar_one()
            if run.recorded is not None:
                value, changed = run.recorded
                conn.execute(
                    sa.text("INSERT INTO stuck_runs_progress VALUES (:t, :id, :value, :at)"),
                    {
                        "t": rt.runs.canonical_name,
                        "id": str(run_id),
                        "value": None if value is None else str(value),
                        "at": ago(changed),
                    },
                )
    expected = {
        f"r{n}" for n, run in enumerate(fleet) if oracle(run, default, configured, learned, stall_after, heartbeat)
    }
    with rt.engine.connect() as conn:
        counted = conn.execute(rt.queries.counts(), runtime_judging_params(rt, limits)).mappings().one()["stuck"]
    planned = sweep_stuck_runs(rt, dry_run=True, keep=None, limits=limits)
    failed = sweep_stuck_runs(rt, keep=None, limits=limits)
    named = lambda result: {a.label.split(" in ")[0] for a in result.attempts}  # noqa: E731
    assert named(failed) == expected
    assert named(planned) == expected and counted == len(expected)
