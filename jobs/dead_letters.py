"""The dead-letter queue: chains that ended permanently failed, with everything to judge them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from db import dead_letters as statements
from db.engine import database_errors
from db.errors import RunNotFound, UsageError
from jobs.manual import ScheduledRetry, retry_run
from jobs.model import RunId
from jobs.runtime import Runtime


@dataclass(frozen=True)
class DeadLetter:
    id: int
    run_id: RunId
    chain_id: RunId
    attempts: int  # every attempt of the chain, the original included
    budget: int
    pattern: str
    last_error: str | None
    detail: str | None  # stderr tail or traceback
    inputs: dict[str, Any]
    created_at: datetime
    requeued_at: datetime | None
    requeued_run_id: RunId | None

    @classmethod
    def from_row(cls, row: Any) -> DeadLetter:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


def list_dead_letters(
    rt: Runtime,
    *,
    limit: int = 50,
    pattern: str | None = None,
    since: timedelta | None = None,
    include_requeued: bool = False,
) -> tuple[DeadLetter, ...]:
    dead = rt.queries.dead_letters
    query = statements.listing(
        dead, include_requeued=include_requeued, pattern=pattern is not None, since=since is not None
    )
    params = {"sr_limit": limit, "sr_pattern": pattern, "sr_since": rt.clock.now() - since if since else None}
    with database_errors(rt.engine, "listing dead letters"), rt.engine.connect() as conn:
        return tuple(DeadLetter.from_row(r) for r in conn.execute(query, params).mappings())


RUN_REF = "run:"


def parse_letter_ref(rt: Runtime, text: str) -> tuple[int | None, object]:
    """A dead letter is named by its number, or by its run's id: `run:<id>` always (a table whose
    ids are numbers or text needs it), or a bare UUID on a UUID table."""
    text = str(text).strip()
    if text.startswith(RUN_REF):
        return None, rt.runs.parse_id(text.removeprefix(RUN_REF))
    if text.isascii() and text.isdigit():
        return int(text), None
    if rt.runs.id_kind == "uuid":
        try:
            return None, uuid.UUID(text)
        except ValueError:
            pass
    raise UsageError(f"{text!r} is neither a dead-letter number nor run:<run id>: see `stuck-runs dlq list`")


def get_dead_letter(rt: Runtime, ref: str) -> DeadLetter:
    letter_id, run_id = parse_letter_ref(rt, ref)
    with database_errors(rt.engine, "reading a dead letter"), rt.engine.connect() as conn:
        row = (
            conn.execute(statements.one(rt.queries.dead_letters), {"sr_letter_id": letter_id, "sr_run_id": run_id})
            .mappings()
            .first()
        )
    if row is None:
        raise RunNotFound(f"no dead letter {ref}: `stuck-runs dlq list` shows them")
    return DeadLetter.from_row(row)


def requeue(rt: Runtime, ref: str) -> ScheduledRetry:
    """Retries a dead-lettered chain with a new budget; the record is marked requeued."""
    letter = get_dead_letter(rt, ref)
    return retry_run(rt, letter.run_id, reset_budget=True)


def purge_dead_letters(rt: Runtime, older_than: timedelta) -> int:
    """Removes dead letters older than `older_than`; returns how many (0 the second time)."""
    with database_errors(rt.engine, "purging dead letters"), rt.engine.begin() as conn:
        removed = conn.execute(statements.purge(rt.queries.dead_letters), {"sr_before": rt.clock.now() - older_than})
        return len(removed.all())
