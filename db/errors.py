"""Errors meant for operators: each becomes one line and an exit code at the CLI entry.

They live at the bottom layer so db/ raises them as jobs/ and scheduler/ do.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0  # Everything asked for was done.
EXIT_REFUSED = 1  # Refused, or done in part (a run not found, a retry refused, a tick that failed).
EXIT_USAGE = 2  # Bad flags, bad configuration: nothing was touched.
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); a command that stopped safely on SIGTERM exits 143.


class OperatorError(Exception):
    """A mistake or a condition the operator can fix; the message says how."""

    exit_code = EXIT_REFUSED


class ConfigError(OperatorError):
    """A configuration value is missing or invalid; raised before the database is touched."""

    exit_code = EXIT_USAGE


class UsageError(OperatorError):
    """An argument is malformed (a run id that is not a UUID, say)."""

    exit_code = EXIT_USAGE


class DatabaseUnavailable(OperatorError):
    """The database could not be reached or answered with an error (password never included).

    `brief` says the same without where the database is: what a job's record keeps, which
    read-only callers of the API and the pages see."""

    def __init__(self, message: str, brief: str | None = None) -> None:
        super().__init__(message)
        self.brief = brief or message


class NotMigrated(OperatorError):
    """The table lacks the columns stuck-runs adds; `stuck-runs migrate` fixes it."""


class SchemaError(OperatorError):
    """The table's shape makes stuck-runs impossible (no `id`, a CHECK on status...)."""


class RunNotFound(OperatorError):
    """No row has the given id."""


class RetryRefused(OperatorError):
    """A manual retry that cannot be done; the message says why.

    `budget_spent` tells a spent budget from a run in the wrong state, and `details` carries
    what an API client reads (the run's status, or its attempts and last error)."""

    def __init__(
        self, message: str, *, budget_spent: bool = False, details: dict | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.budget_spent = budget_spent
        self.details = details or {}
        self.retry_after = retry_after  # seconds: the run is being delivered (a conflict, not a refusal for good)


class CancelRefused(OperatorError):
    """Nothing of the chain is pending: there is no retry to cancel."""

    def __init__(self, message: str, *, details: dict | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.details = details or {}
        self.retry_after = retry_after  # seconds: the retry is being delivered (a conflict, not a refusal for good)


class DueNowRefused(OperatorError):
    """Nothing of the chain is pending: there is no retry to make due now."""

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}
