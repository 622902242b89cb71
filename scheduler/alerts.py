"""The notifications' subscriber (SPEC §15): what the services publish becomes occurrences in
`stuck_runs_alerts`; a process that watches (a daemon, `serve`) also ticks, sending what is due.

A watching process does all of it in a thread of its own, fed by a queue: the publisher (a sweep,
a retry slot) only puts the event there, so a receiver that refuses, hangs or is gone never
delays or fails a sweep or a retry. A one-shot command (`check`, `fix`...) records what it found
in the table at once (its sweep has committed) and leaves the sending to the next tick of a
process that watches. A URL that cannot be reached is logged once, when it starts failing (never
its secrets), and once again when it takes messages again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial

from loguru import logger

from db.engine import describe_db_error
from jobs import alerting
from jobs.events import Event
from jobs.runtime import Runtime

TICK_AT_MOST = timedelta(seconds=30)  # how late a period's end may be noticed
TICK_AT_LEAST = timedelta(milliseconds=200)
STOP_WAIT = timedelta(seconds=15)  # a stopping process still records what it queued, for this long


class Alerts:
    """Subscriber of a process's events; `watch(stop)` makes it tick until `stop` is set."""

    def __init__(self, rt: Runtime, tick_every: timedelta | None = None) -> None:
        self.rt = rt
        self.started = rt.clock.now()  # a checker that never ran has been silent since this
        self._queue: queue.SimpleQueue[Event] | None = None
        self._failing: set[str] = set()  # URLs (masked) whose last message was not delivered
        self._down = False
        settings = rt.settings
        every = min(settings.alert_every / 4, settings.check_interval, TICK_AT_MOST)
        self.tick_every = tick_every or max(rt.clock.real(every), TICK_AT_LEAST)

    def __call__(self, event: Event) -> None:
        if self._queue is not None:
            self._queue.put(event)
            return
        self._guarded(lambda: self._note([event]))

    def watch(self, stop: threading.Event) -> threading.Thread:
        """Starts the thread that records queued events and ticks, until `stop` is set (then it
        records what is still queued and ends). Not a daemon thread: the process's exit waits for
        those records, a bounded while."""
        self._queue = queue.SimpleQueue()
        thread = threading.Thread(target=self._run, args=(stop,), name="alerts")
        thread.start()
        return thread

    def _run(self, stop: threading.Event) -> None:
        assert self._queue is not None
        next_tick = 0.0
        while True:
            wait = max(0.0, next_tick - time.monotonic())
            try:
                events = [self._queue.get(timeout=min(wait, 0.5) if not stop.is_set() else 0)]
            except queue.Empty:
                events = []
            while True:
                try:
                    events.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            noted = self._guarded(partial(self._note, events)) if events else False
            if stop.is_set():
                return
            if noted or time.monotonic() >= next_tick:  # what a sweep found goes out at once when due
                self._guarded(self._tick)
                next_tick = time.monotonic() + self.tick_every.total_seconds()

    def _note(self, events: list[Event]) -> bool:
        """Records what `events` hold; whether they held anything (a retry that started holds nothing)."""
        now = self.rt.clock.now()
        found = [occurrence for event in events for occurrence in alerting.occurrences_of(self.rt, event)]
        alerting.note(self.rt, found, now)
        return bool(found)

    def _tick(self) -> None:
        deliveries = alerting.tick(self.rt, self.started)
        for delivery in deliveries:
            self._log(delivery)
        logger.bind(event="alerts_tick").debug("notifications ticked: {} message(s) sent", len(deliveries))

    def _log(self, delivery: alerting.Delivery) -> None:
        shown = delivery.url.shown
        if delivery.delivered:
            if shown in self._failing:
                self._failing.discard(shown)
                logger.bind(event="alert_delivered").info("{} takes notifications again", shown)
            logger.bind(event="alert_sent", kind=delivery.kind).info("notified {}: {}", shown, delivery.title)
        elif shown not in self._failing:
            self._failing.add(shown)
            logger.bind(event="alert_failed", kind=delivery.kind).warning(
                "could not notify {} ({}): {}; its message goes with the next",
                shown,
                delivery.url.service,
                delivery.error,
            )

    def _guarded(self, work: Callable[[], object]) -> object:
        """`work()`; a database that does not answer (or a table `migrate` has not made yet) is
        logged when it starts and when it ends, never raised into the publisher (None then)."""
        try:
            done = work()
        except Exception as exc:  # noqa: BLE001 - notifications must never stop the work they report
            if not self._down:
                logger.bind(event="alerts_down").warning(
                    "notifications cannot reach their table (`stuck-runs migrate` makes it): {}",
                    describe_db_error(exc, self.rt.engine.url),
                )
            self._down = True
            return None
        if self._down:
            logger.bind(event="alerts_up").info("notifications reach their table again")
        self._down = False
        return done
