"""The executors' protocols: how a due retry gets to a scraper. Two strategies, chosen once when
the executor is built (jobs/executors/wiring.py), never asked about afterwards:

- Run here (`RunsHere`: a command, a callable, an in-process scraper): the dispatcher claims the
  retry (`running`, its slot and run lock held), commits the claim, `start`s the scraper, then
  `wait`s for its `Execution` (jobs/running.py).
- Hand over (SPEC §12): the fleet runs the retry and writes its outcome itself.
  - `Delivers` (a webhook, Scrapyd), one retry at a time: the dispatcher marks
    the retry `running` as being delivered (with a lease), `deliver`s it with no session held,
    then confirms the delivery or puts the retry back (jobs/delivery.py).
  - `Queues` (SCRAPE_RUN_HANDOFF): due retries are flipped to the scraper's queued value in
    sets, for its own workers to pick up (jobs/queueing.py); nothing is delivered.

An executor says which strategy serves it by calling the matching method of the `Strategies` it
is given (`dispatch_with`): a new executor is one module that implements one of these protocols.
Executors only report what happened (jobs/executors/outcome.py); what it means for the row is
decided in one place (jobs/outcomes.py).
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Protocol, TypeVar, runtime_checkable

from db.errors import EXIT_USAGE, OperatorError
from jobs.executors.outcome import DeliveryOutcome, RanHere
from jobs.model import Run, RunId

T = TypeVar("T", covariant=True)


class ExecutorMisconfigured(OperatorError):
    """The configured executor cannot run a retry: its callable is not importable, its command not
    found. A configuration problem (exit 2), raised where executors are built and started."""

    exit_code = EXIT_USAGE


class StartFailed(ExecutorMisconfigured):
    """The scraper could not be started (its program vanished, lost its execute bit...): a
    configuration problem, not a failed attempt, so it spends no budget."""


class Strategies(Protocol[T]):
    """The ways retries are dispatched (jobs/retries.py builds one of each kind on demand)."""

    def run_here(self, executor: RunsHere) -> T:
        """Claim, commit, start, wait: for an executor that runs the scraper in this host."""

    def deliver(self, executor: Delivers) -> T:
        """Mark, deliver, confirm or put back: for an executor that hands one retry to the fleet."""

    def queue(self, executor: Queues) -> T:
        """Flip due retries to the fleet's queued value, in sets."""


class Executor(Protocol):
    """What every executor does, whatever its strategy."""

    def dispatch_with(self, strategies: Strategies[T]) -> T:
        """Calls the one method of `strategies` that serves this executor, and returns what it gives."""

    def close(self) -> None:
        """Lets go of what the executor holds (a webhook's pooled connections); idempotent."""


class Interrupt(threading.Event):
    """What stops the wait of a retry run here: a shutdown, or an operator's cancel (SPEC §16),
    whose `grace` (CANCEL_TIMEOUT) is what the scraper gets between SIGTERM and SIGKILL."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled_by: str | None = None
        self.grace: timedelta | None = None  # None: the shutdown's own grace

    def cancel(self, by: str, grace: timedelta) -> None:
        self.cancelled_by, self.grace = by, grace
        self.set()


def grace_of(cancel: threading.Event) -> timedelta | None:
    """The SIGTERM-to-SIGKILL grace an interrupted wait gives the scraper (None: the default)."""
    return cancel.grace if isinstance(cancel, Interrupt) else None


class Execution(Protocol):
    """A scraper started here for one attempt."""

    def wait(self, timeout: timedelta, cancel: threading.Event) -> RanHere:
        """Waits for the scraper; gives up after `timeout` (wall time: `TimedOut`) or when `cancel`
        is set (a shutdown: `Released`; an operator's `Interrupt.cancel`: the caller records it
        `Cancelled`). Nothing the scraper started outlives the wait."""


class RunsHere(Executor, Protocol):
    """Runs the scraper in this host's processes (or this process: tests, the demo)."""

    def start(self, run: Run) -> Execution:
        """Starts the scraper for `run` (its claim is committed) and returns at once; raises
        `StartFailed` when it cannot (the claim is then put back as it was)."""


class Delivers(Executor, Protocol):
    """Hands one retry at a time to the fleet (SPEC §12). `mode` is the `handed_off` value its marks
    write; `bound` the longest one delivery lasts (its lease is this plus a margin); `sends_again`
    below."""

    mode: str
    bound: timedelta
    # Whether a retry whose delivering process died (its lease ran out) is delivered again: a
    # webhook, with the same Idempotency-Key; Celery never (the stuck checker finds a lost task).
    sends_again: bool
    # How many deliveries a pass runs at once at most (jobs/delivery.py `lanes_for`); None: one per
    # slot of the cap (a delivery that waits for the fleet's answer, like a webhook's POST).
    lanes: int | None

    def deliver(self, run: Run, stop: threading.Event) -> DeliveryOutcome:
        """Delivers `run` (committed `running`, marked as being delivered) and reports the fleet's
        answer: `HandedOver`, `Failed` (refused), `Postponed`; `Released` when `stop` was set
        before anything was sent; `OutcomeUnknown` when given up on in flight. Never raises for
        what the fleet did; gives up on `stop` at once (Celery: once a send under way ends, within
        its `bound`)."""


@runtime_checkable
class KnowsItsJobs(Protocol):
    """A `Delivers` executor whose engine can tell which retries it has (by the retry's id as its
    job id, SPEC §16): a retry whose delivering process died, or whose delivery went unanswered
    (postponed), is delivered again only when the engine knows no job of that id, and a job that ended while its row is still `running` is a
    failed attempt (jobs/outcomes.py `fail_ended_jobs`)."""

    mode: str

    def has_job(self, run: Run, stop: threading.Event | None = None) -> DeliveryOutcome | None:
        """`HandedOver` when the engine knows a job of the run's id, None when it knows none;
        `Postponed` when it could not be asked, or gave up (its bound passed, or `stop` was set)."""

    def ended_jobs(self, runs: list[Run]) -> dict[RunId, str] | None:
        """Of `runs` (handed over, still `running`), those whose job the engine reports ended or
        no longer knows, each with its failed attempt's error; one question for them all. None
        when the engine could not be asked (nothing is judged then)."""


class Queues(Executor, Protocol):
    """Hands due retries to the fleet's own workers by flipping them to `state` (a state of
    STATUS_MAP, `queued`), in sets; the workers set `running` and write the outcome."""

    state: str


@runtime_checkable
class Cancels(Protocol):
    """An engine a handed-over run can be stopped in (SPEC §16's cancel)."""

    def cancel(self, run: Run, *, kill: bool) -> str:
        """Ask the engine to stop the run's job (`kill`: the forceful way, after CANCEL_TIMEOUT); what it answered, for the log.
        Raises when the engine could not be told."""

    def still_running(self, runs: list[Run]) -> list[Run] | None:
        """Those of `runs` whose job the engine still runs, one question for them all; None when
        the engine cannot be asked (it cannot tell)."""
