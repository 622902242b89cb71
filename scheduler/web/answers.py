"""The API's answers (SPEC §13): every answer an envelope, `{"success": true, ...}` or
`{"success": false, "error": ..., "details": {...}}`; no traceback and no secret ever reaches a client.
The services' operator errors become the API's errors here, once for every route and page."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger

from db.errors import CancelRefused, DatabaseUnavailable, DueNowRefused, OperatorError, RetryRefused, RunNotFound


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
