"""SPEC §14 on every adopted table shape (integer, text and UUID ids, enum and CHECK statuses,
naive timestamps, mixed-case names): a mapped kind column judges each run by its kind's limit,
the progress records work with the table's own id type (kept, compared and removed), the
dry run lists what the sweep fails, the run's API detail says which limit judges it."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.migrate import migrate
from db.queries.thresholds import ThresholdStatements
from jobs import learning
from jobs.learning import LearnSettings
from jobs.limits import learning_rule, limit_document
from jobs.manual import chain_history
from jobs.runtime import Runtime
from jobs.settings import load_settings
from jobs.stuck import sweep_stuck_runs
from tests.adopted import ADOPTABLE, Adopted
from tests.integration.test_index_predicates import layout_of
from tests.learning_plans import checks_the_window, executed_scans

NOW = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)


class Clock:
    """A clock that stands where the test puts it."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at

    def real(self, duration: timedelta) -> timedelta:
        return duration


def with_kind_and_progress(databases, adopted: Adopted) -> tuple[str, sa.Engine]:
    """A database holding `adopted`'s table with a `SpiderKind` and an `Items` column, migrated with
    the kind mapped (revision 0010's index is built); its url and an engine on it."""
    url = databases.create()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(adopted.ddl)
        conn.exec_driver_sql(f'ALTER TABLE {adopted.quoted} ADD COLUMN "SpiderKind" TEXT, ADD COLUMN "Items" INT')
    layout = layout_of(adopted)
    columns = {**layout.columns, "kind": "SpiderKind"}
    migrate(engine, adopted.table, None, replace(layout, columns=columns), extend_check=adopted.check_guarded)
    return url, engine


@pytest.mark.parametrize("adopted", ADOPTABLE, ids=lambda a: a.name)
def test_a_kind_column_and_progress_judge_runs_on_every_table_shape(databases, adopted: Adopted):
    url, engine = with_kind_and_progress(databases, adopted)
    with engine.begin() as conn:
        quick = adopted.insert(
            conn,
            "ok-quick",
            status=adopted.running[0],
            started_at=NOW - timedelta(minutes=20),
            **{"SpiderKind": "quick", "Items": 3},
        )
        adopted.insert(
            conn,
            "ok-long",
            status=adopted.running[0],
            started_at=NOW - timedelta(minutes=20),
            **{"SpiderKind": "long", "Items": 3},
        )
        ended = adopted.insert(
            conn, "ok-ended", status=adopted.running[0], started_at=NOW - timedelta(minutes=1), **{"Items": 1}
        )
    engine.dispose()
    roles = "kind=SpiderKind,progress=Items"
    env = {**adopted.env, "DATABASE_URL": url, "STUCK_AFTER_BY_KIND": "quick=15m", "STALL_AFTER": "30m"}
    env["COLUMN_MAP"] = f"{adopted.column_map},{roles}" if adopted.column_map else roles
    progress = f"{adopted.schema}.stuck_runs_progress"  # beside the runs table
    clock = Clock(NOW)
    rt = Runtime.open(load_settings(env), clock=clock)
    try:
        [planned] = sweep_stuck_runs(rt, dry_run=True, keep=None).attempts
        [failed] = sweep_stuck_runs(rt, keep=None).attempts
        assert planned.run_id == failed.run_id == quick
        assert failed.reason == "limit 0.3h, configured for SpiderKind=quick"
        with rt.engine.begin() as conn:
            recorded = conn.execute(sa.text(f"SELECT count(*) FROM {progress}")).scalar()
            conn.execute(
                sa.text(f'UPDATE {adopted.quoted} SET "{adopted.status}" = :done WHERE "{adopted.id}" = :id'),
                {"done": adopted.completed, "id": ended},
            )
        assert recorded == 3  # every running run's progress, by its id as text
        clock.at = NOW + timedelta(minutes=31)  # "ok-long" stood still at 3 for 31 minutes
        [stalled] = sweep_stuck_runs(rt, keep=None).attempts
        assert stalled.message.startswith("Run stalled: no progress for 0.5h - retry 1/")
        with rt.engine.connect() as conn:
            left = conn.execute(sa.text(f"SELECT run_id FROM {progress}")).scalars().all()
        assert str(ended) not in left and str(quick) not in left  # ended runs' records are gone
        this = next(a for a in chain_history(rt, stalled.run_id).attempts if a.id == stalled.run_id)
        assert limit_document(rt, this)["reason"] == "limit 1.0h, the default (STUCK_AFTER)"
        learns_over_the_runtime_index(rt, adopted)
    finally:
        rt.close()


def learns_over_the_runtime_index(rt: Runtime, adopted: Adopted) -> None:
    """Revision 0010's index on this shape serves the first count: every completed run is inside
    the window, so each (kind, whole seconds) pair's runs are counted in the index, none checked
    against the window; and the runtimes learned are the hand-counted ones."""
    completed = rt.runs.table.c.completed_at.name
    with rt.engine.begin() as conn:
        for i in range(1, 6):  # ran 101..105 s, completed within the window
            ended = NOW - timedelta(hours=i)
            more = {"SpiderKind": "done", completed: adopted.stamp(ended)}
            adopted.insert(
                conn, f"done-{i}", status=adopted.completed, started_at=ended - timedelta(seconds=100 + i), **more
            )
    learn = LearnSettings.of(rt.settings)
    done = learning.learned(rt, learn, learning_rule(learn)).by_kind["done"]
    assert (done.runs, done.p50, done.longest) == (5, timedelta(seconds=103), timedelta(seconds=105))
    statement = ThresholdStatements(rt.runs).first_count().compile(dialect=rt.engine.dialect)
    fresh = {**statement.params, **learning.counting_plan(None, NOW, learn.window)}
    with rt.engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = 0")  # a small table: whether the index serves it
        scans = executed_scans(conn, str(statement), fresh, adopted.table.split(".")[-1])
        conn.rollback()
    index = f"ix_{adopted.table.split('.')[-1].lower()}_runtime_by_kind"
    assert not checks_the_window(scans, completed), scans
    assert any(scan.get("Index Name") == index and "Index Cond" in scan for scan in scans), scans


@pytest.mark.parametrize("adopted", ADOPTABLE, ids=lambda a: a.name)
def test_a_sweep_of_several_batches_fails_each_run_once_on_every_table_shape(databases, adopted: Adopted):
    # Batches after the first run the statement prepared on the session, resumed from where the
    # last one ended by a parameter of the table's own timestamp type (naive or not).
    url, engine = with_kind_and_progress(databases, adopted)
    with engine.begin() as conn:
        for i in range(8):  # two share a start: a batch may end between them
            started = NOW - timedelta(hours=3, minutes=min(i, 6))
            adopted.insert(conn, f"ok-{i}", status=adopted.running[0], started_at=started, SpiderKind="quick", Items=i)
    engine.dispose()
    roles = "kind=SpiderKind,progress=Items"
    env = {**adopted.env, "DATABASE_URL": url, "STUCK_AFTER_BY_KIND": "quick=15m", "BATCH_SIZE": "3"}
    env["COLUMN_MAP"] = f"{adopted.column_map},{roles}" if adopted.column_map else roles
    rt = Runtime.open(load_settings(env), clock=Clock(NOW))
    try:
        result = sweep_stuck_runs(rt, keep=None)
        assert (result.failed, result.retries_scheduled) == (8, 8)
        assert len({a.run_id for a in result.attempts}) == 8
        assert all(a.reason == "limit 0.3h, configured for SpiderKind=quick" for a in result.attempts)
        again = sweep_stuck_runs(rt, keep=None)
        # Three batches of the running runs (one more each where a queued state is mapped, empty).
        assert again.failed == 0 and result.batches - again.batches == 2
        with rt.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar_one() == 0
    finally:
        rt.close()
