"""What the executors that run a scraper in its own process share: waiting for it with a timeout
and a cancel flag, and ending its whole process group once its attempt is over.

Nothing the scraper started outlives its attempt: when the attempt ends, for whatever reason,
what is left of its process group gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from jobs.model import Run

ERROR_LINE_CHARS = 500  # the part that goes into error_message
KILL_GRACE_SECONDS = 5  # between SIGTERM and SIGKILL
POLL_SECONDS = 0.2  # how often a wait looks at the cancel flag
GROUP_POLL_SECONDS = 0.05  # how often the end of an attempt looks for processes left behind


def run_environment(run: Run) -> dict[str, str]:
    """The run's fields as `SCRAPE_RUN_*` variables (JSON for structured inputs)."""
    fields: dict[str, Any] = {
        "id": run.id,
        "retry_count": run.retry_count,
        "max_retries": run.max_retries,
        "original_run_id": run.chain_id,
        **run.inputs,
    }
    env = {}
    for name, value in fields.items():
        if value is None:
            text = ""
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        env[f"SCRAPE_RUN_{name.upper()}"] = text
    env["SCRAPE_RUN_INPUTS"] = json.dumps(dict(run.inputs), default=str)
    return env


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:ERROR_LINE_CHARS] if lines else ""


def wait_until(finished: Callable[[float], bool], timeout: timedelta, cancel: threading.Event) -> str | None:
    """Waits until `finished(seconds)` (which blocks up to `seconds`) says done.

    Returns None when it finished, 'timeout' or 'cancel' when waiting had to stop. The cancel
    flag is looked at every POLL_SECONDS; a finished child is noticed at once.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    while not finished(max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))):
        if cancel.is_set():
            return "cancel"
        if time.monotonic() >= deadline:
            return "timeout"
    return None


def end_group(pgid: int, reaped: Callable[[], bool], grace: timedelta | None = None) -> None:
    """Ends what is left of the scraper's process group once its attempt is over.

    SIGTERM, then SIGKILL after the grace to whatever still runs. It waits for the whole group,
    not only the leader: a browser outliving its scraper would keep the memory and the site's
    session, and a retry would then run beside it. `reaped` reaps the leader and says whether
    it has exited. `grace`: how long SIGTERM is given before SIGKILL (an operator's cancel:
    CANCEL_TIMEOUT), else KILL_GRACE_SECONDS.
    """
    term_grace = KILL_GRACE_SECONDS if grace is None else grace.total_seconds()
    for sig, wait in ((signal.SIGTERM, term_grace), (signal.SIGKILL, KILL_GRACE_SECONDS)):
        if reaped() and not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except PermissionError:
            return  # what is left runs as another user (setuid): not ours to signal
        except ProcessLookupError:
            if reaped():
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pgid, sig)  # a spawned callable that has not made its group yet
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if reaped() and not _group_alive(pgid):
                return
            time.sleep(GROUP_POLL_SECONDS)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an orphan's zombie waits
    for PID 1 to reap it, which a container's init may never do."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a member runs as another user; /proc still tells whether one is alive
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except FileNotFoundError:
        return True  # no /proc: the signal probe is all there is
    for entry in entries:
        try:
            state, _parent, group = Path("/proc", entry, "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # exited while we looked
        if int(group) == pgid and state != "Z":
            return True
    return False
