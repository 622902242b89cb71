"""Ctrl-C and SIGTERM for commands that change data: stop at a safe point, say what was done."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import click


class Interrupted(KeyboardInterrupt):
    """A signal while the result was being printed: the work had finished, the output stops."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOPPING = "finishing the current batch, putting executing retries back to pending_retry"


class Interruption:
    """SIGINT or SIGTERM during a command that changes data, turned into a request to stop.

    The work looks at `event` at its safe points: a sweep ends after its batch, executing
    retries go back to `pending_retry` (no budget spent), no new retry is claimed. The command
    then prints what was done and exits 128 + the signal's number. Once the work is over
    (`printing()`), a signal stops the output at once.
    """

    def __init__(self, stopping: str = STOPPING) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self._printing = False
        self._stopping = stopping

    def printing(self) -> None:
        """The work is done; what follows is output, which a signal may cut short."""
        self._printing = True

    def handle(self, signum: int, _frame: object) -> None:
        if self._printing:
            raise Interrupted(signum)
        if self.signum is None:
            self.signum = signum
            click.echo(f"stuck-runs: {signal.Signals(signum).name}: stopping safely ({self._stopping})…", err=True)
        self.event.set()

    def exit_code(self, otherwise: int) -> int:
        return otherwise if self.signum is None else 128 + self.signum

    def report(self) -> None:
        if self.signum is not None:
            click.echo(f"Interrupted by {signal.Signals(self.signum).name}: what is above was done; nothing else.")


@contextmanager
def interruptible(stopping: str = STOPPING) -> Iterator[Interruption]:
    """Catches SIGINT and SIGTERM for the duration, as an `Interruption` the work can watch;
    `stopping` says what the work does before it stops."""
    interruption = Interruption(stopping)
    if threading.current_thread() is not threading.main_thread():
        yield interruption  # signals reach the main thread only; nothing to catch here
        return
    previous = {sig: signal.signal(sig, interruption.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interruption
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
