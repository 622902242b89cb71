"""`stuck-runs serve`: the JSON API and operators' pages (SPEC §13), over the CLI's services."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from loguru import logger

from db.errors import DatabaseUnavailable
from jobs.config import Settings
from jobs.runtime import Runtime
from scheduler.web.api import (
    ApiError,
    Caller,
    bounded_body,
    build_api,
    describe_errors,
    failure,
    install_error_handlers,
    install_timing,
)
from scheduler.web.auth import SESSION_COOKIE, SESSION_SECONDS, Tokens, local_path, same_origin
from scheduler.web.pages import build_pages, login_page, not_found_page, render
from scheduler.wiring import wire

MAX_FORM_BYTES = 4096


def create_app(rt: Runtime, tokens: Tokens, *, clock: Callable[[], float] = time.time) -> FastAPI:
    from importlib.metadata import version

    app = FastAPI(
        title="stuck-runs",
        version=version("stuck-runs"),
        description="Stuck scrape runs failed honestly, retried with a budget. The README's 'The HTTP API' tells the rest.",
        openapi_url="/api/openapi.json",
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # `/api/runs/` is not found, not a 307 to somewhere else
    )
    install_error_handlers(app, html_pages=lambda request: not_found_page(request.url.path))
    install_timing(app)
    caller = Caller(tokens, clock)  # one for the API and the pages: a signed-out cookie is out of both
    app.include_router(build_api(rt, tokens, clock=clock, caller=caller))
    app.include_router(build_pages(rt, tokens, clock, caller=caller))
    describe_errors(app)

    @app.get("/login", include_in_schema=False)
    def sign_in(next: str = "/") -> Response:  # noqa: A002 - the parameter's name in the URL
        if not tokens.configured:  # loopback without tokens: the pages need no sign-in
            return RedirectResponse(local_path(next), status_code=303)
        return login_page(next_page=next)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """A browser trades a token (form field `token`) for a session cookie."""
        if _foreign(request):
            return failure(403, "Cross-origin request refused")
        try:
            body = await bounded_body(request, MAX_FORM_BYTES)
        except ApiError as exc:
            return failure(exc.status, "Form too large")
        form = parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        going = local_path((form.get("next") or ["/"])[0])  # a page of ours, never another host
        role = tokens.role_of(token) if tokens.configured else None
        if role is None:
            client = request.client.host if request.client else "?"
            logger.bind(event="api_bad_token").warning("refused a wrong token from {} at /login", client)
            if "text/html" in request.headers.get("accept", ""):  # the sign-in page's own form
                return login_page("That token is neither ADMIN_TOKEN nor READ_TOKEN.", 401, going)
            return failure(401, "Invalid token")
        response = RedirectResponse(going, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            tokens.session_cookie(role, clock()),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        if _foreign(request):
            return failure(403, "Cross-origin request refused")
        cookie = request.cookies.get(SESSION_COOKIE)
        if tokens.session_role(cookie, clock()):  # valid until it expires: this process refuses it from now on
            caller.end_session(cookie)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return app


def _foreign(request: Request) -> bool:
    """A browser's form post from another site (login CSRF); a client that sends no Origin is not a page."""
    headers = request.headers
    if headers.get("origin") is None and headers.get("sec-fetch-site") is None:
        return False
    return not same_origin(
        headers.get("origin"), headers.get("sec-fetch-site"), headers.get("host"), request.url.scheme
    )


class Starting:
    """The ASGI app `serve` runs: the real one once the database answered, until then a stand-in
    that answers 503 (the API's envelope under /api, a page saying so elsewhere). `serve` started
    during a database outage waits for it, trying again every `retry_seconds`, and never exits
    for it: under systemd, `Restart=on-failure` would turn the outage into a restart loop."""

    def __init__(self, settings: Settings, tokens: Tokens, *, retry_seconds: float) -> None:
        self.settings, self.tokens, self.retry_seconds = settings, tokens, retry_seconds
        self.runtime: Runtime | None = None
        self.failure: Exception | None = None
        self.stopping = threading.Event()
        self.current: Callable = self._waiting

    def open_or_wait(self, *, on_error: Callable[[], None]) -> None:
        """Opens the runtime now, or starts waiting for the database in a thread. Any other error
        (no such table, a bad mapping) is raised now, or, found later, kept and `on_error()` called."""
        try:
            self._open()
        except DatabaseUnavailable as exc:
            self._say_waiting(exc)
            threading.Thread(target=self._wait, args=(on_error,), name="wait-for-database", daemon=True).start()

    def _open(self) -> None:
        runtime = wire(Runtime.open(self.settings, role="web"))
        self.runtime = runtime
        self.current = create_app(runtime, self.tokens)

    def _say_waiting(self, exc: Exception) -> None:
        logger.bind(event="serve_waiting").error(
            "{}; waiting for the database, trying again every {:g}s", exc, self.retry_seconds
        )

    def _wait(self, on_error: Callable[[], None]) -> None:
        while not self.stopping.wait(self.retry_seconds):
            try:
                self._open()
            except DatabaseUnavailable as exc:
                self._say_waiting(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - raised again in the main thread, by `raise_failure`
                self.failure = exc
                on_error()
                return
            logger.bind(event="serve_database").info("the database answered: serving")
            return

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self.stopping.set()
        if self.runtime is not None:
            self.runtime.close()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await self.current(scope, receive, send)

    async def _waiting(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        reason = f"waiting for the database; trying again every {self.retry_seconds:g}s"
        if scope["path"].startswith("/api/") or scope["path"] == "/api":
            answer: Response = failure(503, "Database unavailable", {"reason": reason})
        else:
            answer = render(
                "error.html",
                503,
                error="Waiting for the database",
                details={"why": "stuck-runs cannot reach its database yet", "what it does": reason},
                navigation=False,
            )
        answer.headers["Retry-After"] = str(max(1, round(self.retry_seconds)))
        await answer(scope, receive, send)
