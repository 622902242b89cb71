"""The JSON API of `stuck-runs serve` (SPEC §13): the CLI's service functions over HTTP.

Nothing is decided here that the services do not decide for the CLI: a retry refused over HTTP is
refused with the same reason. The routes live by concern in `scheduler.web.routes`; who may call
them and what a request may hold, in `scheduler.web.security`; the answers' envelope, in
`scheduler.web.answers`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from jobs.runtime import Runtime
from scheduler.web.answers import failure
from scheduler.web.auth import Tokens
from scheduler.web.routes import control, dead_letters, retries, runs, status, thresholds
from scheduler.web.security import Access, Caller

# The literal paths (`/runs/reset-stuck`, `/runs/retry`) before the patterns that match them too
# (`/runs/{run_id}`): see `refuse_other_methods`.
CONCERNS = (status, control, retries, runs, dead_letters, thresholds)


def build_api(
    rt: Runtime, tokens: Tokens, *, clock: Callable[[], float] = time.time, caller: Caller | None = None
) -> APIRouter:
    access = Access(caller or Caller(tokens, clock))
    api = APIRouter(prefix="/api")
    for concern in CONCERNS:
        concern.add_routes(api, rt, access)
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
