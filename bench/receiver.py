"""tests/receiver.py's receiver with a listen backlog a real receiver has (`python -m bench.receiver`).

http.server listens with a backlog of 5: past a few connections at once, the kernel resets or drops
the rest, and the hand-over would be measured against SYN retransmits. A production receiver
(uvicorn, gunicorn, nginx) listens with 2048; this one with 1024, and is otherwise the tests' own.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tests import receiver
from tests.fleet_worker import start_process

BACKLOG = 1024


def start(work: Path, database_url: str, table: str) -> receiver.Receiver:
    """The receiver in fleet mode, `--at-once` (it writes its row before it answers), on a free port."""
    directory = Path(tempfile.mkdtemp(prefix="receiver-", dir=work))
    port_file = directory / "port"
    receiver.write_script(directory / "script.json", [], "ok")
    args = ["--port-file", str(port_file), "--log", str(directory / "requests.jsonl")]
    args += ["--script", str(directory / "script.json"), "--database-url", database_url, "--table", table, "--at-once"]
    started = receiver.Receiver(start_process("bench.receiver", args, directory / "stderr.txt"), 0, directory)
    deadline = time.monotonic() + receiver.READY_TIMEOUT_SECONDS
    while not port_file.exists():
        if started.process.poll() is not None or time.monotonic() > deadline:
            started.stop()
            raise SystemExit(f"receiver did not start: {started.stderr()}")
        time.sleep(0.02)
    started.port = int(port_file.read_text())
    return started


if __name__ == "__main__":
    receiver.ScriptedServer.request_queue_size = BACKLOG
    sys.exit(receiver.main())
