"""`stuck-runs serve`: the HTTP API (and, later, the pages) on the same services as the CLI."""

from __future__ import annotations

import errno
import socket

import click

from db.errors import EXIT_OK, ConfigError
from jobs.settings import is_loopback
from scheduler.cli import ALERTS, cli, config_options

DATABASE_RETRY_SECONDS = 2  # while the database cannot be reached at start
# `serve` sends notifications too, and notices a silent checker by CHECK_INTERVAL.
SERVE = (
    "ADMIN_HOST",
    "ADMIN_PORT",
    "SCRAPE_RUNS_TABLE",
    "STUCK_AFTER",
    "RETRY_DELAY",
    "MAX_RETRIES",
    "CHECK_INTERVAL",
    *ALERTS,
)


@cli.command()
@config_options(*SERVE)
@click.pass_context
def serve(ctx: click.Context) -> int:
    """Serve the JSON API and the operators' pages on ADMIN_HOST:ADMIN_PORT (127.0.0.1:8080) until SIGTERM.

    The pages: open http://127.0.0.1:8080/ in a browser (overview, runs, a chain's timeline with
    its retry and cancel buttons, dead letters, stats) and sign in with a token. The API is
    described at /api/openapi.json.

    ADMIN_TOKEN may do everything, READ_TOKEN only read (both from the environment, never
    flags: `ps` shows flags). Without ADMIN_TOKEN it listens on loopback only. A database that
    does not answer at start is waited for: /api/health answers 503 until it does.

    \b
    Examples:
      stuck-runs serve
      ADMIN_TOKEN=$(cat /etc/stuck-runs/admin.token) stuck-runs serve --host 0.0.0.0
      curl -X POST -H "Authorization: Bearer $ADMIN_TOKEN" \\
           'http://127.0.0.1:8080/api/runs/reset-stuck?timeout_minutes=30&dry_run=true'
    """
    from scheduler.cli import load_settings

    settings = load_settings(ctx)
    if not settings.admin_token and not is_loopback(settings.admin_host):
        name = "--host" if "ADMIN_HOST" in ctx.meta.get("stuck_runs.flags", {}) else "ADMIN_HOST"
        raise ConfigError(
            f"{name}={settings.admin_host} is reachable from other hosts, and ADMIN_TOKEN is not set (or empty): "
            "set ADMIN_TOKEN (and READ_TOKEN for read-only access), or listen on 127.0.0.1"
        )
    import uvicorn
    from loguru import logger

    from scheduler.web import serving

    app = serving(settings, retry_seconds=DATABASE_RETRY_SECONDS)
    config = uvicorn.Config(
        app,
        host=settings.admin_host,
        port=settings.admin_port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
        lifespan="off",  # the app may be the stand-in that says the database is not reached yet
    )
    server = _notifying_server()(config)
    # The first try here: a missing table or a bad mapping exits 2 at once, as before. A database
    # that does not answer is waited for (a restart loop under systemd helps nobody).
    app.open_or_wait(on_error=lambda: setattr(server, "should_exit", True))
    listening = _listen(settings.admin_host, settings.admin_port)
    logger.bind(event="serve").info(
        "serving the API and pages on http://{}:{} ({})",
        f"[{settings.admin_host}]" if ":" in settings.admin_host else settings.admin_host,
        settings.admin_port,
        "tokens required" if settings.admin_token or settings.read_token else "loopback only, no token",
    )
    try:
        server.run(sockets=[listening])
    finally:
        app.close()
    app.raise_failure()  # a table or mapping problem found once the database answered: exits as at start
    return EXIT_OK


def _notifying_server() -> type:
    import uvicorn

    from scheduler.notify import Notifier

    class NotifyingServer(uvicorn.Server):
        """uvicorn's server, telling systemd READY=1 once it listens (Type=notify)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                notifier = Notifier()
                notifier.ready(f"serving on {self.config.host}:{self.config.port}")
                notifier.close()  # the one message serve sends

    return NotifyingServer


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one line, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by every accepted connection: without it, a response written as headers then body
    # waits for the client's delayed ACK, 40 ms on every keep-alive request after the first.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror:
        sock.close()
        raise ConfigError(f"ADMIN_HOST={host} is not an address of this host: use 127.0.0.1, 0.0.0.0 or ::") from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"cannot listen on {host}:{port}: another process uses the port; choose another with ADMIN_PORT or --port"
            ) from None
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): use an address of this host "
            "(127.0.0.1, 0.0.0.0, ::) and a port this user may take"
        ) from None
    return sock
