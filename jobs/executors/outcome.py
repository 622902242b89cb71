"""How one retry attempt ended, as an executor reports it: exactly one of a few named outcomes.

A retry run here ends `Completed`, `Failed`, `TimedOut` or `Released` (a shutdown stopped it);
`Cancelled` is an operator's doing (SPEC §16). A retry handed to the fleet is `HandedOver`,
`Failed` (the fleet refused it: a failed attempt, as the failure patterns decide), `Postponed`
(the fleet could not take it now: due again later, no budget spent), `Released` (stopping before
anything was sent) or `OutcomeUnknown` (given up on while the delivery was in flight: the fleet
may still get it).

An executor only reports what happened; what it means for the row is decided in one place
(`record_outcome`, jobs/outcomes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


def clean(text: str) -> str:
    """Text an answer (or an error) brought, fit for a log line and the error column: no NUL
    (PostgreSQL refuses it), no control characters (a terminal would obey them)."""
    return "".join(c if c.isprintable() else " " for c in text)


@dataclass(frozen=True)
class Completed:
    """The scraper finished successfully."""

    detail: str | None = None  # its stderr tail: kept if it wrote `failed` itself after all


@dataclass(frozen=True)
class Failed:
    """A failed attempt: its budget is spent, the failure patterns (SPEC §7) decide what follows."""

    error: str  # one line, for the error column
    pattern: str | None = None  # None: classified from `error` (then `detail`)
    retry_after: timedelta | None = None  # when the scraper or the fleet said when to try again
    detail: str | None = None  # stderr tail or traceback, for the dead letter


@dataclass(frozen=True)
class TimedOut:
    """The attempt outlasted its limit (EXECUTION_TIMEOUT, else the run's own: SPEC §14), or its
    progress stood still, and was killed: a failed attempt (`timeout`)."""

    detail: str | None = None
    error: str | None = None  # what the error column says (`Execution timed out after 6.0h`, `Run stalled: ...`)


@dataclass(frozen=True)
class Released:
    """Stopped by a shutdown (a signal) before it ended: handed back, due as it was, no budget spent."""

    detail: str | None = None


@dataclass(frozen=True)
class Cancelled:
    """Stopped by an operator (SPEC §16): no budget spent, no retry scheduled (jobs/cancelling.py)."""

    by: str | None = None


@dataclass(frozen=True)
class HandedOver:
    """The fleet took the retry (SPEC §12): its outcome is the scraper's to write."""

    how: str  # the `handed_off` value: "webhook", "queue"


@dataclass(frozen=True)
class Postponed:
    """The fleet could not take the retry now (429, 503, unreachable): due again later, no budget
    spent. `retry_after`: when the fleet said; else the postponement backs off on its own scale
    (jobs/outcomes.py `postponement`)."""

    error: str
    retry_after: timedelta | None = None


@dataclass(frozen=True)
class Misconfigured:
    """The fleet refused the configuration, not the retry (Scrapyd's `{"status": "error"}`: an
    unknown project or spider, a refused argument): the retry goes back pending as it was, no
    budget spent, no postponement counted; said once, and tried again at the next pass."""

    error: str


@dataclass(frozen=True)
class OutcomeUnknown:
    """A delivery given up on while in flight (its bound passed, or a signal): the fleet may still
    get it, so the retry is not due again before its delivery's lease ends. `stopping`: given up
    for a signal (then released, no postponement counted), else postponed."""

    error: str
    stopping: bool = False


# What an execution here reports (`Execution.wait`).
RanHere = Completed | Failed | TimedOut | Released | Cancelled
# What a delivery to the fleet reports (`Delivers.deliver`).
DeliveryOutcome = HandedOver | Failed | Postponed | Released | OutcomeUnknown | Misconfigured
# The closed set: every outcome an attempt can have.
Outcome = Completed | Failed | TimedOut | Released | Cancelled | HandedOver | Postponed | OutcomeUnknown | Misconfigured
