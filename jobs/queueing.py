"""The hand-over to the fleet's queue (SCRAPE_RUN_HANDOFF, SPEC §12): due retries are flipped to
the scraper's queued value, as many as the cap leaves room for, in one statement under the cap's
lock; the fleet's workers pick them up, set `running` and write the outcome. Nothing is started
or delivered here, so a pass needs no slot: one lane does it all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from loguru import logger

from db.engine import database_errors
from jobs.events import RetryEnded
from jobs.executors.queue import QueueExecutor
from jobs.model import Run, RunId
from jobs.outcomes import RetryOutcome
from jobs.runtime import Runtime


def queue_due_retries(rt: Runtime, run_id: object = None) -> list[Run]:
    """Flips due retries (or pending retry `run_id`, due or not) to the scraper's queued value, as
    many as the cap leaves room for, in one statement; returns the runs handed off."""
    q = rt.queries
    with database_errors(rt.engine, "handing retries to the fleet"), rt.engine.begin() as conn:
        conn.execute(q.handoff_lock)
        room = conn.execute(q.room, {"sr_max": rt.settings.max_concurrent_retries}).scalar_one()
        if room <= 0:
            return []
        params = {"sr_now": rt.clock.now(), "sr_limit": room, "sr_run_id": run_id}
        rows = conn.execute(q.queue_due if run_id is None else q.queue_one, params).mappings().all()
    return [Run.from_row(row, rt.runs.input_names) for row in rows]


class Queueing:
    """Hands due retries to the fleet's queue (the dispatch strategy of a `QueueExecutor`)."""

    def __init__(self, rt: Runtime, executor: QueueExecutor) -> None:
        self.rt, self.executor = rt, executor

    def drain(self, stop: threading.Event) -> list[RetryOutcome]:
        return self.work_slot(0, stop)

    def work_slot(self, slot: int, stop: threading.Event) -> list[RetryOutcome]:
        """Slot 0 hands over what is due; the others have nothing to do."""
        return self.hand_over() if slot == 0 and not stop.is_set() else []

    def run_now(self, run_id: RunId, stop: threading.Event, wait: Callable[[], None]) -> RetryOutcome | None:
        handed = self.hand_over(run_id)
        return handed[0] if handed else None

    def hand_over(self, run_id: RunId | None = None) -> list[RetryOutcome]:
        """Hands due retries (or pending retry `run_id`) to the fleet's queue."""
        outcomes = []
        for run in queue_due_retries(self.rt, run_id):
            logger.bind(run_id=str(run.id), chain=str(run.chain_id), attempt=run.retry_count, event="handed_off").info(
                "{}: handed to the fleet's workers ({})", run.label, self.rt.runs.layout.written(self.executor.state)
            )
            outcome = RetryOutcome(run.id, run.label, "handed_off")
            self.rt.events.publish(RetryEnded(outcome))
            outcomes.append(outcome)
        return outcomes
