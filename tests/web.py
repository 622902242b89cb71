"""`stuck-runs serve` for the HTTP tests: in-process (`InProcessWeb`, the app `serve` builds,
called through Starlette's TestClient: no process, no socket) for what a route answers, and as a
real process on loopback (`WebServer`) for what only a process shows: its start, its bind, its
log, its waiting for the database, a browser. Both have `client(token)` and `base`."""

from __future__ import annotations

import os
import socket
import sys
import time
import warnings

import httpx

from tests.daemons import FAKE_COMMAND, DaemonProcess

with warnings.catch_warnings():
    # Starlette asks for httpx2 at import; httpx is the project's client, and TestClient still takes it.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from starlette.testclient import TestClient

ADMIN = "adm-0123456789abcdef-token"
READER = "rdr-0123456789abcdef-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer(DaemonProcess):
    """A `serve` process; `client()` talks to it over real HTTP."""

    def __init__(self, db_url: str, *args: str, tokens: bool = True, ready: int = 200, **env: str) -> None:
        self.port = free_port()
        settings = {"ADMIN_PORT": str(self.port), **env}
        if tokens:
            settings = {"ADMIN_TOKEN": ADMIN, "READ_TOKEN": READER, **settings}
        super().__init__(db_url, sys.executable, "-m", "scheduler", "serve", *args, **settings)
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            self._wait_ready(ready)
        except BaseException:
            # Ended here: a serve left running is a ResourceWarning failing whichever test comes next.
            self.kill()
            raise

    def _wait_ready(self, health: int = 200, timeout: float = 120) -> None:
        """Until /api/health answers `health` (503: serving, its database not reached yet)."""
        deadline = time.monotonic() + timeout
        # One client for the polls: each new one loads the CA bundle (~25 ms of CPU) for plain HTTP.
        with httpx.Client(timeout=1, verify=False, trust_env=False) as probe:
            while time.monotonic() < deadline:
                if self.poll() is not None:
                    raise AssertionError(f"serve exited {self.returncode}: {self.output()}")
                try:
                    if probe.get(self.base + "/api/health").status_code == health:
                        return
                except httpx.TransportError:
                    time.sleep(0.05)
        raise AssertionError(f"serve did not answer within {timeout}s: {self.output()}")

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.base, headers=headers, timeout=30, follow_redirects=False)

    def stop(self, timeout: float = 30) -> str:
        """SIGTERM and everything it logged; again, what it logged the first time."""
        if not hasattr(self, "_stopped"):
            self._stopped = super().stop(timeout)
        return self._stopped


class InProcessWeb:
    """The app `serve` builds for these settings (`scheduler.web.serving`, the same factory and
    settings loading), answering in this process. Same arguments as `WebServer`; `port` is only
    the one named in the Host header and `base`, nothing listens on it."""

    def __init__(self, db_url: str, *args: str, tokens: bool = True, **env: str) -> None:
        from jobs.settings import load_settings
        from scheduler.cli.web import DATABASE_RETRY_SECONDS
        from scheduler.web import serving

        assert not args, "flags are for a real `serve`: use WebServer"
        self.port = free_port()
        settings = {"DATABASE_URL": db_url, "SCRAPE_RUN_COMMAND": FAKE_COMMAND, "ADMIN_PORT": str(self.port), **env}
        if tokens:
            settings = {"ADMIN_TOKEN": ADMIN, "READ_TOKEN": READER, **settings}
        self.app = serving(load_settings({**os.environ, **settings}), retry_seconds=DATABASE_RETRY_SECONDS)
        self.app.open_or_wait(on_error=lambda: None)
        assert self.app.runtime is not None, "the test database did not answer"
        self.base = f"http://127.0.0.1:{self.port}"
        self.clients: list[TestClient] = []

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        """A client as `WebServer.client` gives: no redirect followed, a server error an answer (not raised)."""
        if token:
            headers["Authorization"] = f"Bearer {token}"
        http = TestClient(
            self.app, base_url=self.base, headers=headers, follow_redirects=False, raise_server_exceptions=False
        )
        self.clients.append(http)
        return http

    def stop(self) -> None:
        for http in self.clients:
            http.close()
        self.app.close()


class ThreadedWebServer(InProcessWeb):
    """The app `serve` builds, served as `serve` serves it (uvicorn with serve's options, on a
    loopback socket) from a thread of this process: for a browser, which needs a real socket but
    not a process of its own (a `serve` process costs ~1 s of imports; its start, bind and log are
    WebServer's tests). Same `client(token)` and `base` as WebServer: real HTTP."""

    def __init__(self, db_url: str, **env: str) -> None:
        import threading

        import uvicorn

        super().__init__(db_url, **env)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        listening = socket.socket()
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listening.bind(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listening]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the threaded server did not start within 30 s")
            time.sleep(0.02)

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.base, headers=headers, timeout=30, follow_redirects=False)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the threaded server did not stop within 30 s"
        super().stop()
