"""The exact texts stuck-runs writes into a run's error column (SPEC §3), as templates.

jobs.rules fills them in Python; the set-based sweep renders the very same templates in SQL
(db/queries/sweep.py): one text, two renderers. They live here, at the bottom layer, because
both layers need them.
"""

STUCK_PATTERN = "stuck"
TIMEOUT_PATTERN = "timeout"

STUCK_ERROR = "Run stuck for {hours}"
NOT_STARTED_ERROR = "Run not started after {hours}"  # handed to the fleet's queue, never picked up
RETRY_SCHEDULED = "{error} - retry {number}/{budget} scheduled"
BUDGET_SPENT = "{error} - permanently failed after {attempts} attempts"  # retry attempts, as SPEC says
PERMANENT_ERROR = "{error} - not retried: permanent error ({pattern})"
TIMED_OUT = "Execution timed out after {hours}"
SUPERSEDED = "Superseded: run {run_id} completed"
CANCELLED_BY_OPERATOR = "Cancelled by operator"
# Exponential backoff doubles at most this often: 2^60 s is past any cap, and a float's limit far off.
MAX_DOUBLINGS = 60
