"""A notification receiver on loopback, in a thread of the test: what Apprise's `json://` URL
posts to. `answer` says how it answers the next requests: ok (200), refuse (500), or hang for
some seconds before a 200."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self) -> None:
        self.received: list[dict] = []
        self.answer = "ok"
        self.hang_seconds = 0.0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.received.append({"path": self.path, **json.loads(body or b"{}")})
                if receiver.answer == "hang":
                    time.sleep(receiver.hang_seconds)
                status = 500 if receiver.answer == "refuse" else 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        # `close` waits for the loop to look: the default half second a test.
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "hooks/s3cretPathToken", **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"json://alerter:Pw-s3cret-4lert@127.0.0.1:{self.port}/{path}" + (f"?{query}" if query else "")

    def titles(self) -> list[str]:
        with self._lock:
            return [message["title"] for message in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def absent_url() -> str:
    """A json:// URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"json://alerter:Pw-s3cret-4lert@127.0.0.1:{port}/hooks/s3cretPathToken"
