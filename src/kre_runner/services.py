"""The data services behind ``ctx.db``, ``ctx.measurement`` and ``ctx.prediction``.

Placeholder with the final API (to be completed by the services work, issue 3):
``open_services(settings, nc, logger) -> Services``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client

from .config import Settings

__all__ = ["Services", "open_services"]


@dataclass
class Services:
    db: Any = None
    measurement: Any = None
    prediction: Any = None
    influx: Any = None

    async def close(self, timeout: float) -> None:
        return None


async def open_services(settings: Settings, nc: Client, logger: logging.Logger) -> Services:
    return Services()
