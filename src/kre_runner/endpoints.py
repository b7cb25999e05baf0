"""The node's HTTP endpoint (``KRT_HTTP_PORT``): ``/healthz``, ``/readyz``, ``/metrics``, ``/info``.

Served by aiohttp on the node's event loop: answering at all proves the loop is not stuck, which is
what liveness means. A sync ``init`` runs off the loop, so the probes answer while a model loads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .connection import StartupError
from .health import Health

__all__ = ["Endpoints"]


class Endpoints:
    """Start with :meth:`start` before connecting to NATS, stop with :meth:`stop` after the drain."""

    def __init__(self, port: int, health: Health, registry: CollectorRegistry, info: Callable[[], dict[str, Any]],
                 logger: logging.Logger, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self._health = health
        self._registry = registry
        self._info = info
        self._log = logger
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/info", self._info_handler)
        # No access log: probes every few seconds would drown the node's own lines.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise StartupError(f"cannot serve HTTP on port {self.port} (KRT_HTTP_PORT): {exc.strerror or exc}; "
                               f"choose a free port, or KRT_HTTP_PORT=0 to turn the endpoint off") from None
        self._log.info("HTTP on :%d: /healthz /readyz /metrics /info", self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def _status(ok: bool, reason: str) -> web.Response:
        return web.json_response({"status": "ok" if ok else "unavailable", "reason": reason},
                                 status=200 if ok else 503)

    async def _healthz(self, request: web.Request) -> web.Response:
        return self._status(*self._health.liveness())

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._status(*self._health.readiness())

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self._registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _info_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self._info(), dumps=lambda obj: json.dumps(obj, indent=2, default=str))
