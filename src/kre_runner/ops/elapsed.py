"""The per-message timing points the original runner wrote, as InfluxDB line protocol.

``node_elapsed_time`` (every node) and ``workflow_elapsed_time`` (last node only), with the
original's tags and fields. This runs once per message, so lines are formatted by hand: the tag
set is escaped once at start, a line is one ``%`` on a template, and the previous node's
tracking timestamp is parsed with a cache of its date-and-time part (``datetime`` parsing was
the largest cost of a point). influxdb-client's ``Point`` costs ~10× more.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import Settings
from ..node.envelope import KreNatsMessage, KreNatsMessageV3
from ..node.timing import TimestampParser
from ..services.influx import escape_field_str, escape_tag

__all__ = ["ElapsedRecorder", "ElapsedRecorderV3"]


class ElapsedRecorder:
    """Called once per handled message with the input envelope (before this node's entry is added)."""

    def __init__(self, settings: Settings, add_line: Callable[[str], None]) -> None:
        self._add = add_line
        self._is_last = settings.is_last_node
        base = f"version={escape_tag(settings.version)},workflow={escape_tag(settings.workflow_name)}"
        # Templates for ``%``: a literal % in a tag must not be read as a conversion.
        node_prefix = f"node_elapsed_time,node={escape_tag(settings.node_name)},{base} ".replace("%", "%%")
        self._node_line = node_prefix + 'elapsed_ms=%.3f,node_from="%s",tracking_id="%s",waiting_ms=%.3f %d'
        workflow_prefix = f"workflow_elapsed_time,{base} ".replace("%", "%%")
        self._workflow_line = workflow_prefix + 'elapsed_ms=%.3f,tracking_id="%s" %d'
        self._unix = TimestampParser()

    def __call__(self, envelope: KreNatsMessage, started: float, ended: float) -> None:
        """``started``/``ended``: Unix times the handler started and returned."""
        tracking = envelope.tracking
        tracking_id = envelope.tracking_id
        if '"' in tracking_id or "\\" in tracking_id:
            tracking_id = escape_field_str(tracking_id)
        node_from = ""
        waiting_ms = 0.0
        if tracking:  # the original crashed on a message without tracking entries
            previous = tracking[-1]
            node_from = previous.node_name
            if '"' in node_from or "\\" in node_from:
                node_from = escape_field_str(node_from)
            end = previous.end
            # TimestampParser's cached case, inline (once per message): same second as the last one.
            parser = self._unix
            if end[:20] == parser.second_text and len(end) == 26 and end[20:].isdigit():
                waiting_ms = (started - parser.second_unix - int(end[20:]) / 1e6) * 1000.0
            else:
                previous_end = parser(end)
                if previous_end is not None:
                    waiting_ms = (started - previous_end) * 1000.0
        ns = time.time_ns()
        self._add(self._node_line % ((ended - started) * 1000.0, node_from, tracking_id, waiting_ms, ns))
        if self._is_last and tracking:
            first_start = self._unix(tracking[0].start)
            if first_start is not None:
                self._add(self._workflow_line % ((ended - first_start) * 1000.0, tracking_id, ns))


class ElapsedRecorderV3:
    """KRE 3.x's ``node_elapsed_time`` point: tags ``from_node``, ``version``, ``workflow``, ``node``; fields
    ``elapsed_ms`` and ``success``; once per input, whether its handler returned or raised."""

    def __init__(self, settings: Settings, add_line: Callable[[str], None]) -> None:
        self._add = add_line
        node = escape_tag(settings.node_name).replace("%", "%%")
        version, workflow = escape_tag(settings.version), escape_tag(settings.workflow_name)
        base = f"version={version},workflow={workflow}".replace("%", "%%")
        self._line = f"node_elapsed_time,from_node=%s,node={node},{base} elapsed_ms=%.3f,success=%s %d"
        self._tags: dict[str, str] = {}  # from_node -> its escaped tag value (few upstream nodes)

    def __call__(self, envelope: KreNatsMessageV3, started: float, ended: float, success: bool = True) -> None:
        from_node = envelope.from_node
        tag = self._tags.get(from_node)
        if tag is None:
            tag = escape_tag(from_node) or "unknown"  # an empty tag value is invalid line protocol
            if len(self._tags) < 1024:
                self._tags[from_node] = tag
        self._add(self._line % (tag, (ended - started) * 1000.0, "true" if success else "false", time.time_ns()))
