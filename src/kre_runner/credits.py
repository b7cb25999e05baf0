"""Pull credits: how many messages a replica asks JetStream for, so the server streams ahead but never floods.

Pure arithmetic, no I/O: the consumer tells it what happened (a message delivered, a request
ended, a handler started or finished) and asks :meth:`Credits.want` how many messages to request.

The bounds, per replica:

* at most ``max_inflight`` handlers run at once (``running``); a slot is free again as soon as its
  handler returns, not when its output's PubAck comes back a round trip later;
* at most ``2 × max_inflight`` messages are held between delivery and settlement (``held``):
  the other ``max_inflight`` wait only for their outputs' PubAcks;
* while handler calls wait on something (``prefetch`` on), a quarter of ``max_inflight`` more
  messages are delivered ahead and wait for a slot, so a freed slot starts its next message at
  once instead of a pull round trip later;
* requests are sent in chunks of at least a quarter of ``max_inflight`` (fewer, larger pull
  requests) unless the replica is idle, when any amount is worth asking for.
"""

from __future__ import annotations

__all__ = ["Credits"]


class Credits:
    """Pull-credit bookkeeping for one replica."""

    __slots__ = ("batch", "cap", "max_inflight", "prefetch", "requested", "running")

    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.cap = 2 * max_inflight  # messages held from delivery to settlement
        self.batch = max(1, max_inflight // 4)  # smallest request worth sending while busy
        self.requested = 0  # asked for, not yet delivered, expired or cancelled
        self.running = 0  # handlers running now
        self.prefetch = 0  # messages delivered ahead of a free slot (0, or ``batch`` while handlers wait)

    def free(self, held: int, waiting: int) -> int:
        """Messages that may still come: ``held`` are being handled or published, ``waiting`` wait for a slot."""
        return min(self.max_inflight + self.prefetch - self.running, self.cap - held) - waiting

    def want(self, held: int, waiting: int) -> int:
        """How many messages to request now; 0 when not worth a request yet."""
        want = self.free(held, waiting) - self.requested
        if want <= 0 or (want < self.batch and held + waiting + self.requested > 0):
            return 0
        return want

    def may_start(self) -> bool:
        """Whether a delivered message may start its handler now (else it waits for a slot)."""
        return self.running < self.max_inflight

    def delivered(self) -> None:
        """A message arrived for one of our requests."""
        if self.requested > 0:
            self.requested -= 1

    def request_ended(self, unused: int | None) -> None:
        """A pull request ended (expired, or could not be filled); ``unused`` None when unknown: all of it."""
        self.requested = 0 if unused is None else max(0, self.requested - unused)

    def handlers_wait(self, waiting: bool) -> None:
        """Whether handler calls wait on something (the last call decides): hold messages ahead for them."""
        self.prefetch = self.batch if waiting else 0
