"""Why due retries are not starting: a pause, or every slot MAX_CONCURRENT_RETRIES allows taken
(retries executing in some process, or handed to the fleet and not yet ended).

One reading for every place that says it: `process` (in its result: the CLI, --json), the
daemon's log, `status`, `GET /api/status` and the overview.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Connection

from db.engine import database_errors
from jobs.rules import format_time
from jobs.runtime import Runtime


@dataclass(frozen=True)
class Waiting:
    due: int  # pending retries due now
    paused: bool = False
    paused_until: datetime | None = None  # None while paused: until resumed
    paused_by: str | None = None
    cap: int | None = None  # MAX_CONCURRENT_RETRIES, when every slot is taken (and not paused)

    @property
    def message(self) -> str:
        retries = "due retry" if self.due == 1 else "due retries"
        if self.paused:
            until = f"until {format_time(self.paused_until)}" if self.paused_until else "until resumed"
            return f"{self.due} {retries} held by a pause {until} by {self.paused_by}"
        return f"{self.due} {retries} waiting for a slot (cap {self.cap})"


def read_waiting(rt: Runtime, conn: Connection | None = None) -> Waiting | None:
    """Why the retries due now wait; None when none is due or nothing holds them back."""
    if conn is None:
        with database_errors(rt.engine, "reading why retries wait"), rt.engine.connect() as own:
            return read_waiting(rt, own)
    now = rt.clock.now()
    due = conn.execute(rt.queries.due_now(), {"sr_now": now}).scalar_one()
    if not due:
        return None
    pause = conn.execute(rt.queries.pauses.current(now)).mappings().first()
    if pause is not None:
        return Waiting(due, True, pause["until"], pause["paused_by"])
    cap = rt.settings.max_concurrent_retries
    if conn.execute(rt.queries.room, {"sr_max": cap}).scalar_one() <= 0:
        return Waiting(due, cap=cap)
    return None
