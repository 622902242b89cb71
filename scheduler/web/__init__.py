"""`stuck-runs serve`: the JSON API and operators' pages (SPEC §13), over the CLI's services."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import Response
from loguru import logger

from db.errors import DatabaseUnavailable
from jobs.runtime import Runtime
from jobs.settings import Settings
from scheduler.web.answers import failure, install_error_handlers, install_timing
from scheduler.web.api import build_api
from scheduler.web.auth import Tokens
from scheduler.web.openapi import describe_errors
from scheduler.web.pages import build_pages, not_found_page, render
from scheduler.web.routes.session import build_session
from scheduler.web.security import Caller
from scheduler.wiring import wire


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
    app.include_router(build_session(tokens, clock, caller))
    describe_errors(app)
    return app


def serving(settings: Settings, *, retry_seconds: float) -> Starting:
    """The ASGI app `serve` runs for `settings` (the tests run theirs in-process from here too)."""
    return Starting(settings, Tokens(settings.admin_token, settings.read_token), retry_seconds=retry_seconds)


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
        runtime = wire(Runtime.open(self.settings, role="web"), watch=self.stopping)  # sends notifications too
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
