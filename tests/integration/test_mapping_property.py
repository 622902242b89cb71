"""A property of SPEC §11: for any table shape and any mapping, a sweep leaves the same states as on
the default table.

Hypothesis draws a table (id kind, names, status kind and values, error kind, time zones); the same
runs go into it and into the default `scrape_runs`; both are swept; the outcomes, read back with
the test's own knowledge of the names and values (not through the product's mapping), must match.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.engine import make_engine
from db.layout import Layout
from db.migrate import migrate
from jobs.rules import RetryPolicy
from jobs.runtime import Runtime
from jobs.settings import Settings
from jobs.stuck import sweep_stuck_runs
from tests.schema import TEXT_STATUS

pytestmark = pytest.mark.slow  # a long property over many drawn tables

STATES = ("running", "completed", "failed", "pending_retry", "cancelled")
WORDS = ("done", "ok", "success", "SUC", "fin", "err", "ERR", "ko", "wait", "PEN", "skip", "CAN", "RUN", "active")


@dataclass(frozen=True)
class Shape:
    id_name: str
    id_kind: str  # uuid | bigserial | identity | text
    status_name: str
    status_kind: str  # text | varchar | enum | check
    values: dict[str, tuple[str, ...]]  # state -> values, the first written
    started_name: str
    completed_name: str
    error_name: str
    error_kind: str  # text | varchar | jsonb | missing
    naive: bool

    def q(self, name: str) -> str:
        return '"' + name + '"'

    def ddl(self, schema: str) -> str:
        id_type = {
            "uuid": "UUID PRIMARY KEY DEFAULT gen_random_uuid()",
            "bigserial": "BIGSERIAL PRIMARY KEY",
            "identity": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            "text": "TEXT PRIMARY KEY",
        }[self.id_kind]
        scraper_values = [v for state in ("running", "completed", "failed") for v in self.values[state]]
        quoted = ", ".join(f"'{v}'" for v in scraper_values)
        status_type = {"text": "TEXT", "varchar": "VARCHAR(12)", "enum": f"{schema}.st", "check": "TEXT"}[
            self.status_kind
        ]
        stamp = "TIMESTAMP" if self.naive else "TIMESTAMPTZ"
        columns = [
            f"{self.q(self.id_name)} {id_type}",
            f"{self.q(self.status_name)} {status_type} NOT NULL",
            f"{self.q(self.started_name)} {stamp}",
            f"{self.q(self.completed_name)} {stamp}",
            "tag TEXT NOT NULL",
        ]
        if self.error_kind != "missing":
            columns.append(
                f"{self.q(self.error_name)} {({'text': 'TEXT', 'varchar': 'VARCHAR(80)', 'jsonb': 'JSONB'})[self.error_kind]}"
            )
        if self.status_kind == "check":
            columns.append(f"CHECK ({self.q(self.status_name)} IN ({quoted}))")
        enum = f"CREATE TYPE {schema}.st AS ENUM ({quoted});" if self.status_kind == "enum" else ""
        return f"CREATE SCHEMA {schema}; {enum} CREATE TABLE {schema}.runs ({', '.join(columns)});"

    def layout(self) -> Layout:
        columns = {
            "id": self.id_name,
            "status": self.status_name,
            "started_at": self.started_name,
            "completed_at": self.completed_name,
            "error_message": self.error_name,
        }
        return Layout(columns={k: v for k, v in columns.items() if k != v}, statuses=dict(self.values))


@st.composite
def shapes(draw) -> Shape:
    words = draw(st.permutations(WORDS))
    second_phase = draw(st.booleans())
    values = {state: (word,) for state, word in zip(STATES, words, strict=False)}
    if second_phase:
        values["running"] = (values["running"][0], words[5])
    return Shape(
        id_name=draw(st.sampled_from(["id", "run_id", "jobId"])),
        id_kind=draw(st.sampled_from(["uuid", "bigserial", "identity", "text"])),
        status_name=draw(st.sampled_from(["status", "state", "Phase"])),
        status_kind=draw(st.sampled_from(["text", "varchar", "enum", "check"])),
        values=values,
        started_name=draw(st.sampled_from(["started_at", "startedAt", "time_from"])),
        completed_name=draw(st.sampled_from(["completed_at", "finished_at", "endTime"])),
        error_name=draw(st.sampled_from(["error_message", "error", "errorSummary"])),
        error_kind=draw(st.sampled_from(["text", "varchar", "jsonb", "missing"])),
        naive=draw(st.booleans()),
    )


# (tag, state, hours ago, running value index): what the scraper left in the table.
SCENARIO = (
    ("stuck", "running", 2.0, 0),
    ("stuck-phase-two", "running", 3.0, 1),
    ("fresh", "running", 0.2, 0),
    ("completed", "completed", 5.0, 0),
    ("failed", "failed", 5.0, 0),
)


def swept(url: str, table: str, layout: Layout, now: datetime) -> None:
    rt = Runtime.open(Settings(database_url=url, table=table, layout=layout, policy=RetryPolicy()))
    try:
        sweep_stuck_runs(rt)
    finally:
        rt.close()


def outcome(conn: sa.Connection, table: str, shape: Shape | None) -> list[tuple]:
    """Every row as (tag, state, retry_count, is_retry, error text, retry due, chain root's tag)."""
    if shape is None:
        names = {"id": "id", "status": "status", "error": "error_message"}
        state_of = {s: s for s in STATES}
    else:
        names = {"id": shape.id_name, "status": shape.status_name, "error": shape.error_name}
        state_of = {v: state for state, values in shape.values.items() for v in values}
    found = conn.execute(
        sa.text(
            f'SELECT r."{names["id"]}" AS id, r."{names["status"]}"::text AS status, r."{names["error"]}" AS error, '
            "r.tag, r.retry_count, r.is_retry, r.next_retry_at IS NOT NULL AS due, root.tag AS root "
            f'FROM {table} r LEFT JOIN {table} root ON root."{names["id"]}" = r.original_run_id'
        )
    ).mappings()
    rows = []
    for row in found:
        error = row["error"]
        if isinstance(error, (dict, list)) or (shape and shape.error_kind == "jsonb" and error is not None):
            error = error if isinstance(error, str) else json.dumps(error)
        rows.append(
            (
                row["tag"],
                state_of.get(row["status"], row["status"]),
                row["retry_count"],
                row["is_retry"],
                error,
                row["due"],
                row["root"],
            )
        )
    return sorted(rows)


def fill(conn: sa.Connection, table: str, shape: Shape | None, now: datetime) -> None:
    for tag, state, hours, phase in SCENARIO:
        if shape is None:
            value = state
            columns = {
                "status": value,
                "started_at": now - timedelta(hours=hours),
                "search_query": tag,
                "location_query": "x",
                "tag": tag,
            }
        else:
            values = shape.values[state]
            value = values[min(phase, len(values) - 1)]
            columns = {shape.status_name: value, shape.started_name: now - timedelta(hours=hours), "tag": tag}
            if shape.id_kind == "text":
                columns[shape.id_name] = f"run-{tag}"
        if shape is not None and shape.naive:
            columns[shape.started_name] = columns[shape.started_name].replace(tzinfo=None)
        names = ", ".join(f'"{k}"' for k in columns)
        params = ", ".join(f":p{i}" for i in range(len(columns)))
        conn.execute(
            sa.text(f"INSERT INTO {table} ({names}) VALUES ({params})"),
            {f"p{i}": v for i, v in enumerate(columns.values())},
        )


@pytest.fixture(scope="module")
def shared_url(server_url):
    from tests.conftest import Databases

    dbs = Databases(server_url)
    url = dbs.create()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
        conn.exec_driver_sql("ALTER TABLE scrape_runs ADD COLUMN tag TEXT")
    migrate(engine, "scrape_runs")
    engine.dispose()
    yield url
    dbs.drop_all()


_numbers = itertools.count()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes())
def test_any_mapping_sweeps_to_the_same_states_as_the_default_table(shared_url, shape):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    schema = f"p{next(_numbers)}"
    engine = make_engine(shared_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE scrape_runs, scrape_run_dead_letters")
        fill(conn, "scrape_runs", None, now)
        conn.exec_driver_sql(shape.ddl(schema))
    migrate(engine, f"{schema}.runs", layout=shape.layout(), extend_check=True)
    with engine.begin() as conn:
        fill(conn, f"{schema}.runs", shape, now)
    swept(shared_url, "scrape_runs", Layout(), now)
    swept(shared_url, f"{schema}.runs", shape.layout(), now)
    with engine.connect() as conn:
        expected = outcome(conn, "scrape_runs", None)
        got = outcome(conn, f"{schema}.runs", shape)
    engine.dispose()
    # The default table has no second running phase: its stuck-phase-two run is plain running.
    assert got == expected
    assert [r[0] for r in expected if r[1] == "pending_retry"] == ["stuck", "stuck-phase-two"]
