"""Assembling a node: connect, check the stream, open services, run ``init``, consume, close."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.aio.client
from google.protobuf.message import Message

from .config import Settings, redact_url
from .context import Context, ContextV3
from .errors import StartupError
from .handler import UserCode, load_user_code
from .nats.connection import check_jetstream, connect
from .nats.fast import probe
from .node.consumer import Consumer
from .node.counters import NodeMetrics
from .node.failures import RateLimitedLog
from .ops.elapsed import ElapsedRecorder, ElapsedRecorderV3
from .ops.endpoints import Endpoints, info_document
from .ops.health import DRAINING, INIT, READY, Health
from .ops.logs import TrackingFilter
from .ops.metrics import metrics_registry
from .services import Services, open_services

__all__ = ["StartupError", "run_node"]

T = TypeVar("T")


class _Stopped(Exception):
    """``stop`` was set while the node was still starting."""


async def _unless_stopped(step: Awaitable[T], stop: asyncio.Event) -> T:
    """Await a start-up step, abandoning it if SIGTERM comes first (a pod must stop while it starts)."""
    task = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise _Stopped


async def _mark_draining(stop: asyncio.Event, health: Health) -> None:
    """SIGTERM: /readyz says 503 for the whole drain."""
    await stop.wait()
    health.phase = DRAINING


async def _heartbeat(health: Health) -> None:
    """The event loop's sign of life for /healthz, which is served from another thread."""
    while True:
        health.beat()
        await asyncio.sleep(1.0)


ServicesOpener = Callable[[Settings, Any, logging.Logger], Awaitable[Services]]


async def run_node(settings: Settings, stop: asyncio.Event, logger: logging.Logger, *,
                   services_opener: ServicesOpener = open_services) -> Consumer | None:
    """Run the node until ``stop`` is set; return the consumer (for its counters), None if stopped while starting.

    ``services_opener`` builds ctx's data services (the testing plugin's keeps them in memory).
    """
    try:
        return await _run_node(settings, stop, logger, services_opener)
    except _Stopped:
        logger.info("stopped while starting")
        return None


async def _off_loop(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` on a thread of its own, so the probes answer meanwhile (importing the handler's
    libraries, a sync ``init`` loading a model for minutes).

    A daemon thread: SIGTERM during a long init must not wait for it at interpreter exit.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not done.done():
            done.set_exception(exc) if exc is not None else done.set_result(result)

    def target() -> None:
        try:
            result = call(*args)
        except BaseException as exc:  # handed to the event loop, which raises it in run_node
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name="kre-start", daemon=True).start()
    return await done


@dataclass
class _Started:
    """What the node has started so far: read by ``/info`` and the reconnect callback, which exist first."""

    code: UserCode | None = None
    nc: nats.aio.client.Client | None = None
    consumer: Consumer | None = None


async def _run_node(settings: Settings, stop: asyncio.Event, logger: logging.Logger,
                    services_opener: ServicesOpener) -> Consumer:
    health = Health(settings.health_reconnect_grace, stall_limit=settings.ack_wait + 30)
    metrics = NodeMetrics()
    started = _Started()
    endpoints = None
    if settings.http_port:
        registry = metrics_registry(metrics, node=settings.node_name, workflow=settings.workflow_name,
                                    version=settings.version)
        endpoints = Endpoints(settings.http_port, health, registry,
                              lambda: info_document(settings, started.code, health, metrics, started.nc), logger,
                              host=settings.http_host)
        await endpoints.start()
    try:
        # Off the loop: a handler importing torch takes seconds, and liveness must answer meanwhile.
        code = await _unless_stopped(_off_loop(load_user_code, settings.base_path, settings.handler_path,
                                                 settings.generation), stop)
        started.code = code
        logger.info("loaded handler %s (%s%s)", code.path, "async" if code.handler_is_async else "sync",
                    " batch" if code.batch else "")
        return await _run_connected(settings, stop, logger, code, health, metrics, started, services_opener)
    finally:
        if endpoints is not None:
            await endpoints.stop()


async def _run_connected(settings: Settings, stop: asyncio.Event, logger: logging.Logger, code: UserCode,
                         health: Health, metrics: NodeMetrics, started: _Started,
                         services_opener: ServicesOpener) -> Consumer:
    async def renew_pulls() -> None:
        if started.consumer is not None:
            await started.consumer.on_reconnect()

    def connection_changed(connected: bool) -> None:
        health.connected() if connected else health.disconnected()

    nc = await _unless_stopped(connect(settings.nats_servers, logger, name=f"kre-runner {settings.node_name}",
                                       auth=settings.nats_auth, on_reconnect=renew_pulls,
                                       on_connection_change=connection_changed), stop)
    started.nc = nc
    services = None
    try:
        await _unless_stopped(check_jetstream(nc, ", ".join(redact_url(s) for s in settings.nats_servers)), stop)
        services = await services_opener(settings, nc, logger)
        if services.influx is not None:
            influx = services.influx
            metrics.influx_dropped = lambda: influx.dropped
        if services.db is not None:
            db = services.db
            metrics.db_errors = lambda: db.errors
        # ctx.logger lines carry the tracking id of the message being handled; the consumer sets the
        # source (tracking.current) once it can tell which message that is.
        tracking = TrackingFilter()
        handler_logger = logging.getLogger(f"kre_runner.handler.{settings.node_name}")
        handler_logger.addFilter(tracking)
        # Handler failures: tracebacks for the first few a minute, then one line counting the rest.
        failures = RateLimitedLog(logger, "handler failures")

        def early_reply(response: Message) -> Awaitable[None]:
            return consumer.current.early_reply(response)  # the consumer is built below, with this ctx

        def early_exit() -> None:
            consumer.current.early_exit()

        def batch_tracking_ids() -> list[str]:
            return consumer.current.batch_tracking_ids()

        ctx: Context | ContextV3
        if settings.generation == "v3":
            def send(what: str, message_type: int, message: Message, channel: str, forward: bool) -> Awaitable[None]:
                assert consumer.sends is not None  # a 3.x consumer has them
                return consumer.sends.send(what, message_type, message, channel, forward)

            def current_input(what: str) -> Any:
                assert consumer.sends is not None
                return consumer.sends.envelope(what)

            ctx = ContextV3(base_path=settings.base_path, logger=handler_logger, send=send,
                            current_input=current_input, db=services.db, measurement=services.measurement,
                            prediction=services.prediction, configuration=services.configuration,
                            object_store=services.object_store)
        else:
            ctx = Context(
                base_path=settings.base_path,
                logger=handler_logger,
                db=services.db,
                measurement=services.measurement,
                prediction=services.prediction,
                configuration=services.configuration,
                object_store=services.object_store,
                early_reply=early_reply,
                early_exit=early_exit,
                batch_tracking_ids=batch_tracking_ids if code.batch else None,
            )
        record = None
        if services.influx is not None and settings.elapsed_metrics:
            record = (ElapsedRecorderV3 if settings.generation == "v3" else ElapsedRecorder)(settings,
                                                                                              services.influx.add)
        # Once connected, before the consumer: a message through each fast path (at most a few seconds).
        fast_path = await _unless_stopped(probe(nc), stop)
        consumer = Consumer(settings, code, nc, ctx, logger, record_elapsed=record, metrics=metrics, failures=failures,
                            fast_path=fast_path)
        tracking.current = consumer.current.tracking_id
        started.consumer = consumer
        await _unless_stopped(consumer.setup(), stop)
        health.phase = INIT
        try:
            # On the thread the handlers run on (the event loop's by default): what init makes may be
            # bound to its thread (a sqlite3 connection, a thread-local session).
            await _unless_stopped(consumer.run_init(), stop)
        except _Stopped:
            raise
        except Exception as exc:
            logger.error("init(ctx) in %s failed", code.path, exc_info=exc)
            raise StartupError(f"init(ctx) in {code.path} failed: {type(exc).__name__}: {exc}") from exc
        # What exists now (libraries, the model init loaded) lives as long as the node: leave it out of
        # garbage collection, whose full passes would otherwise re-scan a large model's millions of
        # objects and stall messages for as long.
        gc.collect()
        gc.freeze()
        logger.info("node %s ready", settings.node_name)
        health.consumer_bound = lambda: consumer.bound
        health.cannot_dead_letter = consumer.cannot_dead_letter
        health.phase = READY
        draining = asyncio.create_task(_mark_draining(stop, health))
        heartbeat = asyncio.create_task(_heartbeat(health))
        try:
            await consumer.run(stop)
        finally:
            draining.cancel()
            heartbeat.cancel()
        return consumer
    finally:
        health.phase = DRAINING
        if services is not None:
            # In-flight messages already had their grace; a down InfluxDB must not hold the pod much longer.
            await services.close(min(5.0, settings.shutdown_grace))
        await nc.close()
