"""The subscribers every process gives its runtime's events, in one place.

The CLI, `serve` and the daemon each call `wire` once on the runtime they open (the daemon then
adds its own: metrics, log lines, systemd's status, its records). A listener every process needs
(notifications, SPEC §15) is one more line here.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from scheduler.records import JobRecords

if TYPE_CHECKING:
    from jobs.runtime import Runtime


def wire(rt: Runtime, *, watch: threading.Event | None = None) -> Runtime:
    """Subscribes the job records of work done outside a daemon (`status` shows its last run), and,
    with ALERT_URLS, the notifications. A process that watches (a daemon, `serve`) passes the event
    that stops it as `watch`: it then also sends the notifications that are due, from a thread of
    its own."""
    rt.events.subscribe(JobRecords(rt))
    if rt.settings.alert_urls:
        # Imported only here: without ALERT_URLS (most `check` runs) the alerts' code is not loaded.
        from scheduler.alerts import Alerts

        alerts = Alerts(rt)
        rt.events.subscribe(alerts)
        if watch is not None:
            alerts.watch(watch)
    return rt
