"""The notifications' own table (SPEC §15), `stuck_runs_alerts`: one row per runs table and event
kind, saying when its last message went out and what happened since (folded, waiting for the
next). Every process that notices something writes it here; the one whose conditional claim
succeeds sends, so replicas send one message, not one each.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert

ALERTS = "stuck_runs_alerts"


class AlertRecords:
    def __init__(self, schema: str | None, runs_table: str) -> None:
        self.runs_table = runs_table
        self.table = sa.Table(
            ALERTS,
            sa.MetaData(),
            sa.Column("runs_table", sa.Text, primary_key=True),
            sa.Column("kind", sa.Text, primary_key=True),
            sa.Column("last_sent_at", sa.DateTime(timezone=True)),  # NULL: never sent
            sa.Column("pending", JSONB(none_as_null=True)),  # what waits for the next message; NULL: nothing
            sa.Column("pending_since", sa.DateTime(timezone=True)),
            schema=schema,
        )

    def _row(self, kind: str) -> sa.ColumnElement:
        a = self.table.c
        return sa.and_(a.runs_table == self.runs_table, a.kind == kind)

    def ensure(self, kind: str) -> sa.Insert:
        """The kind's row, created empty if it is not there yet."""
        return insert(self.table).values(runs_table=self.runs_table, kind=kind).on_conflict_do_nothing()

    def waiting_for_update(self, kind: str) -> sa.Select:
        """What waits for the kind's next message, its row locked until the caller commits."""
        return sa.select(self.table.c.pending).where(self._row(kind)).with_for_update()

    def wait(self, kind: str, pending: dict, now: object) -> sa.Update:
        a = self.table.c
        return (
            sa.update(self.table)
            .where(self._row(kind))
            .values(pending=pending, pending_since=sa.func.coalesce(a.pending_since, now))
        )

    def _due(self, kind: str, now: object, every: object) -> sa.ColumnElement:
        a = self.table.c
        return sa.and_(
            self._row(kind),
            a.pending.is_not(None),
            sa.or_(a.last_sent_at.is_(None), a.last_sent_at <= sa.literal(now) - sa.literal(every)),
        )

    def due(self, kind: str, now: object, every: object) -> sa.Select:
        """The kind's waiting occurrence when its period has ended, locked; a row another process
        is claiming is skipped (it sends that one)."""
        return sa.select(self.table.c.pending).where(self._due(kind, now, every)).with_for_update(skip_locked=True)

    def claim(self, kind: str, now: object, every: object) -> sa.Update:
        """Takes what waits for sending now, on the condition it still waits and is due: the period
        starts again at `now`. RETURNING tells whether this process won it."""
        return (
            sa.update(self.table)
            .where(self._due(kind, now, every))
            .values(pending=None, pending_since=None, last_sent_at=now)
            .returning(self.table.c.kind)
        )

    def rows(self) -> sa.Select:
        return sa.select(self.table).where(self.table.c.runs_table == self.runs_table).order_by(self.table.c.kind)
