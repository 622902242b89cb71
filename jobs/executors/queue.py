"""SCRAPE_RUN_HANDOFF (SPEC §12): due retries are flipped to the scraper's queued value for its
own workers, in sets (jobs/queueing.py); nothing is started or delivered here."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.executors.base import Strategies, T


@dataclass(frozen=True)
class QueueExecutor:
    state: str  # the state of STATUS_MAP the fleet's workers poll (`queued`)

    def dispatch_with(self, strategies: Strategies[T]) -> T:
        return strategies.queue(self)

    def close(self) -> None:
        pass
