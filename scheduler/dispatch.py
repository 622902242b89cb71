"""Continuous dispatch: the daemon executes due retries beside the scheduler, not in its ticks.

One thread per slot (MAX_CONCURRENT_RETRIES) runs `RetryDispatcher.work_slot` — the same code
`stuck-runs process` drains with — then sleeps until DISPATCH_POLL passes or the retry
processor's tick wakes it. A retry due now starts within one poll of a slot being free
anywhere on the database; a long scrape never holds up the stuck checker. A database outage is
logged once when it starts and once when it ends.
"""

from __future__ import annotations

import threading
from datetime import timedelta

from loguru import logger

from db.engine import describe_db_error
from db.errors import OperatorError
from jobs.cancelling import engine_cancels
from jobs.retries import RetryDispatcher, RetryOutcome, continue_fleet_failures, follow_the_fleet
from jobs.runtime import Runtime


class ContinuousDispatch:
    def __init__(self, rt: Runtime, stopping: threading.Event) -> None:
        self.rt = rt
        self.stopping = stopping
        self.dispatcher = RetryDispatcher(rt, rt.settings.policy)  # it publishes each start and end
        self.poll = rt.clock.real(rt.settings.dispatch_poll)
        slots = range(rt.settings.max_concurrent_retries)
        self._wake = [threading.Event() for _ in slots]
        self._threads = [
            threading.Thread(target=self._work, args=(slot,), name=f"retry-slot-{slot}", daemon=True) for slot in slots
        ]
        self._finished: list[RetryOutcome] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def tick(self, stop: threading.Event) -> list[RetryOutcome]:
        """The retry processor's pass hands the due retries to the slots (`process_due_retries`'s
        `dispatch`): wakes them, and reports what they finished since the last tick."""
        if not self.rt.settings.hands_off:  # retries handed off before a change of executor (else: each poll)
            # Not published, as the slots' below: the fleet's outcomes are the fleet's (stats show them).
            self.add_finished(continue_fleet_failures(self.rt))
        self.poke()
        return list(self.take_finished())

    def poke(self) -> None:
        """Look for due retries now (the retry processor's tick)."""
        for event in self._wake:
            event.set()

    def add_finished(self, outcomes: list[RetryOutcome]) -> None:
        with self._lock:
            self._finished.extend(outcomes)

    def take_finished(self) -> tuple[RetryOutcome, ...]:
        """The executions finished since the last call, for the tick's record."""
        with self._lock:
            finished, self._finished = tuple(self._finished), []
        return finished

    def join(self, timeout: timedelta) -> bool:
        """Waits for the slot threads after a stop; False if one is still busy at the deadline."""
        self.poke()
        for thread in self._threads:
            thread.join(timeout.total_seconds())
        return not any(thread.is_alive() for thread in self._threads)

    def _work(self, slot: int) -> None:
        failing = False
        while not self.stopping.is_set():
            try:
                # Retries handed to the fleet end in the fleet: its failures continue their chains
                # within a poll, not at the next processor tick.
                # Not published: the metrics count hand-offs; their outcomes are the fleet's (stats show them).
                handed = follow_the_fleet(self.rt) if slot == 0 and self.rt.settings.hands_off else []
                if slot == 0:  # operators' cancels of retries handed to an engine (SPEC §16), within a poll
                    engine_cancels(self.rt)
                outcomes = handed + self.dispatcher.work_slot(slot, self.stopping)
            except Exception as exc:  # noqa: BLE001 - an outage must not end the slot's thread
                if not failing:
                    reason = str(exc) if isinstance(exc, OperatorError) else describe_db_error(exc, self.rt.engine.url)
                    logger.bind(event="dispatch_error").error("retry slot {} cannot dispatch: {}", slot, reason)
                failing = True
            else:
                if failing:
                    logger.bind(event="dispatch_recovered").info("retry slot {} dispatches again", slot)
                failing = False
                with self._lock:
                    self._finished.extend(outcomes)
            self._wake[slot].wait(self.poll.total_seconds())
            self._wake[slot].clear()
