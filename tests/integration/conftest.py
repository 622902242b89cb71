"""Fixtures the HTTP tests share: an engine on the test's database, and `serve`'s app on it:
in-process (`web`) for what routes answer, a real process (`served`) for a browser."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.web import InProcessWeb, WebServer


@pytest.fixture
def engine(db_url):
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def web(db_url):
    app = InProcessWeb(db_url)
    yield app
    app.stop()


@pytest.fixture
def served(db_url):
    server = WebServer(db_url)
    yield server
    server.stop()
