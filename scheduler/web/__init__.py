"""`stuck-runs serve`: the JSON API and operators' pages (SPEC §13), over the CLI's services."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from loguru import logger

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
from scheduler.web.auth import SESSION_COOKIE, SESSION_SECONDS, Tokens, same_origin
from scheduler.web.pages import build_pages, login_page

MAX_FORM_BYTES = 4096


def create_app(rt: Runtime, tokens: Tokens, *, clock: Callable[[], float] = time.time) -> FastAPI:
    from importlib.metadata import version

    app = FastAPI(
        title="stuck-runs",
        version=version("stuck-runs"),
        description="Stuck scrape runs failed honestly, retried with a budget (SPEC §13).",
        openapi_url="/api/openapi.json",
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # `/api/runs/` is not found, not a 307 to somewhere else
    )
    install_error_handlers(app)
    install_timing(app)
    caller = Caller(tokens, clock)  # one for the API and the pages: a signed-out cookie is out of both
    app.include_router(build_api(rt, tokens, clock=clock, caller=caller))
    app.include_router(build_pages(rt, tokens, clock, caller=caller))
    describe_errors(app)

    @app.get("/login", include_in_schema=False)
    def sign_in() -> Response:
        if not tokens.configured:  # loopback without tokens: the pages need no sign-in
            return RedirectResponse("/", status_code=303)
        return login_page()

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """A browser trades a token (form field `token`) for a session cookie."""
        if _foreign(request):
            return failure(403, "Cross-origin request refused")
        try:
            body = await bounded_body(request, MAX_FORM_BYTES)
        except ApiError as exc:
            return failure(exc.status, "Form too large")
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        role = tokens.role_of(token) if tokens.configured else None
        if role is None:
            client = request.client.host if request.client else "?"
            logger.bind(event="api_bad_token").warning("refused a wrong token from {} at /login", client)
            if "text/html" in request.headers.get("accept", ""):  # the sign-in page's own form
                return login_page("That token is neither ADMIN_TOKEN nor READ_TOKEN.", 401)
            return failure(401, "Invalid token")
        response = RedirectResponse("/", status_code=303)
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

