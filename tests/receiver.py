"""A webhook receiver in a process of its own, for the §12 tests and the chaos harness (or, for
tests where the process is not the point, the same server in a thread: `start_threaded_receiver`).

    python -m tests.receiver --port-file PATH --log PATH --script PATH [--secret S] [--port N]
        [--database-url URL --table NAME [--fail-every N] [--at-once]] [--log-answers]

Every request (any method, any path) is logged on arrival, before it is answered, as one JSON
line. What request i (0-based) is answered is read from the script at that moment (a test may
rewrite it while the receiver runs): `{"answers": [token, ...], "default": token}` gives
answers[i], or the default past the list; a script that cannot be read means "ok". Tokens:
ok, ok:NNN (2xx), status:NNN, 429[:SECONDS], 503[:SECONDS] (Retry-After), hang:SECONDS (then
202), cut[:NNN] (the status line and headers of NNN, default 202, then the connection closed
before the body, as a receiver killed mid-answer leaves it), reset (RST, no answer),
redirect-other (307 to 127.0.0.2), redirect-same (307 to /redirected).

Fleet mode (--database-url and --table): a 2xx answer to a JSON body with an "id" hands the run
to a background "scrape" that completes its row a moment later (every Nth accepted run fails
with a 503 under --fail-every N); an Idempotency-Key already accepted is answered 200
`{"duplicate": true}` and not run again. `{"event": ...}` lines record each scrape's end.
With --log-answers each request's line carries an id (`"n"`) and an `{"event": "answered", "n":
...}` line follows once its answer went out in full: an answer the process died in the middle
of (or the client gave up on) has none.
With --at-once the fleet is as fast as a fleet can be: it writes `completed` conditionally
(`... WHERE status = 'running'`, as SPEC §12 lets a fleet write) before it even answers.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.fleet_worker import quote_table, start_process, stop_process

SIGNATURE_HEADER = "X-Stuck-Runs-Signature"
SCRAPE_SECONDS = (0.2, 0.5)
FLEET_ERROR = "HTTP Error 503: Service Unavailable"
READY_TIMEOUT_SECONDS = 15


@dataclass(frozen=True)
class Answer:
    """What one request gets; `reset` closes the connection instead of answering."""

    status: int = 202
    body: bytes = b'{"accepted": true}'
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay_seconds: float = 0.0
    reset: bool = False
    drip_seconds: float = 0.0  # headers sent a byte every 0.2 s for this long, then the answer
    cut: bool = False  # the status line and headers sent, then the connection closed before the body

    @property
    def accepts(self) -> bool:
        return not self.reset and 200 <= self.status < 300


DUPLICATE = Answer(status=200, body=b'{"duplicate": true}')


def _text(status: int, headers: tuple[tuple[str, str], ...] = (), body: str | None = None) -> Answer:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Status"
    text = body if body is not None else f"{status} {phrase}\n"
    return Answer(status=status, body=text.encode(), content_type="text/plain; charset=utf-8", headers=headers)


def answer_for(token: str, port: int) -> Answer:
    """The answer a script token stands for; an unknown token is a 500 naming it."""
    name, _, argument = token.partition(":")
    try:
        if name == "ok":
            return Answer(status=int(argument) if argument else 202)
        if name == "status":
            return _text(int(argument))
        if name in ("429", "503"):
            return _text(int(name), (("Retry-After", str(int(argument))),) if argument else ())
        if name == "drip":  # a receiver (or proxy) that never stalls long enough for a read timeout
            return Answer(drip_seconds=float(argument))
        if name == "hang":
            return Answer(delay_seconds=float(argument))
        if token == "reset":
            return Answer(reset=True)
        if name == "cut":
            return Answer(status=int(argument) if argument else 202, cut=True)
        if token == "redirect-other":
            return _text(307, (("Location", f"http://127.0.0.2:{port}/elsewhere"),))
        if name == "redirect-same":  # redirect-same:302 answers that code instead of 307
            return _text(int(argument) if argument else 307, (("Location", "/redirected"),))
    except ValueError:
        pass
    return _text(500, body=f"receiver: unknown script token {token!r}\n")


def token_at(script: Path, index: int) -> str:
    try:
        data = json.loads(script.read_text())
        answers, default = list(data.get("answers", [])), data.get("default", "ok")
    except (OSError, ValueError, AttributeError, TypeError):
        return "ok"
    return str(answers[index] if index < len(answers) else default)


def signature_ok(secret: str | None, header: str | None, body: bytes) -> bool | None:
    if secret is None:
        return None
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest((header or "").encode("latin-1", "replace"), expected.encode())


def run_id_in(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return str(data["id"]) if isinstance(data, dict) and data.get("id") is not None else None


class JsonLog:
    """One JSON object a line, appended and flushed under a lock, so lines never interleave."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({**record, "at": time.time()}) + "\n"
        with self.lock, open(self.path, "a") as log:
            log.write(line)
            log.flush()


class Fleet:
    """The scrapers behind the webhook: each accepted key runs once, writing its row at the end."""

    def __init__(self, url: str, table: str, fail_every: int | None, log: JsonLog, at_once: bool = False) -> None:
        import sqlalchemy as sa

        url = url.replace("postgresql://", "postgresql+psycopg2://", 1)  # as stuck-runs reads it
        self.engine = sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
        target = quote_table(table)
        self.complete = sa.text(f"UPDATE {target} SET status = 'completed', completed_at = now() WHERE id::text = :id")
        self.fail = sa.text(
            f"UPDATE {target} SET status = 'failed', error_message = :error, completed_at = now() WHERE id::text = :id"
        )
        self.fail_every, self.log, self.at_once = fail_every, log, at_once
        if at_once:  # no delay, and only over `running`: what a fleet may rely on (SPEC §12)
            self.complete = sa.text(
                f"UPDATE {target} SET status = 'completed', completed_at = now() "
                "WHERE id::text = :id AND status = 'running'"
            )
        self.lock = threading.Lock()
        self.keys: set[str] = set()
        self.accepted = 0

    def admit(self, key: str | None) -> int | None:
        """The run's number (1-based) among accepted runs; None when its key was accepted before."""
        with self.lock:
            if key is not None:
                if key in self.keys:
                    return None
                self.keys.add(key)
            self.accepted += 1
            return self.accepted

    def scrape(self, run_id: str, number: int) -> None:
        if not self.at_once:
            time.sleep(random.uniform(*SCRAPE_SECONDS))
        failing = bool(self.fail_every) and number % self.fail_every == 0
        try:
            # Blocks while stuck-runs still holds the row lock of its hand-over: expected.
            with self.engine.begin() as conn:
                if failing:
                    conn.execute(self.fail, {"id": run_id, "error": FLEET_ERROR})
                else:
                    conn.execute(self.complete, {"id": run_id})
        except Exception as exc:  # noqa: BLE001 - the database may be restarted under a scrape
            self.log.write({"event": "db_error", "id": run_id, "error": str(exc).splitlines()[0]})
            return
        self.log.write({"event": "failed" if failing else "completed", "id": run_id})


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True
    # A real receiver's listen backlog (uvicorn and nginx: 2048), not http.server's 5: a process
    # marking its lanes' retries in one transaction sends as many POSTs at once, and the kernel
    # resets connections past the backlog (postponed deliveries the test would read as lost).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], args: argparse.Namespace) -> None:
        super().__init__(address, ScriptedHandler)
        self.port = self.server_address[1]
        self.script = Path(args.script)
        self.secret = args.secret
        self.log = JsonLog(args.log)
        self.log_answers = args.log_answers
        fleet = args.database_url and Fleet(args.database_url, args.table, args.fail_every, self.log, args.at_once)
        self.fleet = fleet or None
        self.lock = threading.Lock()
        self.received = 0

    def next_token(self) -> tuple[int, str]:
        """This request's number in the process and the script's answer for it."""
        with self.lock:
            index, self.received = self.received, self.received + 1
        return index, token_at(self.script, index)


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method is answered from the script
            return self.handle_any
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the JSON log says it all
        pass

    def handle_any(self) -> None:
        body = self._read_body()
        server = self.server
        index, token = server.next_token()
        answer = answer_for(token, server.port)
        key = self.headers.get("Idempotency-Key")
        run_id = run_id_in(body) if server.fleet and answer.accepts else None
        number = server.fleet.admit(key) if run_id is not None else None
        if run_id is not None and number is None:
            token, answer = "duplicate", DUPLICATE
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            headers[name.lower()] = f"{headers[name.lower()]}, {value}" if name.lower() in headers else value
        # Which request, for its `answered` line: the count restarts with the process, the pid not.
        n = f"{os.getpid()}-{index}" if server.log_answers else None
        server.log.write(
            {
                **({"n": n} if n else {}),
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
                "key": key,
                "signature_ok": signature_ok(server.secret, self.headers.get(SIGNATURE_HEADER), body),
                "answer": token,
            }
        )
        if number is not None and server.fleet.at_once:
            server.fleet.scrape(run_id, number)  # written before the answer: the fastest fleet there is
            number = None
        try:
            self._send(answer)
        except OSError:
            self.close_connection = True  # the client gave up (its timeout); the run was accepted anyway
        else:
            if n and not (answer.reset or answer.cut):
                server.log.write({"event": "answered", "n": n})
        if number is not None:
            threading.Thread(target=server.fleet.scrape, args=(run_id, number), daemon=True).start()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, answer: Answer) -> None:
        if answer.delay_seconds:
            time.sleep(answer.delay_seconds)
        if answer.reset:
            # Linger on with a zero timeout: close() sends RST, the client sees a reset.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            os.close(self.connection.detach())
            self.close_connection = True
            return
        if answer.drip_seconds:
            self.wfile.write(b"HTTP/1.1 202 Accepted\r\nX-Drip: ")
            deadline = time.monotonic() + answer.drip_seconds
            while time.monotonic() < deadline:
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return  # the client gave up
                time.sleep(0.2)
            self.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
            return
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        bodiless = answer.status in (204, 304) or self.command == "HEAD"
        if answer.status not in (204, 304):
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if answer.cut:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the client reads the headers, then the end
            self.close_connection = True
            return
        if not bodiless:
            self.wfile.write(answer.body)


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_script(path: Path, answers: list[str] | tuple[str, ...], default: str) -> None:
    write_atomically(path, json.dumps({"answers": list(answers), "default": default}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.receiver", description=__doc__.split("\n")[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--script", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret")
    parser.add_argument("--database-url")
    parser.add_argument("--table")
    parser.add_argument("--fail-every", type=int)
    parser.add_argument("--at-once", action="store_true")
    parser.add_argument("--log-answers", action="store_true", help="log when each answer went out in full")
    args = parser.parse_args(argv)
    if bool(args.database_url) != bool(args.table):
        parser.error("--database-url and --table go together (fleet mode needs both)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = ScriptedServer(("127.0.0.1", args.port), args)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    # A short poll: `shutdown` waits for the loop to look, and a test waits for the process's end
    # (the default half second was most of each webhook test's teardown).
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    write_atomically(Path(args.port_file), str(server.port))
    while not stopping.wait(1):
        pass
    server.shutdown()
    server.server_close()
    return 0


# --- for tests: the receiver as a real process ---------------------------------------------


@dataclass
class Receiver:
    """A running receiver; `url` is its base (`http://127.0.0.1:PORT`), paths are the test's."""

    process: subprocess.Popen
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "requests.jsonl"

    @property
    def script(self) -> Path:
        return self.directory / "script.json"

    def lines(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def requests(self) -> list[dict]:
        return [line for line in self.lines() if "event" not in line]

    def events(self) -> list[dict]:
        return [line for line in self.lines() if "event" in line]

    def set_script(self, answers: list[str] | tuple[str, ...] = (), default: str = "ok") -> None:
        """Answers for the requests still to come, counted from the receiver's first request."""
        write_script(self.script, answers, default)

    def stderr(self) -> str:
        path = self.directory / "stderr.txt"
        return path.read_text() if path.exists() else ""

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM and wait (SIGKILL if it will not go); its exit code."""
        return stop_process(self.process, timeout)


class ThreadedReceiver(Receiver):
    """The same receiver (the same server, script, log and fleet) served from a thread of this
    process, for tests where its being a process of its own is not the point: a receiver process
    costs an interpreter's start and its imports. `stop` ends the server; what it read is as
    the process's."""

    def __init__(self, directory: Path, args: list[str]) -> None:
        self.process = None  # type: ignore[assignment]
        self.directory = directory
        self.server = ScriptedServer(("127.0.0.1", 0), parse_args(args))
        self.port = self.server.port
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, name="receiver", daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float = 10) -> int:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout)
            self.server.server_close()
            if self.server.fleet is not None:
                self.server.fleet.engine.dispose()
        return 0


def _receiver_args(
    directory: Path,
    script: dict | list[str] | tuple[str, ...] | None,
    secret: str | None,
    database_url: str | None,
    table: str | None,
    fail_every: int | None,
    at_once: bool,
    log_answers: bool = False,
) -> list[str]:
    """The receiver's command line in `directory`, its script written there."""
    if isinstance(script, dict):
        answers, default = script.get("answers", []), script.get("default", "ok")
    else:
        answers, default = list(script or []), "ok"
    args = ["--port-file", str(directory / "port"), "--log", str(directory / "requests.jsonl")]
    args += ["--script", str(directory / "script.json")]
    for flag, value in (("--secret", secret), ("--database-url", database_url), ("--table", table)):
        if value is not None:
            args += [flag, value]
    if fail_every is not None:
        args += ["--fail-every", str(fail_every)]
    if at_once:
        args.append("--at-once")
    if log_answers:
        args.append("--log-answers")
    write_script(directory / "script.json", answers, default)
    return args


def start_threaded_receiver(
    tmp_path: Path,
    script: dict | list[str] | tuple[str, ...] | None = None,
    secret: str | None = None,
    database_url: str | None = None,
    table: str | None = None,
    fail_every: int | None = None,
    at_once: bool = False,
) -> ThreadedReceiver:
    """`start_receiver`'s receiver in a thread of this process (same arguments, same reading)."""
    directory = Path(tempfile.mkdtemp(prefix="receiver-", dir=tmp_path))
    return ThreadedReceiver(
        directory, _receiver_args(directory, script, secret, database_url, table, fail_every, at_once)
    )


def start_receiver(
    tmp_path: Path,
    script: dict | list[str] | tuple[str, ...] | None = None,
    secret: str | None = None,
    database_url: str | None = None,
    table: str | None = None,
    fail_every: int | None = None,
    at_once: bool = False,
    log_answers: bool = False,
) -> Receiver:
    """Starts `python -m tests.receiver` in a directory of its own under tmp_path and waits for
    its port. `script` is `{"answers": [...], "default": ...}` or just the answers (then "ok")."""
    directory = Path(tempfile.mkdtemp(prefix="receiver-", dir=tmp_path))
    args = _receiver_args(directory, script, secret, database_url, table, fail_every, at_once, log_answers)
    port_file = directory / "port"
    receiver = Receiver(start_process("tests.receiver", args, directory / "stderr.txt"), 0, directory)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not port_file.exists():
        if receiver.process.poll() is not None or time.monotonic() > deadline:
            receiver.stop()
            raise AssertionError(f"receiver did not start: {receiver.stderr()}")
        time.sleep(0.02)
    receiver.port = int(port_file.read_text())
    return receiver


if __name__ == "__main__":
    sys.exit(main())
