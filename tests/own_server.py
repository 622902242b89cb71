"""A PostgreSQL of a test's own, which the test may stop and start (database outages)."""

from chaos.server import OwnServer

__all__ = ["OwnServer"]
