"""The node's periodic work, in two tasks, so that a slow look at the consumer never delays what is due.

* the ticker, every second (more often for an ack wait under 8 s, so a keep-alive is never late):
  PubAck timeouts, ``+WPI`` keep-alives and held dead letters (settlement.py), the histograms, a
  sync handler's pace (credits.py), the memory of acked inputs, missed heartbeats;
* the look, every few seconds or when the ticker asks: the consumer's info (lag gauges, ack floor,
  whether it still exists: pulling.py), which can wait up to a JetStream API timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from nats.aio.client import Client

from .counters import NodeMetrics
from .credits import Credits
from .failures import RateLimitedLog
from .publisher import PubAckPublisher
from .pulling import PullLink
from .settlement import Job, Settlement

__all__ = ["Maintenance"]

_LOOK_EVERY = 5.0  # seconds between looks at the consumer


class Maintenance:
    """Started by the consumer once it pulls; stopped when it has shut down."""

    def __init__(self, *, ack_wait: float, publisher: PubAckPublisher, settlement: Settlement, link: PullLink,
                 credits: Credits, metrics: NodeMetrics, failures: RateLimitedLog, paced: bool,
                 waiting: Callable[[], Iterable[Job]], on_settled: Callable[[], object],
                 logger: logging.Logger) -> None:
        self._ack_wait = ack_wait
        self._interval = min(1.0, ack_wait / 8)
        self._publisher = publisher
        self._settlement = settlement
        self._link = link
        self._credits = credits
        self._metrics = metrics
        self._failures = failures
        self._paced = paced  # a sync handler on the event loop: its pace follows its calls
        self._waiting = waiting
        self._on_settled = on_settled
        self._log = logger
        self._look_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._tick()), asyncio.create_task(self._look())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def keep_alive(self, after: float | None = None) -> None:
        """``+WPI`` for inputs held (handled, waiting for a slot) longer than ``after`` (default half the ack
        wait) since their last sign of life; held dead letters whose retry is due are sent again."""
        if await self._settlement.keep_alive(time.monotonic(), self._waiting(), after):
            self._on_settled()  # a slot freed: what waits for one starts (the ticker pulls next)

    async def before_blocking(self, nc: Client) -> None:
        """Paced: the next handler call holds the loop, so first take in what arrived during the last one
        (each delivery becomes a job), keep alive every input it could hold up past its ack wait, and put
        what is queued (acks, outputs, keep-alives) on the wire rather than behind the call."""
        await asyncio.sleep(0)
        await self.keep_alive(self._ack_wait / 10)
        if self._credits.pace < self._ack_wait / 10:
            return  # held up by one call, a keep-alive still arrives well within the ack wait
        try:
            await nc.flush(timeout=max(1, int(self._ack_wait / 4)))
        except Exception as exc:  # disconnected: what is queued goes out after the reconnect
            self._log.debug("flush before a paced handler call failed: %s", exc)

    async def _tick(self) -> None:
        next_flush = time.monotonic() + _LOOK_EVERY
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._publisher.expire()
                await self.keep_alive()
                self._metrics.fold()
                if self._paced:
                    self._credits.relax(self._metrics.handler_seconds.take_mean())
                self._settlement.age_memory()
                now = time.monotonic()
                if now >= next_flush:
                    next_flush = now + _LOOK_EVERY
                    self._failures.flush()  # the count of tracebacks left out, once their minute is over
                if self._link.heartbeat_missed(now):
                    self._look_now.set()
                    await self._link.renew()
                else:
                    await self._link.pull()
            except Exception:  # the ticker must survive anything, or timeouts stop being enforced
                self._log.exception("periodic maintenance failed")

    async def _look(self) -> None:
        while True:
            try:
                await self._link.look()
            except Exception:
                self._log.exception("looking at the consumer failed")
            self._look_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._look_now.wait(), _LOOK_EVERY)
