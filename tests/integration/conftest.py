"""Fixtures the HTTP tests share: an engine on the test's database, and a real `serve` on it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.web import WebServer


@pytest.fixture
def engine(db_url):
    engine = sa.create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def web(db_url):
    server = WebServer(db_url)
    yield server
    server.stop()
