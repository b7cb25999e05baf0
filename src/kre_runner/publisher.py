"""Publishing on the hot path: JetStream publishes without a round trip each, and cheap acks.

Outputs go out as plain publishes whose reply subject is ``<inbox>.<n>``; one wildcard
subscription receives every PubAck and reports it for the waiter registered under ``n``. This
keeps many publishes in flight with no task, future or inbox per message (nats-py's
``js.publish`` creates all three and waits a round trip), which is what lets a Python node
approach the server's rate. A PubAck that does not come within the timeout counts as a failure,
so a lost PubAck never wedges the message that waits for it.

``Wire`` writes the protocol lines itself while connected: nats-py's ``publish`` re-validates and
re-encodes a header dict on every call, which costs more than the rest of a publish (~5.5 µs vs
~3.8 µs here), and a node publishes twice per message (output and ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError

from .dispatch import Dispatcher

__all__ = ["PubAckPublisher", "Wire"]

_FLUSH_WAIT = 5.0  # seconds a publish waits for a full outgoing buffer to be written


class Wire:
    """``PUB``/``HPUB`` straight into nats-py's outgoing buffer; its public API when not connected."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        # The fast path relies on nats-py internals (pinned <3); without them, the public API serves.
        self._fast = all(hasattr(nc, name) for name in ("_pending", "_pending_data_size", "_max_pending_size",
                                                         "_flush_queue", "_flush_pending", "_max_payload"))

    async def publish(self, subject: str, payload: bytes, reply: str = "", msg_id: str | None = None) -> None:
        nc = self._nc
        if not self._fast or not nc.is_connected:
            # Reconnecting: the public API applies nats-py's buffering limits and closed-state errors.
            headers = {"Nats-Msg-Id": msg_id} if msg_id is not None else None
            await nc.publish(subject, payload, reply=reply, headers=headers)
            return
        size = len(payload)
        if size > nc._max_payload:
            raise MaxPayloadError
        if msg_id is None:
            command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), size, payload)
        else:
            header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % msg_id.encode()
            command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), reply.encode(), len(header),
                                                           len(header) + size, header, payload)
        # What nats-py's _send_command does, without its coroutine: queue the bytes, and wake the
        # flusher task, or wait for it when the buffer is over its limit: backpressure, bounded,
        # since this may run in the reader task (see dispatch.py).
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        if nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(nc._flush_pending(force_flush=True), _FLUSH_WAIT)
        elif nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()


class PubAckPublisher:
    """Publishes with a PubAck expected; ``on_stored(token, error)`` is awaited once per publish.

    ``error`` is ``None`` when the stream stored the message (duplicates included), else the reason.
    """

    def __init__(self, nc: Client, dispatcher: Dispatcher, wire: Wire, timeout: float,
                 on_stored: Callable[[Any, str | None], Awaitable[None]]) -> None:
        self._nc = nc
        self._dispatcher = dispatcher
        self._wire = wire
        self._timeout = timeout
        self._on_stored = on_stored
        self._prefix = nc.new_inbox() + "."
        self._prefix_len = len(self._prefix)
        self._counter = 0
        # token -> (deadline, owner); insertion order is deadline order (one fixed timeout).
        self._waiting: dict[str, tuple[float, Any]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._dispatcher.subscribe(self._prefix + "*", self._on_puback)

    async def publish(self, subject: str, data: bytes, msg_id: str, owner: Any) -> None:
        """Publish ``data``; its outcome is reported later for ``owner``."""
        self._counter += 1
        token = str(self._counter)
        self._waiting[token] = (time.monotonic() + self._timeout, owner)
        try:
            await self._wire.publish(subject, data, self._prefix + token, msg_id)
        except Exception as exc:  # disconnected with a full buffer, payload too large, ...
            self._waiting.pop(token, None)
            await self._on_stored(owner, f"publish to {subject} failed: {type(exc).__name__}: {exc}")

    async def expire(self) -> None:
        """Fail every publish whose PubAck is overdue (called about once a second)."""
        now = time.monotonic()
        while self._waiting:
            token, (deadline, owner) = next(iter(self._waiting.items()))
            if deadline > now:
                break
            del self._waiting[token]
            await self._on_stored(owner, f"no PubAck within {self._timeout:g}s")

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_puback(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        entry = self._waiting.pop(subject[self._prefix_len:], None)
        if entry is None:
            return  # already timed out and retried
        # A PubAck is {"stream":..,"seq":..[,"duplicate":true]}; only failures carry "error".
        await self._on_stored(entry[1], None if data and b'"error"' not in data else _puback_error(data, headers))


def _puback_error(data: bytes, headers: dict[str, str] | None) -> str:
    if not data:
        status = (headers or {}).get("Status", "")
        if status == "503":
            return "no JetStream stream captures the subject (503 no responders)"
        return f"empty PubAck (status {status or 'none'})"
    try:
        error = json.loads(data)["error"]
        return f"JetStream error {error.get('code')}: {error.get('description')}"
    except (ValueError, KeyError, AttributeError):
        return f"unreadable PubAck {data[:200]!r}"
