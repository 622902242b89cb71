"""Who may ask, and what a request may hold (SPEC §13): the caller's role from a token or a
session cookie, the Host and Origin checks against another site's pages (CSRF, DNS rebinding),
and strict parameters and bodies: nothing unknown, repeated or half-read is ever acted on."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from fastapi import Depends, Request
from loguru import logger
from pydantic import BaseModel, ValidationError

from jobs.settings import is_loopback
from scheduler.web.answers import ApiError
from scheduler.web.auth import ADMIN, READ, SESSION_COOKIE, Tokens, bearer, same_origin

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BODY_BYTES = 64 * 1024
# A switch is `true` or `false`, nothing looser: `dry_run=no` must not run for real.
Flag = Literal["true", "false"]


def on(flag: Flag | None) -> bool:
    return flag == "true"


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


def foreign(request: Request) -> bool:
    """A browser's form post from another site (login CSRF); a client that sends no Origin is not a page."""
    headers = request.headers
    if headers.get("origin") is None and headers.get("sec-fetch-site") is None:
        return False
    return not same_origin(
        headers.get("origin"), headers.get("sec-fetch-site"), headers.get("host"), request.url.scheme
    )


def _need(caller: Caller, request: Request, role: str) -> str:
    granted = caller.role(request)
    if role == ADMIN and granted != ADMIN:
        raise ApiError(403, "This token may only read", {"role": granted})
    return granted


class Access:
    """The dependencies a route declares: `read` or `admin` (the role first, then the
    parameters: a wrong token is a 401 whatever else is wrong), `anyone` for /api/health."""

    def __init__(self, caller: Caller) -> None:
        def reader(request: Request) -> str:
            return _need(caller, request, READ)

        def administrator(request: Request) -> str:
            return _need(caller, request, ADMIN)

        self.read = [Depends(reader), Depends(checked_parameters)]
        self.admin = [Depends(administrator), Depends(checked_parameters)]
        self.anyone = [Depends(checked_parameters)]


def checked_parameters(request: Request) -> None:
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


def no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
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
        document = json.loads(raw, object_pairs_hook=no_repeated_keys)
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
