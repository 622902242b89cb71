"""The partial indexes say what the queries say: each migrated index's WHERE is, as PostgreSQL
stores it, the predicate the statements build for the same state (`RunsTable.in_state`), on
every adopted table (enum, CHECK, varchar and text statuses, mapped values, several values for
one state). Were they to drift apart, the planner would scan the table instead of the index.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from db.engine import make_engine
from db.layout import Layout, parse_column_map, parse_run_label, parse_status_map
from db.migrate import migrate
from db.migration_plan import index_names
from db.table import load_runs_table
from tests.adopted import ADOPTABLE, Adopted

# The status indexes and the state each one's WHERE names.
STATUS_INDEXES = {"running": "running", "pending": "pending_retry", "fleet_failed": "failed"}


def layout_of(adopted: Adopted) -> Layout:
    return Layout(
        parse_column_map(adopted.column_map) if adopted.column_map else {},
        parse_status_map(adopted.status_map) if adopted.status_map else {},
        None if adopted.default_label else parse_run_label(adopted.label),
    )


def stored_predicate(conn: sa.Connection, schema: str, index: str) -> str:
    return conn.execute(
        sa.text(
            "SELECT pg_get_expr(i.indpred, i.indrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = :name AND n.nspname = :schema"
        ),
        {"name": index, "schema": schema},
    ).scalar_one()


@pytest.mark.parametrize("adopted", ADOPTABLE, ids=lambda a: a.name)
def test_each_partial_index_has_the_queries_predicate(databases, adopted):
    url = databases.create()
    engine = make_engine(url)
    layout = layout_of(adopted)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(adopted.ddl)
        migrate(engine, adopted.table, None, layout, extend_check=adopted.check_guarded)
        names = index_names(adopted.table)
        with engine.connect() as conn:
            runs = load_runs_table(conn, adopted.table, None, layout)
            conn.commit()
            status = sa.column(runs.c.status.name)  # unqualified, as an index's WHERE names it
            for index, state in STATUS_INDEXES.items():
                queries = runs.in_state(status, state).compile(
                    dialect=postgresql.dialect(paramstyle="named"), compile_kwargs={"literal_binds": True}
                )
                # PostgreSQL's own rendering of the queries' predicate: that of a throwaway index.
                conn.exec_driver_sql(f"CREATE INDEX sr_probe ON {adopted.quoted} (next_retry_at) WHERE {queries}")
                expected = stored_predicate(conn, adopted.schema, "sr_probe")
                conn.rollback()
                stored = stored_predicate(conn, adopted.schema, names[index])
                conn.rollback()
                if index == "fleet_failed":  # its WHERE also narrows to the fleet's unhandled failures
                    assert stored.endswith(f" AND {expected})") or f"AND {expected}" in stored, (stored, expected)
                else:
                    assert stored == expected, (index, stored, expected)
    finally:
        engine.dispose()
