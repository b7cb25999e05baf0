"""The producer's fast JetStream publish path: plain publishes, PubAcks resolved by one wildcard sub.

``js.publish`` waits a round trip per message (and builds a future, an inbox and a task); a
producer written that way, not the node, would be the bottleneck. Here a bounded number of
publishes is in flight and every PubAck lands on ``<inbox>.*``.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["FastPublisher"]


class FastPublisher:
    """Publishes with at most ``limit`` messages waiting for their PubAck; counts failures."""

    def __init__(self, nc: Client, limit: int = 2048) -> None:
        self._nc = nc
        self._limit = limit
        self._prefix = nc.new_inbox() + "."
        self._counter = 0
        self.in_flight = 0
        self.stored = 0
        self.failed = 0
        self._space: asyncio.Future[None] | None = None
        self._all_stored = asyncio.Event()
        self._sub: Subscription | None = None

    async def start(self) -> FastPublisher:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_puback, pending_msgs_limit=-1,
                                             pending_bytes_limit=-1)
        return self

    async def publish(self, subject: str, data: bytes) -> None:
        while self.in_flight >= self._limit:
            self._space = asyncio.get_running_loop().create_future()
            await self._space
        self._counter += 1
        self.in_flight += 1
        await self._nc.publish(subject, data, reply=self._prefix + str(self._counter))

    async def wait_stored(self, timeout: float = 30.0) -> None:
        """Return once every publish has its PubAck; raise if one was refused or never answered."""
        await self._nc.flush()
        if self.in_flight:
            self._all_stored.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_stored.wait(), timeout)
        if self.in_flight or self.failed:
            raise RuntimeError(f"producer: {self.failed} publishes refused, {self.in_flight} without PubAck")

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_puback(self, msg: Msg) -> None:
        self.in_flight -= 1
        if not msg.data or b'"error"' in msg.data:
            self.failed += 1
        else:
            self.stored += 1
        if not self.in_flight:
            self._all_stored.set()
        space = self._space
        if space is not None and self.in_flight <= self._limit // 2 and not space.done():
            space.set_result(None)
