"""Immutable values that travel between the database edge, the rules and the executors."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from jobs.rules import run_label


def as_utc(value: datetime | None) -> datetime | None:
    """Timestamps from `timestamp without time zone` columns are UTC by contract."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Run:
    """One attempt: a row of `scrape_runs` as the tool needs it, plus its input columns."""

    id: uuid.UUID
    status: str
    search_query: Any
    location_query: Any
    retry_count: int = 0
    max_retries: int = 4
    is_retry: bool = False
    original_run_id: uuid.UUID | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    next_retry_at: datetime | None = None
    error_message: str | None = None
    failure_pattern: str | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def chain_id(self) -> uuid.UUID:
        return self.original_run_id or self.id

    @property
    def label(self) -> str:
        return run_label(self.search_query, self.location_query, self.retry_count, self.max_retries)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], input_columns: tuple[str, ...] = ()) -> Run:
        return cls(
            id=row["id"],
            status=row["status"],
            search_query=row["search_query"],
            location_query=row["location_query"],
            retry_count=row["retry_count"],
            max_retries=row["max_retries"],
            is_retry=row["is_retry"],
            original_run_id=row["original_run_id"],
            started_at=as_utc(row["started_at"]),
            completed_at=as_utc(row["completed_at"]),
            next_retry_at=as_utc(row["next_retry_at"]),
            error_message=row["error_message"],
            failure_pattern=row.get("failure_pattern"),
            inputs={name: row[name] for name in input_columns if name in row},
        )
