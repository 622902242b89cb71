"""A retry executing here is judged by its own clock (SPEC §14): its progress counter is read
while it runs, and when the value stands still for its stall limit (`STALL_AFTER`, else its own
limit) the execution is stopped like a timeout, said stalled.

The watcher stops the execution through the event its `wait` already watches for a shutdown;
`stalled_for` tells the two apart afterwards.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from loguru import logger

from jobs.model import Run
from jobs.rules import format_duration
from jobs.runtime import Runtime

LOOK_EVERY = timedelta(seconds=5)  # how often the counter is read, at most (clock time)
STOP_POLL_SECONDS = 0.05  # how soon a shutdown reaches the execution through the watcher


class ProgressWatch:
    """Watches `run`'s progress while it executes; `cancel` is what the execution waits on."""

    def __init__(self, rt: Runtime, run: Run, stall: timedelta, stop: threading.Event) -> None:
        self.rt, self.run, self.stall, self.stop = rt, run, stall, stop
        self.cancel = threading.Event()
        self.stalled_for: timedelta | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressWatch:
        if self.rt.queries.progress_now is None:
            return self  # no progress role: the shutdown event is watched as it is
        self._thread = threading.Thread(target=self._watch, name=f"progress-{self.run.id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def event(self) -> threading.Event:
        """The event the execution stops on: the shutdown itself, or the watcher's."""
        return self.stop if self._thread is None else self.cancel

    def _watch(self) -> None:
        clock = self.rt.clock
        look_every = max(min(clock.real(LOOK_EVERY), clock.real(self.stall) / 4).total_seconds(), STOP_POLL_SECONDS)
        value, since = _UNREAD, clock.now()  # the first reading starts the clock
        next_look = time.monotonic()
        while not self._done.wait(STOP_POLL_SECONDS):
            if self.stop.is_set():
                self.cancel.set()
                return
            if time.monotonic() < next_look:
                continue
            next_look = time.monotonic() + look_every
            seen, now = self._read(), clock.now()
            if seen is _UNREAD:
                continue  # an outage is no progress to judge: the next look tries again
            if seen != value:
                value, since = seen, now
            elif value is not None and now - since > self.stall:  # a NULL progress never stalls
                self.stalled_for = now - since
                logger.bind(run_id=str(self.run.id), event="stalled").warning(
                    "{}: no progress for {}, stopping it", self.run.label, format_duration(now - since)
                )
                self.cancel.set()
                return

    def _read(self) -> object:
        try:
            with self.rt.engine.connect() as conn:
                return conn.execute(self.rt.queries.progress_now, {"sr_run_id": self.run.id}).scalar()
        except Exception:  # noqa: BLE001 - an outage is no progress to judge
            return _UNREAD


_UNREAD = object()  # a reading that failed
