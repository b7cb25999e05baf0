"""JetStream publishing without a round trip per message.

Outputs go out as plain publishes whose reply subject is ``<inbox>.<n>``; one wildcard
subscription receives every PubAck and calls the waiter registered for ``n``. This keeps many
publishes in flight with no task, future or inbox per message (nats-py's ``js.publish`` creates
all three and waits a round trip), which is what lets a Python node approach the server's rate.
A PubAck that does not come within the timeout counts as a failure, so a lost ack never wedges
the message that waits for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["PubAckPublisher", "PublishCallback"]

# Called once per publish: ``None`` on a stored PubAck (duplicates included), else the reason.
PublishCallback = Callable[[str | None], Awaitable[None]]


class PubAckPublisher:
    def __init__(self, nc: Client, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = nc.new_inbox() + "."
        self._counter = 0
        # token -> (deadline, callback); insertion order is deadline order (one fixed timeout).
        self._waiting: dict[str, tuple[float, PublishCallback]] = {}
        self._sub: Subscription | None = None

    @property
    def pending(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_puback)

    async def publish(self, subject: str, data: bytes, msg_id: str, done: PublishCallback) -> None:
        """Publish ``data``; ``done`` is awaited later with the PubAck's outcome."""
        self._counter += 1
        token = str(self._counter)
        self._waiting[token] = (time.monotonic() + self._timeout, done)
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers={"Nats-Msg-Id": msg_id})
        except Exception as exc:  # disconnected with a full buffer, payload too large, ...
            self._waiting.pop(token, None)
            await done(f"publish to {subject} failed: {type(exc).__name__}: {exc}")

    async def expire(self) -> None:
        """Fail every publish whose PubAck is overdue (called about once a second)."""
        now = time.monotonic()
        while self._waiting:
            token, (deadline, done) = next(iter(self._waiting.items()))
            if deadline > now:
                break
            del self._waiting[token]
            await done(f"no PubAck within {self._timeout:g}s")

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_puback(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if entry is None:
            return  # already timed out and retried
        await entry[1](_puback_error(msg))


def _puback_error(msg: Msg) -> str | None:
    data = msg.data
    if not data:
        status = (msg.headers or {}).get("Status", "")
        if status == "503":
            return "no JetStream stream captures the subject (503 no responders)"
        return f"empty PubAck (status {status or 'none'})"
    # A PubAck is {"stream":..,"seq":..[,"duplicate":true]}; only failures carry "error".
    if b'"error"' not in data:
        return None
    try:
        error = json.loads(data)["error"]
        return f"JetStream error {error.get('code')}: {error.get('description')}"
    except (ValueError, KeyError, AttributeError):
        return f"unreadable PubAck {data[:200]!r}"
