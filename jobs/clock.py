"""Where time comes from. Services ask the clock; SQL gets `now` as a bound parameter.

`SystemClock` is the real one (freezegun steers it in tests). `ScaledClock` runs the demo: a
virtual day passes in seconds, so the story reads in hours exactly as in production.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def real(self, duration: timedelta) -> timedelta:
        """How long `duration` of clock time lasts on the wall."""
        return duration


class ScaledClock:
    """Clock time stands at `start` until `run()`, then runs `scale` times faster than the wall."""

    def __init__(self, start: datetime, scale: float) -> None:
        self._start = start
        self._scale = scale
        self._origin: float | None = None

    def run(self) -> None:
        """Clock time starts running from `start` now; later calls change nothing."""
        if self._origin is None:
            self._origin = time.monotonic()

    def now(self) -> datetime:
        if self._origin is None:
            return self._start
        return self._start + timedelta(seconds=(time.monotonic() - self._origin) * self._scale)

    def real(self, duration: timedelta) -> timedelta:
        return duration / self._scale
