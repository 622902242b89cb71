"""The slot cap: the room MAX_CONCURRENT_RETRIES leaves for one more retry.

The cap counts, across every process, the retries executing here (each holds a slot lock) and
those handed off and not yet ended (`handed_off` set, still queued or running). Both are read
under one transaction-level advisory lock, which every hand-off also takes before it commits:
a count never misses a retry that is changing from one kind to the other. (The lock is the
queries' `handoff_lock`: every hand-over, queued or delivered, counts under it.)
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from db import locks
from jobs.runtime import Runtime


def take_slot(rt: Runtime, conn: Connection, slots_ns: int, slot: int) -> bool:
    """Takes slot `slot` in `conn`'s session (in its open transaction; the caller commits) if it
    is free and the cap leaves room for one more. Counted and taken under the cap's lock: two
    sessions taking slots at once each see the other's, and one of them waits for the next
    poll, never both (each would count the other and neither start)."""
    q = rt.queries
    conn.execute(q.handoff_lock)
    room = conn.execute(q.room, {"sr_max": rt.settings.max_concurrent_retries}).scalar_one()
    return room > 0 and locks.try_lock(conn, slots_ns, slot)


def has_room(rt: Runtime, conn: Connection) -> bool:
    """Whether the cap leaves room for the retry `conn`'s session would start, its slot held:
    held slots (its own included) plus unfinished hand-offs stay within MAX_CONCURRENT_RETRIES."""
    q = rt.queries
    with conn.begin():
        conn.execute(q.handoff_lock)
        return conn.execute(q.room, {"sr_max": rt.settings.max_concurrent_retries}).scalar_one() >= 0
