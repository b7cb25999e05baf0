"""Log lines: the original runner's text format or one JSON object a line, with the message they are about.

Text: ``2022-06-01T12:00:00.123Z INFO message`` (UTC, WARNING shown as WARN), as the original,
with `` [tracking_id=...]`` after the first line of a line about one message.
JSON: ``{"time", "level", "logger", "message", "node", "workflow"}`` plus ``tracking_id`` and
``seq`` on lines about one message and ``exception`` (the traceback) when there is one, so a log
store can find every line of one request.

Lines about a message pass ``extra={"tracking_id": ..., "seq": ...}``; lines the handler writes
through ``ctx.logger`` get the tracking id of the message being handled from :class:`TrackingFilter`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

__all__ = ["JsonFormatter", "TrackingFilter", "configure_logging", "no_tracking_id"]


def no_tracking_id() -> str | None:
    """The default source of the current message's tracking id: none (outside a consumer)."""
    return None


class TrackingFilter(logging.Filter):
    """Adds ``tracking_id`` to handler log records, from ``current()`` (the message being handled).

    ``current`` must be cheap and work from the event loop, a handler task or a handler thread; the
    consumer supplies it. A record that already carries a ``tracking_id`` keeps it.
    """

    def __init__(self, current: Callable[[], str | None] = no_tracking_id) -> None:
        super().__init__()
        self.current = current

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "tracking_id", None) is None:
            tracking_id = self.current()
            if tracking_id:
                record.tracking_id = tracking_id
        return True


class _TextFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING:
            record.levelname = "WARN"
        line = super().format(record)
        tracking_id = getattr(record, "tracking_id", None)
        if tracking_id:
            first, sep, rest = line.partition("\n")
            line = f"{first} [tracking_id={tracking_id}]{sep}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``fields`` (node, workflow) are added to every line."""

    def __init__(self, fields: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        seconds = record.created
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z",
            "level": "WARN" if record.levelno == logging.WARNING else record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._fields,
        }
        for key in ("tracking_id", "seq"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def _drop_ssl_eof_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("returning true from eof_received()")


def configure_logging(level: str = "INFO", fmt: str = "text", fields: Mapping[str, str] | None = None,
                      stream: TextIO | None = None) -> logging.Logger:
    """Configure the root logger once for the process and return kre-runner's logger.

    ``fmt`` is ``text`` or ``json``; ``fields`` go on every JSON line. Lines go to stdout unless
    ``stream`` says otherwise (``run-once`` keeps stdout for its JSON). Only the CLI calls this; a
    library user keeps control of their own logging.
    """
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(fields) if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel("WARNING" if level == "WARN" else level)
    # nats-py logs every reconnect attempt at ERROR with a traceback; our callbacks say it in one line.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    # asyncio warns on every TLS connection nats-py closes; it says nothing about the node.
    logging.getLogger("asyncio").addFilter(_drop_ssl_eof_warning)
    # aiohttp logs each probe request at INFO; only its errors matter here.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return logging.getLogger("kre_runner")
