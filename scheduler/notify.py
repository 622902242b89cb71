"""systemd's notify protocol: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1.

One datagram per message to $NOTIFY_SOCKET (an abstract socket when it starts with '@'); no
effect when the variable is unset. Written here rather than taken from a package: the protocol
is a single `sendto`, `sdnotify` on PyPI has been unmaintained since 2017 and `systemd-python`
needs libsystemd's headers to build.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from datetime import timedelta

from loguru import logger

from jobs.events import DAEMON, JOB_IDS, Event, JobRunsEnded


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self._watchdog = (
            timedelta(microseconds=int(usec)) if usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        )
        # Sent to from the watchdog job, the jobs' status and a stop, each a thread of its own: one
        # socket, opened under the lock; none once closed (a last watchdog ping may come after).
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_interval(self) -> timedelta | None:
        """How often to send WATCHDOG=1: half of systemd's WatchdogSec, None when not asked."""
        return self._watchdog / 2 if self._watchdog else None

    def send(self, *fields: str) -> None:
        if not self._address:
            return
        try:
            with self._lock:
                if self._closed:
                    return
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            logger.warning("could not notify systemd at {}: {}", self._address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._socket is not None:
                self._socket.close()
                self._socket = None


class JobsStatus:
    """Subscriber (the daemon's): systemd's STATUS line, each job's last run and what it did
    (`stuck_run_checker 09:00:00 failed=1, ...; retry_processor ...`)."""

    def __init__(self, notifier: Notifier, stopping: threading.Event) -> None:
        self.notifier, self.stopping = notifier, stopping
        self._last: dict[str, str] = {}

    def __call__(self, event: Event) -> None:
        if not isinstance(event, JobRunsEnded) or event.via != DAEMON:
            return
        for run in event.runs:
            self._last[run.job_id] = f"{run.job_id} {event.started:%H:%M:%S} {run.summary}"
        if not self.stopping.is_set():  # "stopping" stays the last word
            self.notifier.status("; ".join(self._last[j] for j in JOB_IDS if j in self._last))
