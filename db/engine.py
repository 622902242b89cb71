"""The database edge: engines that speak UTC, and driver errors turned into operator errors.

Every connection runs with `TimeZone=UTC`, so `timestamp without time zone` columns read and
compare as UTC, and an `application_name` naming host and pid, so `pg_stat_activity` and the
lock holders we report say who is who.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import InterfaceError, OperationalError

from jobs.errors import DatabaseUnavailable

CONNECT_TIMEOUT_SECONDS = 10


def application_name(role: str) -> str:
    return f"stuck-runs {role} {socket.gethostname()}:{os.getpid()}"[:63]


def make_engine(url: str, *, role: str = "cli", pool_size: int = 5) -> Engine:
    """An engine for `url` whose connections are UTC and named; nothing is connected yet."""
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "application_name": application_name(role),
            "options": "-c TimeZone=UTC",
        },
    )


def redacted(url: str | URL) -> str:
    return make_url(url).render_as_string(hide_password=True) if url else ""


def scrub(text: str, url: str | URL | None) -> str:
    """`text` with the URL's password removed, wherever a driver may have echoed it."""
    password = make_url(url).password if url else None
    return text.replace(str(password), "***") if password else text


def describe_db_error(exc: BaseException, url: str | URL | None) -> str:
    """One line for a driver error: its first line, never the password or the SQL."""
    original = getattr(exc, "orig", None) or exc
    first = (str(original).strip().splitlines() or [type(original).__name__])[0]
    return scrub(first, url)


@contextmanager
def database_errors(engine: Engine, doing: str) -> Iterator[None]:
    """Turns connection failures into `DatabaseUnavailable` naming what was being done."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        where = redacted(engine.url)
        raise DatabaseUnavailable(
            f"database error while {doing} at {where}: {describe_db_error(exc, engine.url)}"
        ) from None


def check_connection(engine: Engine) -> None:
    """Raises `DatabaseUnavailable` with a one-line reason when the server cannot be reached."""
    with database_errors(engine, "connecting"), engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
