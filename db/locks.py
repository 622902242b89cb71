"""Advisory locks: who sweeps, which retry slots are taken, which runs are being executed.

Locks are session-level and two-keyed `(namespace, key)`; the namespace is derived from the table
name, so two tables in one database never share locks. A process that dies loses its session
and with it every lock at once: a `kill -9` never blocks anyone.
"""

from __future__ import annotations

import zlib

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

SWEEP = "sweep"  # one stuck-run sweep at a time
SLOTS = "slots"  # key = slot number, 0 .. MAX_CONCURRENT_RETRIES-1
RUNS = "runs"  # key = hashtext(run id): held while the run is being executed
HANDOFF = "handoff"  # transaction-level, key 0: the cap's count and a hand-off, one at a time
LOCK_NOT_AVAILABLE = "55P03"


def namespace(table: str, purpose: str) -> int:
    """A stable signed 32-bit key for `purpose` on `table`."""
    value = zlib.crc32(f"stuck-runs:{purpose}:{table}".encode())
    return value - (1 << 32) if value >= (1 << 31) else value


def try_lock(conn: Connection, ns: int, key: int) -> bool:
    return bool(conn.execute(sa.select(sa.func.pg_try_advisory_lock(ns, key))).scalar_one())


def lock_within(conn: Connection, ns: int, key: int, wait_ms: int) -> bool:
    """Takes the session lock, waiting up to `wait_ms`; False if it stayed taken.

    Waiting a little lets a lock held by a session whose process was just killed go away
    (PostgreSQL notices the dead client at its next read or write) instead of skipping work.
    """
    try:
        with conn.begin():
            conn.execute(sa.text(f"SET LOCAL lock_timeout = {int(wait_ms)}"))
            # A session with a shorter statement timeout (serve's) would cancel the wait first:
            # an error instead of "another sweep holds it".
            conn.execute(sa.text(f"SET LOCAL statement_timeout = {int(wait_ms) + 1000}"))
            conn.execute(sa.select(sa.func.pg_advisory_lock(ns, key)))
        return True
    except OperationalError as exc:
        if getattr(exc.orig, "pgcode", None) == LOCK_NOT_AVAILABLE:
            return False
        raise


def unlock(conn: Connection, ns: int, key: int) -> bool:
    return bool(conn.execute(sa.select(sa.func.pg_advisory_unlock(ns, key))).scalar_one())


def unlock_run(conn: Connection, ns: int, run_id: object) -> bool:
    return bool(conn.execute(sa.select(sa.func.pg_advisory_unlock(ns, run_key(sa.literal(str(run_id)))))).scalar_one())


def run_key(run_id: sa.ColumnElement) -> sa.ColumnElement:
    return sa.func.hashtext(sa.cast(run_id, sa.Text))


def held_keys(ns: int) -> sa.Select:
    """The keys of `ns` held in this database right now, as oids (pg_locks' form)."""
    locks = sa.table(
        "pg_locks",
        sa.column("locktype"),
        sa.column("database"),
        sa.column("classid"),
        sa.column("objid"),
        sa.column("objsubid"),
        sa.column("granted"),
    )
    this_db = (
        sa.select(sa.literal_column("oid"))
        .select_from(sa.table("pg_database"))
        .where(sa.literal_column("datname") == sa.func.current_database())
    )
    return sa.select(locks.c.objid).where(
        locks.c.locktype == "advisory",
        locks.c.database == this_db.scalar_subquery(),
        locks.c.classid == sa.cast(sa.cast(sa.literal(ns), sa.Integer), _OID),
        locks.c.objsubid == 2,
        locks.c.granted,
    )


def as_oid(value: sa.ColumnElement) -> sa.ColumnElement:
    return sa.cast(value, _OID)


def holder(conn: Connection, ns: int, key: int) -> str | None:
    """The application_name of the session holding `(ns, key)`, if any holds it."""
    row = conn.exec_driver_sql(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = CAST(%(ns)s AS int4)::oid AND l.objid = CAST(%(key)s AS int4)::oid "
        "AND l.objsubid = 2 AND l.granted LIMIT 1",
        {"ns": ns, "key": key},
    ).first()
    return row[0] if row else None


class _Oid(sa.types.UserDefinedType):
    cache_ok = True

    def get_col_spec(self, **_: object) -> str:
        return "oid"


_OID = _Oid()
