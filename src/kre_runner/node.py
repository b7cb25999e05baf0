"""Assembling a node: connect, check the stream, open services, run ``init``, consume, close."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable
from typing import TypeVar

from google.protobuf.message import Message

from .batching import current_tracking_ids
from .config import Settings
from .connection import StartupError, connect
from .consumer import Consumer
from .context import Context
from .elapsed import ElapsedRecorder
from .handler import load_user_code
from .services import open_services

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


async def run_node(settings: Settings, stop: asyncio.Event, logger: logging.Logger) -> Consumer | None:
    """Run the node until ``stop`` is set; return the consumer (for its counters), None if stopped while starting."""
    try:
        return await _run_node(settings, stop, logger)
    except _Stopped:
        logger.info("stopped while starting")
        return None


async def _run_node(settings: Settings, stop: asyncio.Event, logger: logging.Logger) -> Consumer:
    code = load_user_code(settings.base_path, settings.handler_path)
    logger.info("loaded handler %s (%s%s)", code.path, "async" if code.handler_is_async else "sync",
                " batch" if code.batch else "")
    holder: list[Consumer] = []

    async def renew_pulls() -> None:
        if holder:
            await holder[0].on_reconnect()

    nc = await _unless_stopped(connect(settings.nats_servers, logger, name=f"kre-runner {settings.node_name}",
                                       on_reconnect=renew_pulls), stop)
    services = None
    try:
        services = await open_services(settings, nc, logger)

        def early_reply(response: Message) -> Awaitable[None]:
            return consumer.early_reply(response)  # the consumer is built below, with this ctx

        def early_exit() -> None:
            consumer.early_exit()

        ctx = Context(
            base_path=settings.base_path,
            logger=logging.getLogger(f"kre_runner.handler.{settings.node_name}"),
            db=services.db,
            measurement=services.measurement,
            prediction=services.prediction,
            early_reply=early_reply,
            early_exit=early_exit,
            batch_tracking_ids=current_tracking_ids if code.batch else None,
        )
        record = None
        if services.influx is not None and settings.elapsed_metrics:
            record = ElapsedRecorder(settings, services.influx.add)
        consumer = Consumer(settings, code, nc, ctx, logger, record_elapsed=record)
        holder.append(consumer)
        await _unless_stopped(consumer.setup(), stop)
        try:
            await _unless_stopped(consumer.run_init(), stop)
        except _Stopped:
            raise
        except Exception as exc:
            raise StartupError(f"init(ctx) in {code.path} failed: {type(exc).__name__}: {exc}") from exc
        # What exists now (libraries, the model init loaded) lives as long as the node: leave it out of
        # garbage collection, whose full passes would otherwise re-scan a large model's millions of
        # objects and stall messages for as long.
        gc.collect()
        gc.freeze()
        logger.info("node %s ready", settings.node_name)
        await consumer.run(stop)
        return consumer
    finally:
        if services is not None:
            # In-flight messages already had their grace; a down InfluxDB must not hold the pod much longer.
            await services.close(min(5.0, settings.shutdown_grace))
        await nc.close()
