"""`stuck-runs serve` as a real process on loopback, for the API and browser tests."""

from __future__ import annotations

import socket
import sys
import time

import httpx

from tests.daemons import DaemonProcess

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
        self._wait_ready(ready)

    def _wait_ready(self, health: int = 200, timeout: float = 30) -> None:
        """Until /api/health answers `health` (503: serving, its database not reached yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll() is not None:
                raise AssertionError(f"serve exited {self.returncode}: {self.output()}")
            try:
                if httpx.get(self.base + "/api/health", timeout=1).status_code == health:
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
