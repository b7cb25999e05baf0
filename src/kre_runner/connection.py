"""The NATS connection every kre-runner process uses: bounded first connect, endless reconnects."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client

from .config import redact_url

__all__ = ["StartupError", "connect"]


class StartupError(RuntimeError):
    """The process cannot start; the message says why and what to fix."""


async def connect(servers: tuple[str, ...], logger: logging.Logger, *, name: str,
                  on_reconnect: Callable[[], Awaitable[None]] | None = None, attempts: int = 10) -> Client:
    """Connect to NATS, retrying the first connection for a few seconds."""
    shown = ", ".join(redact_url(s) for s in servers)

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
            servers=list(servers),
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
