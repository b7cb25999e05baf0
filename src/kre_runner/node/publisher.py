"""Publishing on the hot path: JetStream publishes without a round trip each, and cheap acks.

Outputs go out as plain publishes whose reply subject is ``<inbox>.<n>``; one wildcard
subscription receives every PubAck and reports it for the waiter registered under ``n``. This
keeps many publishes in flight with no task, future or inbox per message (nats-py's
``js.publish`` creates all three and waits a round trip), which is what lets a Python node
approach the server's rate. A PubAck that does not come within the timeout counts as a failure,
so a lost PubAck never wedges the message that waits for it. The bytes go out through
:class:`~kre_runner.nats.fast.Wire`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription

from ..nats.fast import Dispatcher, Wire
from .counters import NodeMetrics

__all__ = ["PubAckPublisher", "puback_error"]


class PubAckPublisher:
    """Publishes with a PubAck expected; ``on_stored(token, error)`` is awaited once per publish.

    ``error`` is ``None`` when the stream stored the message (duplicates included), else the reason.
    """

    def __init__(self, nc: Client, dispatcher: Dispatcher, wire: Wire, timeout: float,
                 on_stored: Callable[[Any, str | None], Awaitable[None]], *,
                 metrics: NodeMetrics | None = None) -> None:
        self._nc = nc
        self._metrics = metrics or NodeMetrics()  # publish_failures: counted here, where a publish fails
        self._dispatcher = dispatcher
        self._wire = wire
        self._timeout = timeout
        self._on_stored = on_stored
        self._prefix = self.prefix = nc.new_inbox() + "."  # PubAcks come to prefix + a number
        self._prefix_len = len(self._prefix)
        self._counter = 0
        # token -> (deadline, owner, what was published); insertion order is deadline order (one fixed
        # timeout). What was published is kept to send it again at once after a reconnect.
        self._waiting: dict[str, _Waiting] = {}
        self._sub: Subscription | None = None

    @property
    def sent(self) -> int:
        """Publishes made so far."""
        return self._counter

    async def start(self) -> None:
        self._sub = await self._dispatcher.subscribe(self._prefix + "*", self._on_puback)

    async def publish(self, subject: str, data: bytes, msg_id: str, owner: Any,
                      headers: dict[str, str] | None = None) -> None:
        """Publish ``data``; its outcome is reported later for ``owner``."""
        self._counter += 1
        token = str(self._counter)
        self._waiting[token] = (time.monotonic() + self._timeout, owner, subject, data, msg_id, headers)
        try:
            await self._wire.publish(subject, data, self._prefix + token, msg_id, headers)
        except Exception as exc:  # disconnected with a full buffer, payload too large, ...
            self._waiting.pop(token, None)
            self._metrics.publish_failures += 1
            await self._on_stored(owner, f"publish to {subject} failed: {type(exc).__name__}: {exc}")

    @property
    def pending(self) -> int:
        """Publishes waiting for their PubAck."""
        return len(self._waiting)

    async def expire(self) -> None:
        """Fail every publish whose PubAck is overdue (called about once a second)."""
        now = time.monotonic()
        while self._waiting:
            token, entry = next(iter(self._waiting.items()))
            if entry[_DEADLINE] > now:
                break
            del self._waiting[token]
            self._metrics.publish_failures += 1
            await self._on_stored(entry[_OWNER], f"no PubAck within {self._timeout:g}s")

    async def resend(self) -> int:
        """After a reconnect: publish again, at once, everything still waiting for a PubAck.

        PubAcks of publishes in flight when the connection dropped can never arrive; waiting for
        the timeout would leave their inputs (and the credit they hold) idle. The same
        ``Nats-Msg-Id`` goes with each, so the stream drops what it had already stored.
        """
        waiting = list(self._waiting.items())
        deadline = time.monotonic() + self._timeout
        for token, (_, owner, subject, data, msg_id, headers) in waiting:
            if self._waiting.pop(token, None) is None:
                continue  # its PubAck came meanwhile
            self._waiting[token] = (deadline, owner, subject, data, msg_id, headers)  # at the end: deadline order
            try:
                await self._wire.publish(subject, data, self._prefix + token, msg_id, headers)
            except Exception as exc:
                if self._waiting.pop(token, None) is not None:
                    self._metrics.publish_failures += 1
                    await self._on_stored(owner, f"publish to {subject} failed: {type(exc).__name__}: {exc}")
        return len(waiting)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_puback(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        entry = self._waiting.pop(subject[self._prefix_len:], None)
        if entry is None:
            return  # already timed out and retried
        # The server writes a stored message's PubAck as {"stream":..., its fields in that order (a
        # failure starts with {"error":...): one prefix test decides the usual case; anything else is
        # parsed as JSON. Never a substring test: a stream or domain may be named "error".
        if data.startswith(_STORED):
            await self._on_stored(entry[_OWNER], None)
            return
        error = puback_error(data, headers)
        if error is not None:
            self._metrics.publish_failures += 1
        await self._on_stored(entry[_OWNER], error)


# One publish waiting for its PubAck: (deadline, owner, subject, data, Nats-Msg-Id, other headers). A plain
# tuple (one is made per publish, on the hot path), read through these names where not unpacked whole.
_Waiting = tuple[float, Any, str, bytes, str, "dict[str, str] | None"]
_DEADLINE, _OWNER = 0, 1


_STORED = b'{"stream"'


def puback_error(data: bytes, headers: dict[str, str] | None) -> str | None:
    """Why a publish answered by ``data`` was not stored; None when the answer is a PubAck that says it was.

    A PubAck is ``{"stream":"S","seq":N[,"domain":"D"][,"duplicate":true]}`` (a duplicate was stored
    before), a failure ``{"error":{"code":..,"err_code":..,"description":..},...}``; "no responders"
    comes as a header-only message with status 503.
    """
    if not data:
        status = (headers or {}).get("Status", "")
        if status == "503":
            return "no JetStream stream captures the subject (503 no responders)"
        return f"empty PubAck (status {status or 'none'})"
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if isinstance(reply, dict):
        error = reply.get("error")
        if isinstance(error, dict):
            return f"JetStream error {error.get('code')}: {error.get('description')}"
        if error is None and isinstance(reply.get("stream"), str) and isinstance(reply.get("seq"), int):
            return None
    return f"unreadable PubAck {data[:200]!r}"
