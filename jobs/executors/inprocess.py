"""Executors that run the scraper in this very process (the tests' scripted scrapers, the demo's
simulated one): run here, with nothing to start, the work happening while it is waited for."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta

from jobs.executors.base import Strategies, T
from jobs.executors.outcome import RanHere
from jobs.model import Run


class InProcess:
    """Base for in-process executors: subclasses say what one attempt does in `execute`."""

    def dispatch_with(self, strategies: Strategies[T]) -> T:
        return strategies.run_here(self)

    def close(self) -> None:
        pass

    def start(self, run: Run) -> InProcessExecution:
        return InProcessExecution(self, run)

    def execute(self, run: Run, timeout: timedelta, cancel: threading.Event) -> RanHere:
        raise NotImplementedError


@dataclass
class InProcessExecution:
    executor: InProcess
    run: Run

    def wait(self, timeout: timedelta, cancel: threading.Event) -> RanHere:
        return self.executor.execute(self.run, timeout, cancel)
