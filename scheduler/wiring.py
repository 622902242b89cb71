"""The subscribers every process gives its runtime's events, in one place.

The CLI, `serve` and the daemon each call `wire` once on the runtime they open (the daemon then
adds its own: metrics, log lines, systemd's status, its records). A listener every process needs
(notifications, SPEC §15) is one more line here.
"""

from __future__ import annotations

from jobs.runtime import Runtime
from scheduler.records import JobRecords


def wire(rt: Runtime) -> Runtime:
    """Subscribes the job records of work done outside a daemon (`status` shows its last run)."""
    rt.events.subscribe(JobRecords(rt))
    return rt
