"""Assembling a node: connect, check the stream, open services, run ``init``, consume, close."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
from nats.aio.client import Client

from .config import Settings, redact_url
from .consumer import Consumer, early_reply
from .context import Context
from .elapsed import ElapsedRecorder
from .handler import load_user_code
from .services import open_services

__all__ = ["StartupError", "connect", "run_node"]


class StartupError(RuntimeError):
    """The node cannot start; the message says why and what to fix."""


async def connect(settings: Settings, logger: logging.Logger, *, name: str,
                  on_reconnect: Any = None, attempts: int = 10) -> Client:
    """Connect to NATS, retrying the first connection for a few seconds."""
    shown = ", ".join(redact_url(s) for s in settings.nats_servers)

    client: Client | None = None

    async def disconnected() -> None:
        if client is not None and not client.is_closed:  # not our own close() at shutdown
            logger.warning("disconnected from NATS; reconnecting")

    async def reconnected() -> None:
        logger.info("reconnected to NATS")
        if on_reconnect is not None:
            await on_reconnect()

    async def error(exc: Exception) -> None:
        logger.warning("NATS: %s: %s", type(exc).__name__, exc)

    try:
        client = await nats.connect(
            servers=list(settings.nats_servers),
            name=name,
            connect_timeout=2,
            allow_reconnect=True,
            # Bounded for the first connection (pods start in any order, but a wrong URL must fail)...
            max_reconnect_attempts=attempts,
            reconnect_time_wait=0.5,
            skip_subject_validation=True,  # every subject was validated once, in config
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
    except Exception as exc:  # nats-py raises several types for an unreachable server
        raise StartupError(f"cannot connect to NATS at {shown} (KRT_NATS_SERVER): {type(exc).__name__}: {exc}") \
            from None
    # ...and endless once connected: a running node rides out any server outage.
    client.options["max_reconnect_attempts"] = -1
    return client


async def run_node(settings: Settings, stop: asyncio.Event, logger: logging.Logger) -> Consumer:
    """Run the node until ``stop`` is set; return the consumer (for its counters)."""
    code = load_user_code(settings.base_path, settings.handler_path)
    logger.info("loaded handler %s (%s)", code.path, "async" if code.handler_is_async else "sync")
    holder: list[Consumer] = []

    async def renew_pulls() -> None:
        if holder:
            await holder[0].on_reconnect()

    nc = await connect(settings, logger, name=f"kre-runner {settings.node_name}", on_reconnect=renew_pulls)
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
