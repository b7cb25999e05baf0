"""Receiving on the hot path: MSGs of the node's two busy subscriptions go straight to their handlers.

nats-py hands every message to a subscription through a ``Msg`` object, an ``asyncio.Queue`` and
the subscription's own task: ~25k CPU instructions per message here, and a node receives two
MSGs per input (the input and its output's PubAck): together over a quarter of what a node
spends on a message. For those two subscriptions :class:`Dispatcher` takes each MSG from nats-py's
protocol parser and awaits the handler directly, in order, in the connection's reader task
(about a tenth of the cost). SUB/UNSUB, resubscription after a reconnect and every other
subscription stay nats-py's.

A route handler runs in the reader task, so it must not raise (nats-py's read loop would stop)
and must not wait for anything only the server's next bytes can bring (a flush, a request):
the reader that would read them is the one waiting. Where nats-py's internals are not as
expected (it is pinned below 3), routes are ordinary subscription callbacks.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["Dispatcher", "Route"]

# (subject, reply, data, headers) of one MSG.
Route = Callable[[str, str, bytes, "dict[str, str] | None"], Awaitable[None]]

_log = logging.getLogger(__name__)


class Dispatcher:
    """Routes the MSGs of chosen subscriptions of one connection straight to their handlers."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._routes: dict[int, Route] = {}
        process_msg = getattr(nc, "_process_msg", None)
        self._direct = (
            process_msg is not None
            and hasattr(nc, "_process_headers")
            and list(inspect.signature(process_msg).parameters) == ["sid", "subject", "reply", "data", "headers"]
        )
        if self._direct:
            self._nats_process_msg = process_msg
            nc._process_msg = self._process_msg  # type: ignore[method-assign]  # the parser calls nc._process_msg

    @property
    def direct(self) -> bool:
        """Whether routes bypass nats-py's subscription queues (False: plain callbacks)."""
        return self._direct

    async def subscribe(self, subject: str, route: Route) -> Subscription:
        """Subscribe to ``subject`` with ``route`` as its handler (no pending limits: credits bound it)."""

        async def callback(msg: Msg) -> None:  # only used without the direct path
            await route(msg.subject, msg.reply, msg.data, msg.headers)

        sub = await self._nc.subscribe(subject, cb=callback, pending_msgs_limit=-1, pending_bytes_limit=-1)
        if self._direct:
            self._routes[sub._id] = route
        return sub

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        route = self._routes.get(sid)
        if route is None or sid not in self._nc._subs:  # another subscription, or ours after unsubscribe
            await self._nats_process_msg(sid, subject, reply, data, headers)
            return
        try:
            parsed = await self._nc._process_headers(headers) if headers else None
            await route(subject.decode(), reply.decode(), data, parsed)
        except Exception:  # an exception here would end nats-py's read loop, and with it the connection
            _log.exception("handling a message on %s failed", subject.decode(errors="replace"))
