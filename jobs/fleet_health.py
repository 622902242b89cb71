"""What the monitoring kit's alerts read of the whole fleet at each daemon heartbeat (SPEC §15):
how many daemons of the table are alive, and since when retries are paused. Read from the
database, so every daemon exports the same truth, whichever process paused or died."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from db.daemons import DaemonRecords
from jobs.control import read_pause
from jobs.runtime import Runtime
from jobs.status import ALIVE_WITHIN


@dataclass(frozen=True)
class FleetHealth:
    live_daemons: int  # daemons of this table that beat within ALIVE_WITHIN (this one included)
    paused_at: datetime | None  # when the pause in force began; None: not paused


def fleet_health(rt: Runtime, conn: Connection) -> FleetHealth:
    records = DaemonRecords(rt.runs.table.schema, rt.runs.canonical_name)
    alive = records.alive(rt.clock.now() - ALIVE_WITHIN).order_by(None).subquery("alive")
    live = conn.execute(sa.select(sa.func.count()).select_from(alive)).scalar_one()
    pause = read_pause(rt, conn)
    return FleetHealth(live, pause.paused_at if pause else None)
