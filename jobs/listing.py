"""Runs a page at a time, newest first: what the runs page and `GET /api/runs` show.

Pages are keyset pages on the (started_at, id) index migrate builds: page 100,000 of a ten-million
row table costs what page 1 costs, and no page counts the table.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from db.engine import database_errors
from db.errors import UsageError
from db.layout import STATES
from jobs.model import Run, as_utc
from jobs.runtime import Runtime

DASHBOARD_STATEMENT_TIMEOUT_MS = 5000  # a page that would take longer is an error, not a stuck server
MAX_PAGE = 500
MAX_SEARCH = 200  # characters of search text


@dataclass(frozen=True)
class RunFilter:
    state: str | None = None  # running, completed, failed, pending_retry, cancelled
    search: str | None = None  # text in the run's label columns or its error, any case
    since: timedelta | None = None  # started within this long
    limit: int = 50
    cursor: str | None = None  # `next_cursor` of the previous page
    stuck: bool = False  # only runs running past their limit (what `check` would fail now)
    order: str = "newest"  # newest (not started first, then newest started) | started | due
    before: str | None = None  # `prev_cursor` of the next page: the page before it


@dataclass(frozen=True)
class RunsPage:
    runs: tuple[Run, ...]
    next_cursor: str | None  # None: this is the last page
    prev_cursor: str | None = None  # None: this is the first page (as far as this page knows)


ORDERS = ("newest", "started", "due")  # RunFilter.order


def encode_cursor(run: Run, order: str = "newest") -> str:
    key = run.next_retry_at if order == "due" else run.started_at
    at = key.isoformat() if key else None
    return base64.urlsafe_b64encode(json.dumps([at, str(run.id)]).encode()).decode().rstrip("=")


def decode_cursor(rt: Runtime, text: str) -> tuple[datetime | None, object]:
    """(started_at, id) of the run a page ended with; `UsageError` for anything this did not write."""
    try:
        at, run_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        started = as_utc(datetime.fromisoformat(at)) if at is not None else None
        return started, rt.runs.parse_id(run_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, UsageError):
        raise UsageError("cursor is not one a page of runs gave: use the next_cursor of the previous page") from None


def like_pattern(text: str) -> str:
    """`text` found anywhere, its own % and _ taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def list_runs(rt: Runtime, filters: RunFilter) -> RunsPage:
    if filters.search is not None and "\x00" in filters.search:
        raise UsageError("search text holds a NUL byte: no run's text can hold one")
    if filters.search is not None and len(filters.search) > MAX_SEARCH:
        raise UsageError(f"search text is {len(filters.search)} characters: use at most {MAX_SEARCH}")
    if filters.state is not None and filters.state not in STATES:
        raise UsageError(f"status {filters.state!r} is not a state: use one of {', '.join(STATES)}")
    if not 1 <= filters.limit <= MAX_PAGE:
        raise UsageError(f"limit {filters.limit} is not accepted: use 1 to {MAX_PAGE}")
    if filters.order not in ORDERS:
        raise UsageError(f"order {filters.order!r} is not an order: use one of {', '.join(ORDERS)}")
    if filters.order == "due" and filters.state not in (None, "pending_retry"):
        raise UsageError(f"order=due lists pending retries by due time: drop status={filters.state} or order by started")
    if filters.cursor and filters.before:
        raise UsageError("give cursor (the next page) or before (the previous page), not both")
    if filters.stuck or filters.order != "newest" or filters.before:
        return _browse_runs(rt, filters)
    after_at, after_id = decode_cursor(rt, filters.cursor) if filters.cursor else (None, None)
    after = None if filters.cursor is None else ("started" if after_at is not None else "unstarted")
    statement = rt.queries.runs_page(
        state=filters.state, search=bool(filters.search), since=filters.since is not None, after=after
    )
    params = {
        "sr_limit": filters.limit + 1,  # one more says whether there is a next page
        "sr_search": like_pattern(filters.search) if filters.search else None,
        "sr_since": rt.clock.now() - filters.since if filters.since else None,
        "sr_after_at": after_at,
        "sr_after_id": after_id,
    }
    with database_errors(rt.engine, "listing runs"), rt.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {DASHBOARD_STATEMENT_TIMEOUT_MS}")
        found = [Run.from_row(r, rt.runs.input_names) for r in conn.execute(statement, params).mappings()]
    page = tuple(found[: filters.limit])
    return RunsPage(
        page,
        encode_cursor(page[-1]) if len(found) > filters.limit else None,
        encode_cursor(page[0]) if filters.cursor and page else None,  # a later page has one before it
    )


def _browse_runs(rt: Runtime, filters: RunFilter) -> RunsPage:
    """`list_runs` with the stuck filter, another order or a previous page: the same filters, a
    keyset both ways (the previous page reads the index backwards from the page's first run)."""
    backwards = filters.before is not None
    cursor = filters.before or filters.cursor
    at, run_id = decode_cursor(rt, cursor) if cursor else (None, None)
    after = None if cursor is None else ("started" if at is not None or filters.order == "due" else "unstarted")
    params = {
        "sr_limit": filters.limit + 1,
        "sr_search": like_pattern(filters.search) if filters.search else None,
        "sr_since": rt.clock.now() - filters.since if filters.since else None,
        "sr_cutoff": rt.clock.now() - rt.settings.policy.stuck_after,
        "sr_after_at": at,
        "sr_after_id": run_id,
    }
    shape = {
        "state": filters.state,
        "search": bool(filters.search),
        "since": filters.since is not None,
        "stuck": filters.stuck,
        "order": filters.order,
        "backwards": backwards,
    }
    with database_errors(rt.engine, "listing runs"), rt.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {DASHBOARD_STATEMENT_TIMEOUT_MS}")

        def read(segment: str | None) -> list[Run]:
            statement = rt.queries.runs_page(after=segment, **shape)
            return [Run.from_row(r, rt.runs.input_names) for r in conn.execute(statement, params).mappings()]

        found = read(after)
        if backwards and filters.order == "newest" and after == "started" and len(found) <= filters.limit:
            found += read("unstarted_all")  # before the newest started run: the runs not started yet
    if not backwards:
        page = tuple(found[: filters.limit])
        more = len(found) > filters.limit
        return RunsPage(
            page,
            encode_cursor(page[-1], filters.order) if more else None,
            encode_cursor(page[0], filters.order) if cursor and page else None,
        )
    page = tuple(reversed(found[: filters.limit]))
    more = len(found) > filters.limit
    return RunsPage(
        page,
        encode_cursor(page[-1], filters.order) if page else None,  # the page the operator came from
        encode_cursor(page[0], filters.order) if more else None,
    )
