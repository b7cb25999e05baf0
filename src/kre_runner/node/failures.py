"""Handler failures in the log: tracebacks for the first few a minute, then one line counting the rest."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most ``per_minute`` full lines (with traceback) a minute; the rest are counted in one line.

    A handler failing on every message must not flood the log with tracebacks, yet the first ones
    are what a developer needs. Call :meth:`flush` now and then (the node does, every few seconds)
    so the count of suppressed lines comes out even when failures stop.
    """

    def __init__(self, logger: logging.Logger, what: str, per_minute: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._what = what
        self._per_minute = per_minute
        self._clock = clock
        self._window_start = clock()
        self._logged = 0
        self.suppressed = 0  # in the current window
        self.suppressed_total = 0

    def log(self, level: int, msg: str, *args: object, exc_info: BaseException | None = None,
            extra: Mapping[str, object] | None = None) -> bool:
        """Log ``msg`` (with ``exc_info``'s traceback) unless this minute's quota is used; True if logged."""
        now = self._clock()
        if now - self._window_start >= 60.0:
            self._roll(now)
        if self._logged >= self._per_minute:
            self.suppressed += 1
            self.suppressed_total += 1
            return False
        self._logged += 1
        self._logger.log(level, msg, *args, exc_info=exc_info, extra=extra)
        return True

    def flush(self) -> None:
        """Say how many lines were suppressed once their minute is over."""
        now = self._clock()
        if now - self._window_start >= 60.0:
            self._roll(now)

    def _roll(self, now: float) -> None:
        if self.suppressed:
            self._logger.warning("%d more %s in the last %.0f s (not logged one by one; %d per minute are)",
                                 self.suppressed, self._what, now - self._window_start, self._per_minute)
        self._window_start = now
        self._logged = 0
        self.suppressed = 0
