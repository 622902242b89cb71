"""The JSON API of `stuck-runs serve` (SPEC §13): the CLI's service functions over HTTP.

Every answer is an envelope, `{"success": true, ...}` or `{"success": false, "error": ...,
"details": {...}}`; no traceback and no secret ever reaches a client. Nothing is decided here that
the services do not decide for the CLI: a retry refused over HTTP is refused with the same reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from db.errors import (
    CancelRefused,
    DatabaseUnavailable,
    DueNowRefused,
    OperatorError,
    RetryRefused,
    RunNotFound,
    UsageError,
)
from jobs.control import cancel_matching, cancel_run, pause_retries, resume_retries
from jobs.dead_letters import get_dead_letter, list_dead_letters, requeue
from jobs.due_now import make_due_now
from jobs.listing import MAX_PAGE, MAX_SEARCH, RunFilter, list_runs
from jobs.manual import RETRY_KINDS, RetryCriteria, chain_history, retry_matching, retry_run
from jobs.runtime import Runtime
from jobs.settings import is_loopback, parse_duration
from jobs.stats import retry_stats
from jobs.status import CHECKER, job_run, read_status
from jobs.stuck import sweep_stuck_runs
from jobs.timeline import hourly_timeline
from scheduler.documents import plain
from scheduler.web.auth import ADMIN, READ, SESSION_COOKIE, Tokens, bearer, same_origin

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OVERVIEW_WINDOW = timedelta(days=7)  # the overview's chart
MAX_BODY_BYTES = 64 * 1024
# A switch is `true` or `false`, nothing looser: `dry_run=no` must not run for real.
Flag = Literal["true", "false"]


def on(flag: Flag | None) -> bool:
    return flag == "true"


class ApiError(Exception):
    def __init__(self, status: int, error: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.details = status, error, details or {}


def failure(status: int, error: str, details: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse({"success": False, "error": error, "details": details or {}}, status_code=status)


@contextmanager
def answering(failed: str, not_found: str = "Run not found") -> Iterator[None]:
    """Operator errors from the services as API errors; `failed` names what a database failure broke."""
    try:
        yield
    except RunNotFound as exc:
        raise ApiError(404, not_found, {"reason": str(exc)}) from None
    except DueNowRefused as exc:  # the chain's state, not the request, stands in the way
        raise ApiError(409, "Run has no pending retry", {**exc.details, "reason": str(exc)}) from None
    except (CancelRefused, RetryRefused) as exc:
        raise refusal(exc) from None
    except DatabaseUnavailable as exc:
        # The reason names the server (user, host, database): the journal gets it, a client does not.
        logger.bind(event="api_database_error").warning("{}: {}", failed, exc)
        raise ApiError(500, failed, {"reason": "the database could not be reached or refused the statement"}) from None
    except OperatorError as exc:  # a malformed id, a filter the table cannot take
        raise ApiError(400, str(exc)) from None


def refusal(exc: CancelRefused | RetryRefused) -> ApiError:
    if exc.retry_after is not None:
        # Being delivered to the fleet (SPEC §12): a conflict only for as long as the delivery's lease.
        details = {**exc.details, "reason": str(exc), "retryAfterSeconds": exc.retry_after}
        return ApiError(409, "Run is being delivered to the fleet", details)
    if isinstance(exc, CancelRefused):
        return ApiError(400, "Run cannot be cancelled", {**exc.details, "reason": str(exc)})
    error = "Run has exceeded maximum retry attempts" if exc.budget_spent else "Run cannot be retried"
    details = exc.details if exc.budget_spent else {**exc.details, "reason": str(exc)}
    return ApiError(400, error, details)


class Caller:
    """Who is asking, as the request proves it (SPEC §13's rules)."""

    def __init__(self, tokens: Tokens, clock: Callable[[], float]) -> None:
        self.tokens, self.clock = tokens, clock
        self.ended: dict[str, float] = {}  # cookies signed out of in this process, with their expiry

    def end_session(self, cookie: str) -> None:
        """Refuses a valid session cookie from now on; forgets the ones past their expiry, which
        are refused anyway, so the set is at most the sessions of the last 12 hours."""
        now = self.clock()
        for expired in [c for c, until in self.ended.items() if until <= now]:
            del self.ended[expired]
        self.ended[cookie] = float(cookie.split(".")[1])

    def role(self, request: Request) -> str:
        presented = bearer(request.headers.get("authorization"))
        cookie = request.cookies.get(SESSION_COOKIE)
        mutating = request.method not in SAFE_METHODS
        browser = request.headers.get("origin") is not None or request.headers.get("sec-fetch-site") is not None
        if presented is not None:
            role = self.tokens.role_of(presented)
            if role is None:
                client = request.client.host if request.client else "?"
                logger.bind(event="api_bad_token").warning("refused a wrong token from {}", client)
                raise ApiError(401, "Invalid token", {"hint": "send Authorization: Bearer <ADMIN_TOKEN or READ_TOKEN>"})
            from_page = False
        elif cookie is not None and self.tokens.configured:
            role = self.tokens.session_role(cookie, self.clock()) if cookie not in self.ended else None
            if role is None:
                raise ApiError(401, "Session expired or invalid", {"hint": "sign in again at /login"})
            from_page = True
        elif not self.tokens.configured:
            # No token: `serve` listens on loopback only. A page of another site open in the
            # operator's browser can still reach loopback, and so can a rebound DNS name:
            # the Host must be a loopback one, and a browser's request must be our own page's.
            if not _loopback_host(request.headers.get("host")):
                raise ApiError(403, "Host not allowed", {"hint": "without ADMIN_TOKEN, use http://127.0.0.1"})
            role, from_page = ADMIN, browser
        else:
            raise ApiError(401, "Authentication required", {"hint": "send Authorization: Bearer <token>"})
        if mutating and from_page and not _own_page(request):
            raise ApiError(403, "Cross-origin request refused", {"hint": "act from stuck-runs' own pages"})
        return role


def _loopback_host(host: str | None) -> bool:
    name = (host or "").rsplit(":", 1)[0] if not (host or "").endswith("]") else (host or "")
    return is_loopback(name.strip("[]").lower()) if name else False


def _own_page(request: Request) -> bool:
    return same_origin(
        request.headers.get("origin"),
        request.headers.get("sec-fetch-site"),
        request.headers.get("host"),
        request.url.scheme,
    )


def _checked_parameters(request: Request) -> None:
    """A parameter we do not know, given twice (`dry_run=true&dry_run=false`: which one?) or holding
    a NUL byte is an error, never silently ignored or half-read; so is a body where none is taken."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    known = {p.alias or p.name for p in getattr(dependant, "query_params", [])}
    names = [name for name, _ in request.query_params.multi_items()]
    unknown = sorted(set(names) - known)
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise ApiError(400, f"Unknown parameter: {unknown[0]}", {"accepted": accepted})
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ApiError(400, f"Parameter given more than once: {repeated[0]}", {"hint": "give each parameter once"})
    for name, value in request.query_params.multi_items():
        if "\x00" in value:
            raise ApiError(400, f"Invalid {name}: it holds a NUL byte")
    takes_body = getattr(route, "openapi_extra", None) and "requestBody" in route.openapi_extra
    sent = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    if not takes_body and request.method not in SAFE_METHODS and sent:
        raise ApiError(400, "This endpoint takes no body: give its parameters in the query string")


class BulkRetry(BaseModel):
    """The CLI's `retry` filters. Nothing changes unless `dry_run` is JSON `false`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    error_like: str | None = Field(None, max_length=MAX_SEARCH, description="SQL LIKE pattern on the error, any case")
    search_query: str | None = Field(None, max_length=MAX_SEARCH)
    location_query: str | None = Field(None, max_length=MAX_SEARCH)
    since: str | None = Field(None, max_length=20, description="failed within this long (90s, 30m, 4h, 1d)")
    status: str = Field("failed", description="failed | permanent (dead-lettered) | scraper")
    limit: int = Field(100, ge=1, le=10_000)
    spread: str | None = Field(None, max_length=20, description="spread the retries' due times over this long")
    reset_budget: bool = False
    dry_run: bool = True


class BulkCancel(BaseModel):
    """The CLI's `cancel` filters. Nothing changes unless `dry_run` is JSON `false`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    error_like: str | None = Field(
        None, max_length=MAX_SEARCH, description="SQL LIKE pattern on the retried attempt's error, any case"
    )
    search_query: str | None = Field(None, max_length=MAX_SEARCH)
    location_query: str | None = Field(None, max_length=MAX_SEARCH)
    since: str | None = Field(None, max_length=20, description="the retried attempt ended within this long")
    limit: int = Field(100, ge=1, le=10_000)
    dry_run: bool = True


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ApiError(400, f"Key given more than once in the body: {repeated[0]}", {"hint": "give each key once"})
    return dict(pairs)


async def bounded_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes without reading more of it than that."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Body too large: at most {limit // 1024 or 1} KB")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"Body too large: at most {limit // 1024 or 1} KB")
    return bytes(raw)


async def read_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """A JSON object body, held to `model` strictly: one clear 400 for anything else."""
    raw = await bounded_body(request, MAX_BODY_BYTES)
    if not raw.strip():
        return model()
    try:
        document = json.loads(raw, object_pairs_hook=_no_repeated_keys)
    except (ValueError, RecursionError):
        raise ApiError(400, 'The body is not valid JSON: send an object such as {"dry_run": true}') from None
    if not isinstance(document, dict):
        raise ApiError(400, 'The body must be a JSON object such as {"dry_run": true}')
    holding_nul = sorted(key for key, value in document.items() if isinstance(value, str) and "\x00" in value)
    if holding_nul:
        raise ApiError(400, f"Invalid {holding_nul[0]}: it holds a NUL byte")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise ApiError(400, f"Invalid {where}: {first.get('msg', 'not accepted')}") from None


def build_api(
    rt: Runtime, tokens: Tokens, *, clock: Callable[[], float] = time.time, caller: Caller | None = None
) -> APIRouter:
    caller = caller or Caller(tokens, clock)

    def reader(request: Request) -> str:
        return _need(caller, request, READ)

    def administrator(request: Request) -> str:
        return _need(caller, request, ADMIN)

    read = [Depends(reader), Depends(_checked_parameters)]
    admin = [Depends(administrator), Depends(_checked_parameters)]
    api = APIRouter(prefix="/api")

    @api.get("/health", dependencies=[Depends(_checked_parameters)])
    def health() -> Any:
        """Whether this server can answer: it and its database; needs no token. 503 when the database cannot be reached."""
        try:
            with rt.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception:  # noqa: BLE001 - any failure is "cannot answer"; the reason is not a client's
            return failure(503, "Database unavailable")
        return {"success": True, "status": "ok"}

    @api.post("/runs/reset-stuck", dependencies=admin)
    def reset_stuck(
        timeout_minutes: float | None = Query(
            None,
            gt=0,
            le=5_256_000,
            description="stuck after this many minutes; without it each run is judged by its limit, as `check` judges it",
        ),
        dry_run: Flag = "false",
    ) -> dict:
        """The stuck-run sweep of `check`, with this threshold or the configured one: it fails the stuck runs and schedules their retries."""
        policy = rt.settings.policy  # `check`'s own: STUCK_AFTER, and each run's limit where the table keeps one
        if timeout_minutes is not None:
            if timedelta(minutes=timeout_minutes) < timedelta(seconds=1):
                raise ApiError(400, "Invalid timeout_minutes: use at least 1 second's worth (0.02)")
            policy = replace(policy, stuck_after=timedelta(minutes=timeout_minutes))
        dry_run = on(dry_run)
        with answering("Failed to reset stuck runs"), job_run(rt, (CHECKER,), dry_run=dry_run, via="api") as record:
            result = sweep_stuck_runs(rt, policy, dry_run=dry_run, keep=None)
            record(result)  # `status` shows it as the checker's last run, as it shows `check`'s
        if result.skipped:
            raise ApiError(409, "Another sweep is running", {"reason": result.skipped})
        attempts = result.document()["attempts"]
        verb = "Would reset" if dry_run else "Reset"
        return {
            "success": True,
            "reset_count": result.failed,
            "run_ids": [plain(rt.runs.id_from_text(a["run_id"])) for a in attempts],
            "retry_ids": [plain(rt.runs.id_from_text(a["retry_id"])) for a in attempts if a.get("retry_id")],
            "dry_run": dry_run,
            "message": f"{verb} {result.failed} stuck run(s)",
        }

    @api.post(
        "/runs/retry",
        dependencies=admin,
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": BulkRetry.model_json_schema()}}}},
    )
    async def bulk_retry(request: Request) -> dict:
        """Retries the latest failed attempt of every chain the filters match, as `stuck-runs retry --error-like ...`."""
        filters = await read_body(request, BulkRetry)
        return await run_in_threadpool(_bulk_retry, filters)

    def _bulk_retry(filters: BulkRetry) -> dict:
        if filters.status not in RETRY_KINDS:
            raise ApiError(400, f"Unknown status: {filters.status}", {"accepted": ", ".join(RETRY_KINDS)})
        with answering("Failed to retry runs"):
            criteria = RetryCriteria(
                error_like=filters.error_like,
                search_query=filters.search_query,
                location_query=filters.location_query,
                since=parse_duration(filters.since, "since") if filters.since else None,
                kind=filters.status,
                limit=filters.limit,
            )
            spread = parse_duration(filters.spread, "spread") if filters.spread else None
            result = retry_matching(
                rt, criteria, reset_budget=filters.reset_budget, spread=spread, dry_run=filters.dry_run
            )
        return {"success": True, "data": plain(result), "message": result.message}

    @api.post(
        "/runs/cancel",
        dependencies=admin,
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": BulkCancel.model_json_schema()}}}},
    )
    async def bulk_cancel(request: Request) -> dict:
        """Cancels every pending retry the filters match, as `stuck-runs cancel --error-like ...`."""
        filters = await read_body(request, BulkCancel)
        return await run_in_threadpool(_bulk_cancel, filters)

    def _bulk_cancel(filters: BulkCancel) -> dict:
        with answering("Failed to cancel retries"):
            criteria = RetryCriteria(
                error_like=filters.error_like,
                search_query=filters.search_query,
                location_query=filters.location_query,
                since=parse_duration(filters.since, "since") if filters.since else None,
                limit=filters.limit,
            )
            if not criteria.given:
                raise UsageError("give filters for a bulk cancel (error_like, search_query, location_query, since)")
            result = cancel_matching(rt, criteria, dry_run=filters.dry_run)
        return {"success": True, "data": plain(result), "message": result.message}

    @api.post("/runs/{run_id}/retry", dependencies=admin)
    def retry(run_id: str, reset_budget: Flag = "false", dry_run: Flag = "false") -> dict:
        """A manual retry of a failed run (its chain's latest failed attempt), as `stuck-runs retry RUN_ID`;
        with `dry_run=true`, what would be scheduled, nothing changed."""
        if on(dry_run):
            with answering("Failed to retry run"):
                plan = retry_run(rt, rt.runs.parse_id(run_id), reset_budget=on(reset_budget), dry_run=True)
            message = f"Would schedule a retry (attempt {plan.attempt}/{plan.budget})"
            return {"success": True, "data": plain(plan), "dry_run": True, "message": message}
        with answering("Failed to retry run"):
            scheduled = retry_run(rt, rt.runs.parse_id(run_id), reset_budget=on(reset_budget))
            chain = chain_history(rt, scheduled.retry_id)
        new = next(a for a in chain.attempts if a.id == scheduled.retry_id)
        logger.bind(event="api_retry", run_id=str(scheduled.failed_run_id), retry_id=str(new.id)).info(
            "retry of {} scheduled over HTTP", scheduled.failed_run_id
        )
        return {"success": True, "data": plain(new), "message": scheduled.message}

    @api.get("/runs", dependencies=read)
    def runs(
        status: str | None = Query(None, description="running, completed, failed, pending_retry, cancelled"),
        q: str | None = Query(None, description=f"text in the run's inputs or its error, any case (≤ {MAX_SEARCH})"),
        since: str | None = Query(
            None,
            description="within this long (90m, 24h, 7d), by the time that describes the status: started; "
            "due (overdue or due within it) for pending_retry; ended for cancelled; handed off for queued",
        ),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
        cursor: str | None = Query(None, description="next_cursor of the previous page"),
        before: str | None = Query(None, description="prev_cursor of a page: the page before it"),
        stuck: Flag = Query("false", description="only runs running past their limit, as `check` judges them"),
        order: str = Query(
            "newest", description="newest (runs not started first), started (newest started), due (pending retries by due time)"
        ),
    ) -> dict:
        """Runs newest first (or by start, or by due time), a keyset page at a time, either way."""
        with answering("Failed to list runs"):
            window = parse_duration(since, "since") if since else None
            filters = RunFilter(status, q or None, window, limit, cursor, stuck=on(stuck), order=order, before=before)
            page = list_runs(rt, filters)
        return {
            "success": True,
            "data": plain(page.runs),
            "next_cursor": page.next_cursor,
            "prev_cursor": page.prev_cursor,
        }

    @api.post("/runs/{run_id}/cancel", dependencies=admin)
    def cancel(run_id: str, dry_run: Flag = "false") -> dict:
        """Cancels the chain's pending retry ("Cancelled by operator"), as `stuck-runs cancel RUN_ID`."""
        with answering("Failed to cancel retry"):
            done = cancel_run(rt, rt.runs.parse_id(run_id), dry_run=on(dry_run))
        return {"success": True, "data": plain(done), "message": done.message}

    @api.post("/runs/{run_id}/due-now", dependencies=admin)
    def due_now(run_id: str) -> dict:
        """Makes the chain's pending retry due now (the next free slot starts it), as `stuck-runs retry RUN_ID --now`
        does before executing it; 409 when nothing of the chain is pending."""
        with answering("Failed to make the retry due"):
            done = make_due_now(rt, rt.runs.parse_id(run_id))
        logger.bind(event="api_due_now", run_id=str(done.retry_id)).info("retry {} made due now over HTTP", done.retry_id)
        return {"success": True, "data": plain(done), "message": done.message}

    @api.post("/pause", dependencies=admin)
    def pause(
        for_: str | None = Query(None, alias="for", description="end by itself after this long, e.g. 4h"),
    ) -> dict:
        """Stops every process from starting retries (sweeps go on), as `stuck-runs pause --for 4h`."""
        with answering("Failed to pause retries"):
            state = pause_retries(rt, parse_duration(for_, "for") if for_ is not None else None, via="api")
        return {"success": True, "data": plain(state), "message": state.message}

    @api.post("/resume", dependencies=admin)
    def resume() -> dict:
        """Ends a pause, as `stuck-runs resume`."""
        with answering("Failed to resume retries"):
            ended = resume_retries(rt)
        message = "Retries resumed" if ended else "Retries were not paused; nothing changed"
        return {"success": True, "data": {"resumed": ended is not None, "pause": plain(ended)}, "message": message}

    @api.get("/runs/{run_id}", dependencies=read)
    def run(run_id: str) -> dict:
        """A run and its whole chain, oldest first."""
        with answering("Failed to read run"):
            wanted = rt.runs.parse_id(run_id)
            chain = chain_history(rt, wanted)
        this = next(a for a in chain.attempts if a.id == wanted)
        return {"success": True, "data": {"run": plain(this), "chain": plain(chain)}}

    @api.get("/status", dependencies=read)
    def status() -> dict:
        """Daemons alive, each job's last and next run, and the run counts (`stuck-runs status`):
        `running_retries` executing here, `handed_off_queued` / `handed_off_running` at the fleet."""
        with answering("Failed to read status"):
            return {"success": True, "data": plain(read_status(rt))}

    @api.get("/stats", dependencies=read)
    def stats(since: str = Query("7d", description="a window such as 24h or 7d")) -> dict:
        """Retry metrics over the window (`stuck-runs stats`), `by_how` they ran: here, webhook, queue."""
        with answering("Failed to read stats"):
            window = parse_duration(since, "since")
            return {"success": True, "data": plain(retry_stats(rt, window))}

    @api.get("/stats/hourly", dependencies=read)
    def hourly(since: str = Query("7d", description="a window of at most 31d")) -> dict:
        """Per UTC hour, oldest first, every hour present: retries succeeded and failed, stuck detections."""
        with answering("Failed to read the hourly timeline"):
            return {"success": True, "data": plain(hourly_timeline(rt, parse_duration(since, "since")))}

    @api.get("/dead-letters", dependencies=read)
    def dead_letters(
        limit: int = Query(50, ge=1, le=1000),
        pattern: str | None = None,
        since: str | None = None,
        include_requeued: Flag = "false",
    ) -> dict:
        """Chains that ended permanently failed, newest first (`stuck-runs dlq list`)."""
        with answering("Failed to list dead letters"):
            window = parse_duration(since, "since") if since else None
            letters = list_dead_letters(
                rt, limit=limit, pattern=pattern, since=window, include_requeued=on(include_requeued)
            )
        return {"success": True, "data": plain(letters)}

    @api.get("/dead-letters/{ref}", dependencies=read)
    def dead_letter(ref: str) -> dict:
        """One dead letter, by number or `run:<run id>`, with its traceback or stderr tail."""
        with answering("Failed to read dead letter", not_found="Dead letter not found"):
            return {"success": True, "data": plain(get_dead_letter(rt, ref))}

    @api.post("/dead-letters/{ref}/requeue", dependencies=admin)
    def requeue_letter(ref: str) -> dict:
        """Retries a dead-lettered chain with a new budget (`stuck-runs dlq requeue`)."""
        with answering("Failed to requeue dead letter", not_found="Dead letter not found"):
            scheduled = requeue(rt, ref)
        return {"success": True, "data": plain(scheduled), "message": scheduled.message}

    refuse_other_methods(api)
    return api


def refuse_other_methods(router: APIRouter) -> None:
    """A method a path does not take is a 405 naming the ones it takes (`Allow`), not the answer of
    a route whose pattern happens to match: `GET /api/runs/reset-stuck` is not the run `reset-stuck`."""
    taken: dict[str, set[str]] = {}
    for route in router.routes:
        if isinstance(route, APIRoute):
            taken.setdefault(route.path, set()).update(route.methods)
    for path, methods in taken.items():
        allowed = methods | ({"HEAD"} if "GET" in methods else set())
        allow = ", ".join(sorted(allowed))

        def refuse(request: Request, allow: str = allow) -> JSONResponse:
            answer = failure(405, f"Method {request.method} not allowed here", {"allowed": allow})
            answer.headers["Allow"] = allow
            return answer

        others = sorted({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"} - allowed)
        router.add_api_route(path.removeprefix(router.prefix), refuse, methods=others, include_in_schema=False)
        # Just before the path's own routes: ahead of a later pattern that matches it too
        # (`/runs/{run_id}` after `/runs/reset-stuck`), behind the literal paths an earlier pattern leaves alone.
        first = next(i for i, r in enumerate(router.routes) if isinstance(r, APIRoute) and r.path == path)
        router.routes.insert(first, router.routes.pop())


def _need(caller: Caller, request: Request, role: str) -> str:
    granted = caller.role(request)
    if role == ADMIN and granted != ADMIN:
        raise ApiError(403, "This token may only read", {"role": granted})
    return granted


def install_timing(app: FastAPI) -> None:
    """`Server-Timing: app;dur=<ms>` on every answer: what the server spent, for a browser's
    network panel and the benchmark, apart from the network and the client."""

    @app.middleware("http")
    async def timing(request: Request, call_next: Callable) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")  # answers name runs and errors
        return response


ENVELOPE = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"type": "boolean", "enum": [False]},
        "error": {"type": "string"},
        "details": {"type": "object"},
    },
}
ERRORS = {
    "400": "Bad input: a malformed id, an unknown or repeated parameter, a refused retry",
    "401": "No token, or not a token of this server",
    "403": "A read-only token acting, or a cross-origin request carried by the session cookie",
    "404": "No such run or dead letter",
    "500": "The database failed; nothing was changed by halves",
}


def describe_errors(app: FastAPI) -> None:
    """The OpenAPI document as the API answers: its error envelope (never FastAPI's 422), and bearer auth."""

    def document() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        components.setdefault("schemas", {})["Error"] = ENVELOPE
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for code, text in ERRORS.items():
                    responses[code] = {
                        "description": text,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    }
                if path != "/api/health":
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = document  # type: ignore[method-assign]


def is_api(request: Request) -> bool:
    return request.url.path == "/api" or request.url.path.startswith("/api/")


def install_error_handlers(app: FastAPI, html_pages: Callable[[Request], Response] | None = None) -> None:
    """The envelope for every error; `html_pages(request)` answers a path outside /api not found."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return failure(exc.status, exc.error, exc.details)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "body", "path"))
        return failure(400, f"Invalid {where or 'request'}: {first.get('msg', 'not accepted')}")

    @app.exception_handler(404)
    async def not_found(request: Request, _exc: Exception) -> Response:
        if not is_api(request) and html_pages is not None:  # a page's path mistyped: a page that says so
            return html_pages(request)
        return failure(404, "Not found", {"hint": "the API is described at /api/openapi.json"})

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        answer = failure(405, f"Method {request.method} not allowed here")
        allow = (getattr(exc, "headers", None) or {}).get("Allow")
        if allow:
            answer.headers["Allow"] = allow
        return answer

    @app.exception_handler(Exception)
    async def bug(_request: Request, exc: Exception) -> JSONResponse:
        # A bug, not an operator's mistake: its type reaches the journal, never the client.
        logger.bind(event="api_bug").error("HTTP request failed: {}", type(exc).__name__)
        return failure(500, "Internal error")
