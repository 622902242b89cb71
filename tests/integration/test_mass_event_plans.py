"""Plans on a mass event's table: a tenth of a big table running and stuck, its ended runs holding
error messages and completion times, kinds with limits of their own and progress kept.

Opening a runtime (every command's start: reflection and the table's checks) never reads the
whole runs table (the planner guessed a Seq Scan would soon find a running run holding an error
message, and read every row to find none). The sweep's batch reaches its locked runs by TID and
looks each one's kind up once."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from db.arrays import ArrayLiteral
from db.layout import Layout, parse_column_map
from jobs.limits import runtime_judging_params
from jobs.stuck import sweep_params
from tests.conftest import Databases
from tests.helpers import make_runtime
from tests.integration.test_limits_plan import LIMITS, NOW, plan_of


@pytest.fixture(scope="module")
def mass_event_url(server_url, templates):
    """60,000 runs, one in ten running (a mass event), the others ended with their messages."""
    databases = Databases(server_url)
    url = databases.create(templates["text_tz"])
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN spider TEXT, ADD COLUMN items BIGINT")
        conn.execute(
            sa.text(
                "INSERT INTO scrape_runs (search_query, location_query, status, started_at, completed_at,"
                " error_message, spider, items) SELECT 'q' || g, 'x',"
                " CASE WHEN g % 10 = 0 THEN 'running' ELSE 'failed' END, :now - g * interval '1 second',"
                " CASE WHEN g % 10 <> 0 THEN :now END, CASE WHEN g % 10 <> 0 THEN 'HTTP 503' END,"
                " (ARRAY['jobs_de', 'jobs_fr', 'sitemap_full', 'other'])[1 + g % 4], g FROM generate_series(1, 60000) g"
            ),
            {"now": NOW},
        )
        conn.exec_driver_sql("ANALYZE scrape_runs")
    engine.dispose()
    yield url
    databases.drop_all()


def test_opening_a_runtime_in_a_mass_event_never_scans_the_runs_table(mass_event_url):
    engine = sa.create_engine(mass_event_url)
    seen: list[tuple[str, object]] = []

    def remember(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if "scrape_runs" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    sa.event.listen(sa.Engine, "before_cursor_execute", remember)
    try:
        make_runtime(mass_event_url).close()
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", remember)
    assert seen, "no statement read the runs table"
    with engine.connect() as conn:
        for statement, parameters in seen:
            plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN (COSTS OFF) {statement}", parameters).scalars())
            assert "Seq Scan on scrape_runs" not in plan, f"{statement}\n{plan}"
    engine.dispose()


def test_opening_a_runtime_walks_the_running_runs_once(mass_event_url):
    # Whether running runs hold an error message or a completion time is one walk of them, not
    # one per column: each walk reads every running run (a tenth of the table here) to find none.
    walks: list[str] = []

    def remember(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if "FROM scrape_runs" in statement:
            walks.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", remember)
    try:
        make_runtime(mass_event_url).close()
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", remember)
    assert len(walks) == 1, walks


def batch_plan(url: str) -> str:
    """EXPLAIN VERBOSE of one sweep batch with kinds and progress on (what each node computes)."""
    rt = make_runtime(url, layout=Layout(columns=parse_column_map("kind=spider,progress=items")))
    try:
        return plan_of(rt, rt.queries.sweep_batch, limits=LIMITS, options="VERBOSE, COSTS OFF")
    finally:
        rt.close()


def test_a_mass_event_batch_reaches_its_locked_runs_by_tid_and_looks_each_kind_up_once(mass_event_url):
    plan = batch_plan(mass_event_url)
    assert "Seq Scan on public.scrape_runs" not in plan, plan
    # The kind is looked up where the batch locks its runs (to judge them, and the position they
    # carry), never again where they are failed: looked up at each use there (the message's
    # hours, the limit, its source and reason), it was called about ten times per failed run.
    locking, failing = plan.split("CTE failed", 1)
    assert "array_position(" in locking, plan
    assert "array_position(" not in failing, plan
    # The runs it fails are read by TID, never by walking (or hashing) every running run again.
    assert "Tid Scan on public.scrape_runs" in failing, plan
    assert "ix_scrape_runs_running_started_at" not in failing, plan


def test_a_mass_event_batch_keeps_its_first_rows_without_sorting_or_storing_the_batch(mass_event_url):
    # The counts are one aggregate over the failed runs and the kept rows a LIMIT over their
    # order (a top-N sort of the rows kept): window functions (a row number and the counts over
    # the batch) sorted and stored all of a batch's wide rows, to keep one after the first batches.
    plan = batch_plan(mass_event_url)
    returned = plan.rsplit("CTE dead", 1)[1]
    assert "WindowAgg" not in plan, plan
    assert "Limit" in returned and "Aggregate" in returned, plan


def test_a_mass_event_batch_counts_its_retries_and_dead_letters_without_a_lookup_per_run(mass_event_url):
    # The retries and dead letters are counted as the rows their INSERTs returned (only those
    # inserted), and whether a run got either is looked up for the kept rows only, after the
    # top-N sort: looked up for each of the batch's runs before it (two hashed subplans a row,
    # to keep none once a sweep has its rows), it was ~4 ms of a ~30 ms batch (EXPLAIN ANALYZE).
    plan = batch_plan(mass_event_url)
    returned = plan.rsplit("CTE dead", 1)[1]
    sorted_rows = returned.split("->  Sort", 1)[1].split("Sort Key", 1)[0]  # what each run carries into the sort
    assert "Output:" in sorted_rows and "SubPlan" not in sorted_rows, plan
    assert "FILTER (WHERE" not in returned, plan


def test_a_mass_event_batch_prepared_keeps_the_same_plan_when_generic(mass_event_url):
    # The sweep prepares its batch once and PostgreSQL keeps a generic plan after five runs: that
    # plan, with the resume point and the rows kept as parameters, is still the index walk of the
    # running runs and the TID scan of the ones locked (the status and every other value of the
    # sweep are bound into the PREPARE as literals, so the partial index's predicate matches).
    rt = make_runtime(mass_event_url, layout=Layout(columns=parse_column_map("kind=spider,progress=items")))
    params = {
        **sweep_params(rt.settings.policy),
        **runtime_judging_params(rt, LIMITS, NOW),
        "sr_cutoff": NOW - LIMITS.default,
        "sr_limit": 1000,
    }
    prepare = rt.queries.sweep_batch_prepared
    try:
        with rt.engine.connect() as conn:
            conn.execute(prepare, {**params, "p1": NOW - LIMITS.default, "p2": 200})  # with a first batch
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            explain = f"EXPLAIN (VERBOSE, COSTS OFF) EXECUTE {prepare.name} ('0001-01-02 00:00:00+00', 200)"
            plan = "\n".join(conn.exec_driver_sql(explain).scalars())
            conn.exec_driver_sql("DEALLOCATE ALL")
            conn.exec_driver_sql("RESET plan_cache_mode")
            conn.rollback()
    finally:
        rt.close()
    assert "$1" in plan and "Seq Scan on public.scrape_runs" not in plan, plan
    locking, failing = plan.split("CTE failed", 1)
    assert "ix_scrape_runs_running_started_at" in locking, plan
    assert "Tid Scan on public.scrape_runs" in failing, plan
    assert "ix_scrape_runs_running_started_at" not in failing, plan


def test_the_progress_upkeep_reads_each_record_once(mass_event_url):
    # Every running run recorded already and no counter moved (the sweep before the event saw
    # them): the upkeep writes nothing, and reads the records once, joined in full to the running
    # runs. It read them twice (to delete the ended runs' records, then to write the moved ones).
    rt = make_runtime(mass_event_url, layout=Layout(columns=parse_column_map("kind=spider,progress=items")))
    upkeep = rt.queries.progress_upkeep
    params = {**runtime_judging_params(rt, LIMITS, NOW), "sr_cutoff": NOW - LIMITS.default}
    compiled = upkeep.compile(dialect=rt.engine.dialect)
    bound = {**compiled.params, **params}
    bound = {k: ArrayLiteral().process_bind_param(v, None) if isinstance(v, list) else v for k, v in bound.items()}
    try:
        with rt.engine.connect() as conn:
            conn.execute(upkeep, params)  # records every running run
            running = conn.exec_driver_sql("SELECT count(*) FROM scrape_runs WHERE status = 'running'").scalar()
            explain = f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}"
            plan = conn.exec_driver_sql(explain, bound).scalar_one()[0]["Plan"]
            conn.rollback()
    finally:
        rt.close()

    def records_read(node: dict) -> int:
        own = (
            node["Actual Rows"]
            if node.get("Relation Name") == "stuck_runs_progress" and "Scan" in node["Node Type"]
            else 0
        )
        return own + sum(records_read(child) for child in node.get("Plans", []))

    assert running == 6000
    assert records_read(plan) <= running + 1, plan  # the delete's join stops at its first record: none ended
