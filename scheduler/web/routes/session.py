"""Signing in and out of the pages: a browser trades a token for a session cookie, and back."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from loguru import logger

from scheduler.web.answers import ApiError, failure
from scheduler.web.auth import SESSION_COOKIE, SESSION_SECONDS, Tokens, local_path
from scheduler.web.pages import login_page
from scheduler.web.security import Caller, bounded_body, foreign

MAX_FORM_BYTES = 4096


def build_session(tokens: Tokens, clock: Callable[[], float], caller: Caller) -> APIRouter:
    session = APIRouter(include_in_schema=False)

    @session.get("/login", include_in_schema=False)
    def sign_in(next: str = "/") -> Response:  # noqa: A002 - the parameter's name in the URL
        if not tokens.configured:  # loopback without tokens: the pages need no sign-in
            return RedirectResponse(local_path(next), status_code=303)
        return login_page(next_page=next)

    @session.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """A browser trades a token (form field `token`) for a session cookie."""
        if foreign(request):
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

    @session.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        if foreign(request):
            return failure(403, "Cross-origin request refused")
        cookie = request.cookies.get(SESSION_COOKIE)
        if tokens.session_role(cookie, clock()):  # valid until it expires: this process refuses it from now on
            caller.end_session(cookie)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return session
