"""Immutable values that travel between the database edge, the rules and the executors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from jobs.rules import run_label

# A run's id as the driver returns the table's id column: a UUID, an int or a str (SPEC §11).
RunId = Any


def as_utc(value: datetime | None) -> datetime | None:
    """Timestamps from `timestamp without time zone` columns are UTC by contract."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Run:
    """One attempt: a row of `scrape_runs` as the tool needs it, plus its input columns."""

    id: RunId
    status: str  # the state, in stuck-runs' words (running, failed...), whatever value the table writes
    what: str  # the run's label text (RUN_LABEL)
    retry_count: int = 0
    max_retries: int = 4
    is_retry: bool = False
    original_run_id: RunId = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    next_retry_at: datetime | None = None
    error_message: str | None = None
    failure_pattern: str | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
    delivering_until: datetime | None = None  # the lease of its delivery to the fleet, while one is in flight
    delivering_by: str | None = None
    handed_off: str | None = None  # how it left for the fleet (webhook, queue, an engine's name); None: run here

    @property
    def chain_id(self) -> RunId:
        return self.original_run_id or self.id

    @property
    def label(self) -> str:
        return run_label(self.what, self.retry_count, self.max_retries)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], inputs: Mapping[str, str] | None = None) -> Run:
        """A run from a row read through `RunsTable.keyed()`; `inputs` maps input keys to real names."""
        return cls(
            id=row["id"],
            status=row["status"],
            what=row["_sr_what"],
            retry_count=row["retry_count"],
            max_retries=row["max_retries"],
            is_retry=row["is_retry"],
            original_run_id=row["original_run_id"],
            started_at=as_utc(row["started_at"]),
            completed_at=as_utc(row["completed_at"]),
            next_retry_at=as_utc(row["next_retry_at"]),
            error_message=row["error_message"],
            failure_pattern=row.get("failure_pattern"),
            inputs={name: row[key] for key, name in (inputs or {}).items() if key in row},
            delivering_until=as_utc(row.get("delivering_until")),
            delivering_by=row.get("delivering_by"),
            handed_off=row.get("handed_off"),
        )
