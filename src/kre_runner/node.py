"""Assembling a node: connect, check the stream, open services, run ``init``, consume, close."""

from __future__ import annotations

import asyncio
import logging

from .config import Settings
from .connection import StartupError, connect
from .consumer import Consumer, early_reply
from .context import Context
from .elapsed import ElapsedRecorder
from .handler import load_user_code
from .services import open_services

__all__ = ["StartupError", "run_node"]


async def run_node(settings: Settings, stop: asyncio.Event, logger: logging.Logger) -> Consumer:
    """Run the node until ``stop`` is set; return the consumer (for its counters)."""
    code = load_user_code(settings.base_path, settings.handler_path)
    logger.info("loaded handler %s (%s)", code.path, "async" if code.handler_is_async else "sync")
    holder: list[Consumer] = []

    async def renew_pulls() -> None:
        if holder:
            await holder[0].on_reconnect()

    nc = await connect(settings.nats_servers, logger, name=f"kre-runner {settings.node_name}",
                       on_reconnect=renew_pulls)
    services = None
    try:
        services = await open_services(settings, nc, logger)
        ctx = Context(
            base_path=settings.base_path,
            logger=logging.getLogger(f"kre_runner.handler.{settings.node_name}"),
            db=services.db,
            measurement=services.measurement,
            prediction=services.prediction,
            early_reply=early_reply,
        )
        record = None
        if services.influx is not None and settings.elapsed_metrics:
            record = ElapsedRecorder(settings, services.influx.add)
        consumer = Consumer(settings, code, nc, ctx, logger, record_elapsed=record)
        holder.append(consumer)
        await consumer.setup()
        try:
            await consumer.run_init()
        except Exception as exc:
            raise StartupError(f"init(ctx) in {code.path} failed: {type(exc).__name__}: {exc}") from exc
        logger.info("node %s ready", settings.node_name)
        await consumer.run(stop)
        return consumer
    finally:
        if services is not None:
            # In-flight messages already had their grace; a down InfluxDB must not hold the pod much longer.
            await services.close(min(5.0, settings.shutdown_grace))
        await nc.close()
