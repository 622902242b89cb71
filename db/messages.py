"""The exact texts stuck-runs writes into a run's error column (SPEC §3), as templates.

jobs.rules fills them in Python; the set-based sweep renders the very same templates in SQL
(db/queries/sweep.py): one text, two renderers. They live here, at the bottom layer, because
both layers need them.
"""

STUCK_PATTERN = "stuck"
TIMEOUT_PATTERN = "timeout"

# A duration in a message: hours with one decimal (`1.2h`) from 0.1h (6 minutes) on; below that
# whole minutes elapsed (`5m`), and below a minute whole seconds (`45s`). No message says `0.0h`,
# and none rounds 3 to 6 minutes up to `0.1h`.
HOURS_FROM_SECONDS = 360
MINUTES_FROM_SECONDS = 60

STUCK_ERROR = "Run stuck for {hours}"
# SPEC §14: a run whose `progress` counter stood still for STALL_AFTER. Its failure_pattern is
# STUCK_PATTERN's: a stall is failed like a stuck run (the same budget, retry, dead letter, and
# the same late-completion rules and statistics), and the text tells the two apart.
STALLED_ERROR = "Run stalled: no progress for {hours}"
NOT_STARTED_ERROR = "Run not started after {hours}"  # handed to the fleet's queue, never picked up
RETRY_SCHEDULED = "{error} - retry {number}/{budget} scheduled"
# SPEC §3's exact text, whose number is the retries spent (the budget: `after 4 attempts` for 4/4),
# not the attempts counted with the original, as history and the budget refusal count them.
BUDGET_SPENT = "{error} - permanently failed after {attempts} attempts"
ATTEMPTS = "{count} attempts"
ONE_ATTEMPT = "1 attempt"
# How RETRY_SCHEDULED's text ends, as a regular expression: a message still stuck-runs' own (a
# varchar column keeps this tail when it cuts one), which a late completion clears.
RETRY_SCHEDULED_TAIL = r" - retry [0-9]+/[0-9]+ scheduled$"
PERMANENT_ERROR = "{error} - not retried: permanent error ({pattern})"
TIMED_OUT = "Execution timed out after {hours}"
SUPERSEDED = "Superseded: run {run_id} completed"
CANCELLED_BY_OPERATOR = "Cancelled by operator"
# Exponential backoff doubles at most this often: 2^60 s is past any cap, and a float's limit far off.
MAX_DOUBLINGS = 60
