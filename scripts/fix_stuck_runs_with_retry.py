#!/usr/bin/env python3
"""Fix stuck scrape runs now: a stuck-run sweep, then a pass over due retries.

The 3 a.m. script. It calls fix_stuck_runs_with_retry(max_duration_hours=1,
retry_delay_hours=4, max_retries=4) through the same code as `stuck-runs fix`, and takes the
same flags:

    python scripts/fix_stuck_runs_with_retry.py --dry-run
    python scripts/fix_stuck_runs_with_retry.py --stuck-after 2h --max-retries 4

Configuration (DATABASE_URL, SCRAPE_RUN_COMMAND...) comes from the environment and .env.
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing: the packages sit next to scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["fix", *sys.argv[1:]])
