"""Tracking timestamps as Unix time, cheaply, and the last node's workflow duration computed from them."""

from __future__ import annotations

from .counters import NodeMetrics
from .envelope import KreNatsMessage, iso_to_unix

__all__ = ["TimestampParser", "WorkflowClock"]


class TimestampParser:
    """Tracking timestamps as Unix time, remembering the second of a ``YYYY-MM-DDTHH:MM:SS.ffffff`` one:
    the next timestamps of that second (most of them) cost a slice and an ``int``."""

    def __init__(self) -> None:
        self.second_text = ""  # "YYYY-MM-DDTHH:MM:SS." of the last timestamp parsed, and its Unix time
        self.second_unix = 0.0

    def __call__(self, timestamp: str) -> float | None:
        if timestamp[:20] == self.second_text and len(timestamp) == 26 and timestamp[20:].isdigit():
            return self.second_unix + int(timestamp[20:]) / 1e6
        value = iso_to_unix(timestamp)
        if value is not None and len(timestamp) == 26 and timestamp[19] == "." and timestamp[20:].isdigit():
            self.second_text = timestamp[:20]
            self.second_unix = value - int(timestamp[20:]) / 1e6
        return value


class WorkflowClock:
    """The last node's ``kre_workflow_duration_seconds``: from the first tracking entry's start to now."""

    def __init__(self) -> None:
        self._unix = TimestampParser()

    def observe(self, envelope: KreNatsMessage, ended: float, metrics: NodeMetrics) -> None:
        if envelope.tracking:
            first_start = self._unix(envelope.tracking[0].start)
            if first_start is not None:
                metrics.observe_workflow(max(0.0, ended - first_start))
