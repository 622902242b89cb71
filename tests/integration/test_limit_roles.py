"""COLUMN_MAP's roles of SPEC §14 (`kind`, `max_runtime`, `progress`) resolved against a real table:
found by name, refused in one line when missing or of a type that cannot be a limit."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.errors import ConfigError
from db.layout import Layout, parse_column_map
from db.table import load_runs_table

COLUMNS = "ADD COLUMN urgency SMALLINT, ADD COLUMN spider TEXT, ADD COLUMN limit_s INTEGER, ADD COLUMN budget INTERVAL, ADD COLUMN items BIGINT, ADD COLUMN note TEXT"


@pytest.fixture
def conn(db_url):
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"ALTER TABLE scrape_runs {COLUMNS}")
        yield connection
    engine.dispose()


def loaded(conn, column_map: str):
    columns = parse_column_map(column_map) if column_map else {}
    return load_runs_table(conn, "scrape_runs", layout=Layout(columns=columns))


def test_mapped_roles_are_found_and_progress_is_no_input(conn) -> None:
    runs = loaded(conn, "kind=spider,max_runtime=budget,progress=items")
    assert (runs.kind, runs.max_runtime, runs.progress_counter) == ("spider", "budget", "items")
    assert "spider" in runs.input_columns and "budget" in runs.input_columns  # a retry keeps its kind and limit
    assert "items" not in runs.input_columns  # and starts with no progress of its own
    seconds = conn.execute(
        sa.select(
            runs.max_runtime_seconds(
                sa.select(sa.literal_column("interval '90 minutes'", sa.Interval).label("budget")).subquery()
            )
        )
    ).scalar()
    assert seconds == 5400


def test_unmapped_roles_are_none(conn) -> None:
    runs = loaded(conn, "")
    assert (runs.kind, runs.max_runtime, runs.progress_counter) == (None, None, None)
    assert runs.kind_text() is None and runs.max_runtime_seconds() is None


def test_max_runtime_in_seconds_is_accepted(conn) -> None:
    assert loaded(conn, "max_runtime=limit_s").max_runtime == "limit_s"


@pytest.mark.parametrize(
    ("column_map", "said"),
    [
        ("kind=species", "COLUMN_MAP: kind=species is not a column of scrape_runs"),
        ("max_runtime=note", "COLUMN_MAP: max_runtime=note (text) is no interval or number of seconds"),
        ("progress=nothing", "COLUMN_MAP: progress=nothing is not a column of scrape_runs"),
    ],
)
def test_a_role_the_table_cannot_play_is_refused_in_one_line(conn, column_map: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        loaded(conn, column_map)
    assert str(refused.value).startswith(said), str(refused.value)
    assert "\n" not in str(refused.value)


def test_priority_is_a_number_column(conn) -> None:
    assert loaded(conn, "priority=urgency").priority == "urgency"
    assert loaded(conn, "").priority is None
    with pytest.raises(ConfigError) as refused:
        loaded(conn, "priority=spider")
    assert str(refused.value).startswith("COLUMN_MAP: priority=spider (text) is not a number")
