"""The pause of retries (`stuck-runs pause [--for 4h]` / `resume`): one row per runs table in
`stuck_runs_pauses`. While it stands, no process claims a retry (the claim statements themselves
say so, so no process can start one in the instant after another paused); sweeps go on."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

PAUSES = "stuck_runs_pauses"


class PauseRecords:
    def __init__(self, schema: str | None, runs_table: str) -> None:
        self.runs_table = runs_table
        self.table = sa.Table(
            PAUSES,
            sa.MetaData(),
            sa.Column("runs_table", sa.Text, primary_key=True),
            sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("until", sa.DateTime(timezone=True)),  # NULL: until resumed
            sa.Column("paused_by", sa.Text, nullable=False),
            schema=schema,
        )

    def _standing(self, now: sa.ColumnElement) -> sa.ColumnElement:
        p = self.table.c
        return sa.and_(p.runs_table == self.runs_table, sa.or_(p.until.is_(None), p.until > now))

    def not_paused(self, now: sa.ColumnElement) -> sa.ColumnElement:
        """True unless a pause of this table stands at `now`: a condition of every claim."""
        return ~sa.exists().where(self._standing(now))

    def pause(self, now: object, until: object, by: str) -> sa.Insert:
        values = {"runs_table": self.runs_table, "paused_at": now, "until": until, "paused_by": by}
        statement = insert(self.table).values(**values)
        return statement.on_conflict_do_update(
            index_elements=["runs_table"], set_={k: statement.excluded[k] for k in ("paused_at", "until", "paused_by")}
        ).returning(self.table.c.paused_at, self.table.c.until, self.table.c.paused_by)

    def resume(self, now: object) -> sa.Delete:
        """Ends the pause; returns the row when one was standing (an expired one is removed quietly)."""
        t = self.table
        return (
            sa.delete(t)
            .where(t.c.runs_table == self.runs_table)
            .returning(
                t.c.paused_at, t.c.until, t.c.paused_by, sa.or_(t.c.until.is_(None), t.c.until > now).label("standing")
            )
        )

    def current(self, now: object) -> sa.Select:
        t = self.table
        return sa.select(t.c.paused_at, t.c.until, t.c.paused_by).where(self._standing(sa.literal(now)))
