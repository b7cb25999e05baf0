"""Log lines in the original runner's format: ``2022-06-01T12:00:00.123Z INFO message`` (UTC)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

__all__ = ["configure_logging"]


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING:
            record.levelname = "WARN"
        return super().format(record)


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> logging.Logger:
    """Configure the root logger once for the process and return kre-runner's logger.

    Only the CLI calls this; a library user keeps control of their own logging. Lines go to stdout
    unless ``stream`` says otherwise (``run-once`` keeps stdout for its JSON).
    """
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # nats-py logs every reconnect attempt at ERROR with a traceback; our callbacks say it in one line.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    return logging.getLogger("kre_runner")
