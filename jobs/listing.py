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
from db.queries.groups import target_key
from jobs.limits import runtime_judging_params
from jobs.model import Run, as_utc
from jobs.runtime import Runtime

DASHBOARD_STATEMENT_TIMEOUT_MS = 5000  # a page that would take longer is an error, not a stuck server
MAX_PAGE = 500
MAX_SEARCH = 200  # characters of search text


@dataclass(frozen=True)
class RunFilter:
    state: str | None = None  # running, completed, failed, pending_retry, cancelled
    search: str | None = None  # text in the run's label columns or its error, any case
    since: timedelta | None = None  # within this long, by the time that describes the state (window_time)
    limit: int = 50
    cursor: str | None = None  # `next_cursor` of the previous page
    stuck: bool = False  # only runs running past their limit (what `check` would fail now)
    order: str = "newest"  # newest (not started first, then newest started) | started | due
    before: str | None = None  # `prev_cursor` of the next page: the page before it
    target: str | None = None  # only runs of this target (TARGET's value: a site, a host)


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


# The time a window (`since`) is counted by: a pending retry has not started (no started_at), so it
# is timed by when it is due; a cancelled one by when it ended. A retry handed to the fleet's queue
# has its hand-off time in started_at (SPEC §12): "queued within". (A run the scraper queued itself
# carries no time stuck-runs knows.)
WINDOW_TIMES = {"pending_retry": "due", "cancelled": "ended", "queued": "queued"}
WINDOW_LABELS = {"started": "Started within", "due": "Due within", "ended": "Ended within", "queued": "Queued within"}


def window_time(state: str | None) -> str:
    """`started`, `due` (overdue or due before now + the window), `ended` or `queued` (handed to the
    fleet's queue within): what `since` counts for `state`."""
    return WINDOW_TIMES.get(state or "", "started")


def window_label(state: str | None) -> str:
    """How a page names the window for `state`: "Started within", "Due within" or "Ended within"."""
    return WINDOW_LABELS[window_time(state)]


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
        raise UsageError(
            f"order=due lists pending retries by due time: drop status={filters.state} or order by started"
        )
    if filters.target is not None and not rt.settings.target:
        raise UsageError("a target filter needs TARGET: set TARGET=COLUMN or TARGET=host(URL_COLUMN)")
    if filters.cursor and filters.before:
        raise UsageError("give cursor (the next page) or before (the previous page), not both")
    return _read_page(rt, filters)


def _read_page(rt: Runtime, filters: RunFilter) -> RunsPage:
    """One page of `list_runs`: a keyset both ways (the previous page reads the index backwards
    from the page's first run)."""
    backwards = filters.before is not None
    cursor = filters.before or filters.cursor
    at, run_id = decode_cursor(rt, cursor) if cursor else (None, None)
    after = None if cursor is None else ("started" if at is not None or filters.order == "due" else "unstarted")
    params = {
        "sr_limit": filters.limit + 1,
        "sr_search": like_pattern(filters.search) if filters.search else None,
        "sr_since": rt.clock.now() - filters.since if filters.since else None,
        "sr_due_before": rt.clock.now() + filters.since if filters.since else None,
        **(runtime_judging_params(rt) if filters.stuck else {}),  # SPEC §14: the sweep's own judgement
        "sr_after_at": at,
        "sr_after_id": run_id,
        "sr_target": filters.target,
    }
    shape = {
        "state": filters.state,
        "search": bool(filters.search),
        "since": window_time(filters.state) if filters.since is not None else None,
        "stuck": filters.stuck,
        "order": filters.order,
        "backwards": backwards,
        "target": target_key(rt.runs, rt.settings.target) if filters.target is not None else None,
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
