"""The node's HTTP endpoint (``KRT_HTTP_PORT``): ``/healthz``, ``/readyz``, ``/metrics``, ``/info``.

Served by aiohttp on a thread and event loop of its own, so the probes answer while the node's loop
is busy with what must run on it: a sync ``init`` loading a model (it runs on the thread the sync
handlers run on, which by default is the loop's), or a slow sync handler. Whether that loop is stuck
is what liveness asks, and :class:`~kre_runner.ops.health.Health` answers it from the loop's heartbeat.
What the handlers read is plain state the node's loop writes (numbers, phases); the histograms fold
under a lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import nats.aio.client
from aiohttp import web
from nats.aio.client import Client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .. import __version__
from ..config import Settings, redacted_settings
from ..errors import StartupError
from ..handler import UserCode
from ..node.counters import NodeMetrics
from .health import Health

__all__ = ["Endpoints", "info_document"]


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Serve on a thread of its own; raises :class:`StartupError` when the port cannot be had."""
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:
                started.set_exception(exc)
                loop.close()
                return
            started.set_result(None)
            try:
                loop.run_forever()
            finally:
                if self._runner is not None:
                    loop.run_until_complete(self._runner.cleanup())
                loop.close()

        self._loop = loop
        # A daemon thread: the process must never wait for it at exit.
        self._thread = threading.Thread(target=serve, name="kre-http", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(started)
        except BaseException:
            self._thread = self._loop = None
            raise
        self._log.info("HTTP on %s:%d: /healthz /readyz /metrics /info", self.host, self.port)

    async def _serve(self) -> None:
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
            raise StartupError(f"cannot serve HTTP on port {self.port} (KRT_HTTP_PORT) of {self.host} (KRT_HTTP_HOST): "
                               f"{exc.strerror or exc}; choose a free port (and an address of this host), or "
                               f"KRT_HTTP_PORT=0 to turn the endpoint off") from None

    async def stop(self) -> None:
        """Stop serving and wait for the thread (its loop closes the listening socket first)."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)

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


def info_document(settings: Settings, code: UserCode | None, health: Health, metrics: NodeMetrics,
                  nc: Client | None) -> dict[str, Any]:
    """``/info``: what runs here, in the spirit of KGrid's ``/info``; secrets redacted. ``code`` and ``nc``
    are None until the handler is loaded and NATS connected."""
    server = None
    if nc is not None and nc.is_connected:
        with contextlib.suppress(Exception):
            server = str(nc.connected_server_version)
    return {
        "name": "kre-runner",
        "version": __version__,
        "python": platform.python_version(),
        "nats_py": nats.aio.client.__version__,
        "nats_server": server,
        "node": settings.node_name,
        "workflow": settings.workflow_name,
        "workflow_version": settings.version,
        "generation": settings.generation,
        "generation_reason": settings.generation_reason,
        "handler": {"spec": settings.handler_path, "path": str(code.path),
                    "function": getattr(code.handler, "__name__", "handler"), "async": code.handler_is_async,
                    "init": code.init is not None, "threads": settings.handler_threads} if code is not None else
                   {"spec": settings.handler_path},
        "phase": health.phase,
        "uptime_seconds": round(time.monotonic() - health.started, 3),
        # Names only: what the node reads and writes, never the values.
        "buckets": {"configuration": settings.configuration_buckets, "object_store": settings.object_store},
        "processed": metrics.processed,
        "errors": metrics.errors,
        "settings": redacted_settings(settings),
    }
