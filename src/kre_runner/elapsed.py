"""The per-message timing points the original runner wrote, as InfluxDB line protocol.

``node_elapsed_time`` (every node) and ``workflow_elapsed_time`` (last node only), with the
original's tags and fields. Lines are formatted by hand on the hot path: the tag set is escaped
once at start, so a point costs one f-string (influxdb-client's ``Point`` costs ~10× more).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import Settings
from .envelope import KreNatsMessage, iso_to_unix
from .sinks.influx import escape_field_str, escape_tag

__all__ = ["ElapsedRecorder"]


def _string_field(value: str) -> str:
    return f'"{escape_field_str(value)}"'


class ElapsedRecorder:
    """Called once per handled message with the input envelope (before this node's entry is added)."""

    def __init__(self, settings: Settings, add_line: Callable[[str], None]) -> None:
        self._add = add_line
        self._is_last = settings.is_last_node
        base = f"version={escape_tag(settings.version)},workflow={escape_tag(settings.workflow_name)}"
        self._node_prefix = f"node_elapsed_time,node={escape_tag(settings.node_name)},{base} "
        self._workflow_prefix = f"workflow_elapsed_time,{base} "

    def __call__(self, envelope: KreNatsMessage, started: float, elapsed_ms: float) -> None:
        """``started``: Unix time the handler started; ``elapsed_ms``: how long it ran."""
        now_ns = time.time_ns()
        tracking = envelope.tracking
        tracking_id = _string_field(envelope.tracking_id)
        node_from = '""'
        waiting_ms = 0.0
        if tracking:  # the original crashed on a message without tracking entries
            previous = tracking[-1]
            node_from = _string_field(previous.node_name)
            previous_end = iso_to_unix(previous.end)
            if previous_end is not None:
                waiting_ms = (started - previous_end) * 1000.0
        self._add(f"{self._node_prefix}elapsed_ms={elapsed_ms:.3f},node_from={node_from},"
                  f"tracking_id={tracking_id},waiting_ms={waiting_ms:.3f} {now_ns}")
        if self._is_last and tracking:
            first_start = iso_to_unix(tracking[0].start)
            if first_start is not None:
                total_ms = (now_ns / 1e9 - first_start) * 1000.0
                self._add(f"{self._workflow_prefix}elapsed_ms={total_ms:.3f},tracking_id={tracking_id} {now_ns}")
