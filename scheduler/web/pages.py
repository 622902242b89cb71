"""The operators' pages of `stuck-runs serve` (SPEC §13): server-rendered HTML on the API's services.

A page asks the services what the API asks them and renders their `plain()` documents with Jinja2,
autoescape on for every template: text from the database is text, never markup. Who may see a page
is the API's rule (`Caller`); a browser that is not signed in is sent to /login. An action is a
button that static/pages.js POSTs to the JSON API from this origin with the session cookie: a
read-only session gets no buttons, and the API refuses its actions anyway. Nothing is fetched from
another host (the Content-Security-Policy says so to the browser).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from db.errors import ConfigError, DatabaseUnavailable, RetryRefused, UsageError
from db.layout import WRITTEN_STATES
from jobs.dead_letters import list_dead_letters
from jobs.limits import limit_document
from jobs.listing import RunFilter, list_runs, window_label
from jobs.manual import ChainHistory, chain_history, retry_run
from jobs.runtime import Runtime
from jobs.settings import parse_duration
from jobs.stats import retry_stats
from jobs.status import read_status
from jobs.targets import TARGET, stats_by
from jobs.thresholds import span, thresholds
from jobs.timeline import HourlyTimeline, hourly_timeline
from scheduler.documents import json_text, plain
from scheduler.web.answers import ApiError, answering
from scheduler.web.auth import ADMIN, SESSION_COOKIE, Tokens, local_path
from scheduler.web.security import Caller

HERE = Path(__file__).resolve().parent
RUNS_PER_PAGE = 50
STUCK_CHOICE = "stuck"  # the runs page's status choice: running past its limit
ORDER_CHOICES = (
    ("newest", "not started first, then newest"),
    ("started", "newest started"),
    ("due", "due time (pending retries)"),
)
REFRESH_SECONDS = 10
OVERVIEW_WINDOW = timedelta(days=7)  # the overview's chart
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def shown_time(value: str | None) -> str:
    """An ISO time from `plain()` as operators read it: `2026-05-04 13:00:12 UTC`."""
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def percent(rate: float | None) -> str:
    return "—" if rate is None else f"{rate:.0%}"


def limits_section(rt: Runtime) -> dict[str, Any] | None:
    """The stats page's limits by kind: the numbers of `stuck-runs thresholds`, where COLUMN_MAP maps
    a kind; None when it maps none. Limits that cannot be read in time (a first count of a huge
    window) leave the rest of the page standing: the section says so."""
    if not rt.runs.kind:
        return None
    try:
        return plain(thresholds(rt))
    except DatabaseUnavailable:
        return {"unavailable": True}


def seconds_span(seconds: float | None) -> str:
    """A duration from `plain()` (seconds) as `stuck-runs thresholds` shows it: `12m`, `6h05m`."""
    return span(None if seconds is None else timedelta(seconds=seconds))


def path_part(value: object) -> str:
    """A run id (any type, any text) as one segment of a URL."""
    return quote(str(value), safe="")


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined)
templates.filters.update(when=shown_time, part=path_part, percent=percent, json=json_text, span=seconds_span)
templates.globals.update(refresh_seconds=REFRESH_SECONDS)


def render(template: str, http_status: int = 200, **context: Any) -> HTMLResponse:
    context = {"can_act": False, "signed_in": False, "navigation": True, "page": "", **context}
    return HTMLResponse(templates.get_template(template).render(**context), status_code=http_status, headers=HEADERS)


def login_page(error: str | None = None, status: int = 200, next_page: str = "/") -> HTMLResponse:
    """The sign-in form (`POST /login`, fields `token` and `next`), with what went wrong, if anything."""
    return render("login.html", status, error=error, navigation=False, next_page=local_path(next_page))


def asked_for(request: Request) -> str:
    """The page a browser asked for, path and query, to come back to after signing in."""
    query = request.url.query
    return request.url.path + ("?" + query if query else "")


def not_found_page(path: str) -> HTMLResponse:
    return render("error.html", 404, error="Page not found", details={"path": path})


# -- the retry button ----------------------------------------------------------------------------


def retry_label(attempt: int, budget: int) -> str:
    return f"Retry ({attempt}/{budget})"


def spent_label(retries: int, budget: int) -> str:
    return f"Max retries reached ({retries}/{budget}) · Permanent failure"


@dataclass(frozen=True)
class RetryButton:
    label: str | None  # None: no button, `note` says why
    action: str | None = None  # the API path the button POSTs; None: shown disabled
    note: str | None = None


def retry_button(rt: Runtime, chain: ChainHistory) -> RetryButton:
    """What a retry of the chain would be, as `retry_run` itself decides it (a dry run changes nothing)."""
    try:
        plan = retry_run(rt, chain.attempts[-1].id, dry_run=True)
    except RetryRefused as refused:
        if refused.budget_spent:
            return RetryButton(spent_label(refused.details["currentRetries"], refused.details["maxRetries"]))
        return RetryButton(None, note=str(refused))
    return RetryButton(retry_label(plan.attempt, plan.budget), f"/api/runs/{path_part(plan.failed_run_id)}/retry")


def due_now_action(chain: ChainHistory, now: datetime) -> str | None:
    """The API path that makes the chain's pending retry due now, when it has one due later."""
    latest = chain.attempts[-1]
    if latest.status != "pending_retry" or (latest.next_retry_at is not None and latest.next_retry_at <= now):
        return None
    return f"/api/runs/{path_part(latest.id)}/due-now"


# -- the hourly chart, drawn as SVG on the server ---------------------------------------------------

SLOT, BAR, PLOT_HEIGHT, LEFT, BOTTOM, TOP = 6, 4, 160, 40, 22, 8  # SVG user units
MIN_MARK = 3  # the least height of a count above zero: one retry beside a thousand still shows
TICK_LABEL_SLOTS = 12  # hours a day's label ("Mon 04 May") spans


def scale_top(highest: int) -> int:
    """The chart's top: the smallest 1, 2 or 5 times a power of ten that holds `highest` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if factor * step >= highest:
                return factor * step
        step *= 10


def hourly_chart(timeline: HourlyTimeline) -> dict[str, Any]:
    """Bars of retries per hour (succeeded below, failed above), dots for stuck detections, a tick
    at every UTC midnight; each mark carries its hour and counts as a tooltip."""
    hours = timeline.hours
    top = scale_top(max((max(h.retries, h.stuck_detections) for h in hours), default=0))
    base = TOP + PLOT_HEIGHT

    def y(count: int) -> float:
        return round(base - count * PLOT_HEIGHT / top, 2)

    bars, dots, ticks = [], [], []
    for i, h in enumerate(hours):
        x = LEFT + i * SLOT
        title = (
            f"{h.hour:%Y-%m-%d %H:00} UTC: {h.retries_succeeded} retries succeeded, "
            f"{h.retries_failed} failed, {h.stuck_detections} stuck detections"
        )
        if h.retries:
            ok_height = max(base - y(h.retries_succeeded), MIN_MARK) if h.retries_succeeded else 0
            failed_height = max(y(h.retries_succeeded) - y(h.retries), MIN_MARK) if h.retries_failed else 0
            ok, failed = round(base - ok_height, 2), round(base - ok_height - failed_height, 2)
            heights = {"ok_height": round(ok_height, 2), "failed_height": round(failed_height, 2)}
            bars.append({"x": x + 1, "ok_y": ok, "failed_y": failed, **heights, "title": title})
        if h.stuck_detections:
            dots.append({"x": x + SLOT / 2, "y": y(h.stuck_detections), "title": title})
        if h.hour.hour == 0:  # a label too near the right edge ends at its tick instead of starting there
            anchor = "end" if len(hours) - i < TICK_LABEL_SLOTS else "start"
            ticks.append({"x": x, "label": f"{h.hour:%a %d %b}", "anchor": anchor})
    return {
        "width": LEFT + len(hours) * SLOT + 4,
        "height": base + BOTTOM,
        "base": base,
        "left": LEFT,
        "bar": BAR,
        "bars": bars,
        "dots": dots,
        "ticks": ticks,
        "levels": [{"y": y(v), "label": v} for v in sorted({0, top // 2, top})],
        "busy": [plain(h) for h in hours if h.retries or h.stuck_detections],
        "retries": timeline.retries,
        "stuck": timeline.stuck_detections,
    }


# -- the pages ------------------------------------------------------------------------------------


def build_pages(
    rt: Runtime, tokens: Tokens, clock: Callable[[], float] = time.time, *, caller: Caller | None = None
) -> APIRouter:
    caller = caller or Caller(tokens, clock)
    pages = APIRouter(include_in_schema=False)
    pages.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(request: Request, template: str, failed: str, read: Callable[[], dict[str, Any]]) -> Response:
        """`read()`'s context rendered for who is asking; not signed in: to /login."""
        try:
            role = caller.role(request)
        except ApiError as refused:
            if refused.status == 401:  # back here once signed in
                return RedirectResponse("/login?" + urlencode({"next": asked_for(request)}), status_code=303)
            return render("error.html", refused.status, error=refused.error, details=refused.details)
        session = {"can_act": role == ADMIN, "signed_in": SESSION_COOKIE in request.cookies and tokens.configured}
        try:
            with answering(failed):
                context = read()
        except ApiError as refused:
            return render("error.html", refused.status, error=refused.error, details=refused.details, **session)
        return render(template, context.pop("http_status", 200), **session, **context)

    @pages.get("/")
    def overview(request: Request) -> Response:
        def read() -> dict[str, Any]:
            timeline = hourly_timeline(rt, OVERVIEW_WINDOW)
            status = read_status(rt)
            return {
                "page": "overview",
                "status": plain(status),
                "fleet": status.runs.fleet_shown(rt.settings.hands_off),
                "chart": hourly_chart(timeline),
            }

        return page(request, "overview.html", "Failed to read the overview", read)

    @pages.get("/runs")
    def runs(
        request: Request,
        status: str = "",
        q: str = "",
        since: str = "",
        cursor: str = "",
        before: str = "",
        order: str = "",
        target: str = "",
    ) -> Response:
        fields = (("status", status), ("q", q), ("since", since), ("order", order), ("target", target))
        chosen = {name: value for name, value in fields if value}
        form = {
            "page": "runs",
            "filters": {"status": status, "q": q, "since": since, "order": order or "newest", "target": target},
            "states": (*WRITTEN_STATES, STUCK_CHOICE),
            "orders": ORDER_CHOICES,
            "window_label": window_label(status or None),  # "Due within" for pending retries...
        }

        def read() -> dict[str, Any]:
            try:
                window = parse_duration(since, "since") if since else None
            except (ConfigError, UsageError) as bad:  # the form again, with what to change: not a page of its own
                shown = {"runs": [], "next_page": None, "previous_page": None, "first_page": None}
                return {**form, **shown, "problem": str(bad), "http_status": 400}
            stuck = status == STUCK_CHOICE
            filters = RunFilter(
                None if stuck or not status else status,
                q or None,
                window,
                RUNS_PER_PAGE,
                cursor or None,
                stuck=stuck,
                order=order or "newest",
                before=before or None,
                target=target or None,
            )
            found = list_runs(rt, filters)
            later = "/runs?" + urlencode({**chosen, "cursor": found.next_cursor}) if found.next_cursor else None
            earlier = "/runs?" + urlencode({**chosen, "before": found.prev_cursor}) if found.prev_cursor else None
            return {
                **form,
                "problem": None,
                "runs": plain(found.runs),
                "next_page": later,
                "previous_page": earlier,
                "first_page": "/runs?" + urlencode(chosen) if cursor or before else None,
            }

        return page(request, "runs.html", "Failed to list runs", read)

    @pages.get("/runs/{run_id}")
    def chain(request: Request, run_id: str) -> Response:
        def read() -> dict[str, Any]:
            wanted = rt.runs.parse_id(run_id)
            history = chain_history(rt, wanted)
            this = next(a for a in history.attempts if a.id == wanted)
            pending = [a for a in history.attempts if a.status == "pending_retry"]
            latest = history.attempts[-1]
            running = latest.is_retry and latest.status in ("running", "queued")  # SPEC §16: stopped, then cancelled
            target = pending[-1] if pending else latest if running else None
            return {
                "page": "runs",
                "run_id": str(wanted),
                "chain": plain(history),
                "inputs": plain(this).get("inputs") or {},
                "limit": limit_document(rt, this),
                "retry": retry_button(rt, history),
                "due_now": due_now_action(history, rt.clock.now()),
                "cancel": f"/api/runs/{path_part(target.id)}/cancel" if target else None,
                "cancel_label": "Cancel running retry" if running and not pending else "Cancel retry",
            }

        return page(request, "chain.html", "Failed to read the chain", read)

    @pages.get("/dead-letters")
    def dead_letters(request: Request, requeued: bool = False) -> Response:
        def read() -> dict[str, Any]:
            letters = list_dead_letters(rt, limit=100, include_requeued=requeued)
            return {"page": "dead-letters", "letters": plain(letters), "requeued": requeued}

        return page(request, "dead_letters.html", "Failed to list dead letters", read)

    @pages.get("/stats")
    def stats(request: Request, since: str = "7d") -> Response:
        def read() -> dict[str, Any]:
            window = parse_duration(since, "since")
            stats = retry_stats(rt, window)
            # The worst targets (SPEC §15), each linked to its runs, where TARGET names what runs scrape.
            targets = stats_by(rt, TARGET, window, limit=10) if rt.settings.target else None
            return {
                "page": "stats",
                "since": since,
                "stats": plain(stats),
                "fleet": stats.fleet_shown(rt.settings.hands_off),
                "targets": plain(targets),
                "target_runs": target_runs_links(targets, since),
                "limits": limits_section(rt),
            }

        return page(request, "stats.html", "Failed to read stats", read)

    return pages


def target_runs_links(targets: Any, since: str) -> list[str | None]:
    """Each worst target's runs: the runs page filtered to it, started in the window (None: no target)."""
    if targets is None:
        return []
    return [
        None if g.group is None else "/runs?" + urlencode({"target": g.group, "since": since}) for g in targets.groups
    ]
