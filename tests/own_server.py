"""A PostgreSQL of a test's own, which the test may stop and start (database outages)."""

from pathlib import Path

from chaos.server import OwnServer
from db.engine import make_engine
from db.migrate import migrate
from tests.schema import TEXT_STATUS

__all__ = ["OwnServer", "migrated_server"]


def migrated_server(directory: Path) -> OwnServer:
    """A server of the test's own holding a migrated `scrape_runs` (text status, timestamptz)."""
    server = OwnServer(directory)
    engine = make_engine(server.url)
    with engine.begin() as conn:
        conn.exec_driver_sql(TEXT_STATUS.format(table="scrape_runs"))
    migrate(engine, "scrape_runs")
    engine.dispose()
    return server
