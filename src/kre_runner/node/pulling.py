"""The pull link: the node's side of JetStream's pull protocol for its durable consumer.

It sends pull requests as the credits allow (credits.py), reads the status messages that end them,
and keeps the link alive through what would silently stop deliveries:

* a consumer leader election in a cluster (the requests die with the old leader): re-pull at once,
  from the election advisory;
* a reconnect (a restarted server forgets requests; a leaderless consumer drops them): re-pull once
  the consumer answers with a leader;
* three missed heartbeats on an open request: presumed lost, re-pull (the maintenance task asks);
* the consumer deleted (a 409, or the periodic look finds it gone): recreated from its ack floor,
  or, if its stream is gone too, waited for; the node is not ready meanwhile (``bound``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from ..config import Settings
from ..nats.fast import Dispatcher, Route, Wire
from .counters import NodeMetrics
from .credits import Credits
from .setup import recreate

__all__ = ["HEARTBEAT", "PullLink"]

_PULL_EXPIRES = 30.0  # seconds a pull request waits on the server
HEARTBEAT = 5.0  # server heartbeat on an open pull request; 3 missed => requests presumed lost
# Pull requests that end with these are part of the routine (a byte budget spent, a batch filled).
_USUAL_409 = ("Exceeded", "Batch Completed", "Exceeds MaxBytes")
_MISSING_LOG_EVERY = 30.0  # seconds between log lines while the stream or consumer is missing
_LEADERLESS_POLL = 0.25  # seconds between looks for a consumer leader after a reconnect
_LEADERLESS_WAIT = 30.0  # then pull anyway (the missed-heartbeat check still applies)


class PullLink:
    """Pull requests, their status messages, leader changes, reconnects and the consumer's self-healing."""

    def __init__(self, settings: Settings, nc: Client, wire: Wire, dispatcher: Dispatcher, credits: Credits,
                 metrics: NodeMetrics, logger: logging.Logger, *, held: Callable[[], tuple[int, int]]) -> None:
        self._s = settings
        self._nc = nc
        self._wire = wire
        self._dispatcher = dispatcher
        self._credits = credits
        self._metrics = metrics
        self._log = logger
        self._held = held  # (inputs being handled or published, inputs waiting for a slot)
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{settings.stream}.{settings.consumer_name}"
        self.inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self.pulling = False
        self.bound = False  # the durable consumer exists and is pulled from (readiness)
        self.consumer_info: ConsumerInfo | None = None  # refreshed by :meth:`look`
        self.last_seen = time.monotonic()  # the last message on the inbox: an input or a status
        self.ack_floor: int | None = None  # the consumer's ack floor (stream seq) when last looked at
        self._recovering: asyncio.Task[None] | None = None
        self._rebinding: asyncio.Task[None] | None = None

    async def receive(self, route: Route) -> None:
        """Deliveries and status messages on the inbox go to ``route`` (nothing is pulled yet)."""
        self._sub = await self._dispatcher.subscribe(self.inbox, route)

    async def start(self) -> None:
        """Watch leader elections, then pull."""
        await self.watch_leader()
        self.pulling = True
        self.bound = True
        await self.pull()

    async def pull(self) -> None:
        """Ask for as many messages as the credits allow."""
        if not self.pulling:
            return
        credits = self._credits
        want = credits.want(*self._held())
        if not want:
            return
        max_bytes = credits.opened(want)
        if max_bytes:
            request = b'{"batch":%d,"max_bytes":%d,"expires":%d,"idle_heartbeat":%d}' % (
                want, max_bytes, _PULL_EXPIRES * 1e9, HEARTBEAT * 1e9)
        else:  # small messages: the count alone keeps the bytes far within the budget (credits.py)
            request = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (want, _PULL_EXPIRES * 1e9, HEARTBEAT * 1e9)
        try:
            await self._wire.publish(self._subject, request, self.inbox)
        except Exception as exc:
            credits.not_sent()
            self._log.warning("pull request failed: %s", exc)

    def on_status(self, headers: dict[str, str] | None) -> None:
        """A status message on the inbox: a heartbeat, or the end of a request (its unused credit returns)."""
        headers = headers or {}
        status = headers.get("Status", "")
        if status == "100":
            return  # idle heartbeat
        pending = headers.get("Nats-Pending-Messages")
        description = headers.get("Description", "")
        if pending is not None:
            pending_bytes = headers.get("Nats-Pending-Bytes")
            self._credits.request_ended(int(pending), None if pending_bytes is None else int(pending_bytes))
        elif status in ("408", "409", "404"):
            self._credits.request_ended(None)
        if status == "409" and "Consumer Deleted" in description:
            self._consumer_lost("409 Consumer Deleted")
        elif status == "409" and not any(usual in description for usual in _USUAL_409):
            self._log.warning("pull request ended: %s %s", status, description)

    async def renew(self) -> None:
        """Pull requests may not have survived (a restarted server forgets them): ask again."""
        self._credits.request_ended(None)
        await self.pull()

    def heartbeat_missed(self, now: float) -> bool:
        """Requests are open and nothing came for three heartbeats: they are presumed lost."""
        if self.pulling and self._credits.requested and now - self.last_seen > 3 * HEARTBEAT:
            self._log.warning("no heartbeat from the server for %.0fs: renewing pull requests", now - self.last_seen)
            self.last_seen = now
            return True
        return False

    # ---------------------------------------------------------------- leaders and reconnects

    async def watch_leader(self) -> None:
        """In a cluster, pull requests die with the consumer's leader: re-pull when a new one is elected.

        Without permission to subscribe to the advisory the node still recovers, after three missed
        heartbeats.
        """
        subject = f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{self._s.stream}.{self._s.consumer_name}"
        try:
            await self._dispatcher.subscribe(subject, self._on_leader_elected)
        except Exception as exc:
            self._log.info("not watching consumer leader elections (%s): after a leader change, pulls resume "
                           "after three missed heartbeats", exc)

    async def _on_leader_elected(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        self._log.info("consumer %s has a new leader: renewing pull requests", self._s.consumer_name)
        await self.renew()

    def reconnected(self) -> None:
        """After a reconnect: pull again once the consumer answers with a leader."""
        if self._rebinding is None or self._rebinding.done():
            self._rebinding = asyncio.create_task(self._renew_when_led())

    async def _renew_when_led(self) -> None:
        """A request sent while the consumer is leaderless (its leader's server was the one that died) is
        dropped without a word: wait until it answers with a leader (at most ``_LEADERLESS_WAIT``)."""
        deadline = time.monotonic() + _LEADERLESS_WAIT
        js = self._nc.jetstream(timeout=1.0)
        while self.pulling and time.monotonic() < deadline:
            try:
                info = await js.consumer_info(self._s.stream, self._s.consumer_name)
                if info.cluster is None or info.cluster.leader:
                    break
            except NotFoundError:
                break  # the next look recreates it
            except Exception as exc:
                self._log.debug("consumer not answering yet after the reconnect: %s", exc)
            await asyncio.sleep(_LEADERLESS_POLL)
        await self.renew()

    # ---------------------------------------------------------------- the consumer itself

    async def look(self) -> None:
        """Consumer info: the lag gauges, the ack floor (where a recreated consumer starts), and whether it exists.

        Up to a JetStream API timeout: the maintenance task runs it apart from anything time-critical.
        """
        if self._recovering is not None or not self._nc.is_connected:
            return
        try:
            info = await self._nc.jetstream().consumer_info(self._s.stream, self._s.consumer_name)
        except NotFoundError:
            self._consumer_lost("it no longer exists")
            return
        except Exception as exc:
            self._log.debug("consumer info failed: %s", exc)
            return
        self.consumer_info = info
        self._metrics.consumer_pending = info.num_pending
        self._metrics.consumer_ack_pending = info.num_ack_pending
        if info.ack_floor is not None:
            self.ack_floor = info.ack_floor.stream_seq

    def _consumer_lost(self, why: str) -> None:
        if self._recovering is None and self.pulling:
            self.bound = False
            self._log.error("durable consumer %s on stream %s is gone (%s): recreating it", self._s.consumer_name,
                            self._s.stream, why)
            self._recovering = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        """Recreate the deleted consumer (or wait for its stream), then pull again."""
        js = self._nc.jetstream()
        start = None if self.ack_floor is None else self.ack_floor + 1
        waited = 0.0
        try:
            while self.pulling:
                try:
                    if await recreate(js, self._s, self._log, start):
                        break
                    if waited % _MISSING_LOG_EVERY == 0:
                        self._log.error("stream %s (KRT_NATS_STREAM) does not exist: waiting for it; the node is "
                                        "not ready", self._s.stream)
                    start = None  # a stream created again holds only new messages: take them all
                except Exception as exc:
                    if waited % _MISSING_LOG_EVERY == 0:
                        self._log.error("cannot recreate consumer %s yet: %s", self._s.consumer_name, exc)
                await asyncio.sleep(1.0)
                waited += 1.0
            else:
                return
            self.bound = True
            await self.renew()
        finally:
            self._recovering = None

    # ---------------------------------------------------------------- stopping

    async def stop(self, grace: float) -> None:
        """Stop pulling; unsubscribing ends the open requests, and what was delivered is still handled."""
        self.pulling = False
        for task in (self._recovering, self._rebinding):
            if task is not None:
                task.cancel()
        if self._sub is not None:
            try:
                await asyncio.wait_for(self._sub.drain(), grace)
            except Exception as exc:
                self._log.warning("draining the input subscription failed: %s", exc)


