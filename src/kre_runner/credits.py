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
  requests) unless the replica is idle, when any amount is worth asking for;
* careful: at start, and after a redelivery, one message at a time until a first delivery comes.
  A process that died on an input had every input it held redelivered, counted as one more
  delivery each; pulling them again all at once would let a poison input that kills the process
  every time take the others' deliveries with it (and so to the dead letters). Alone, each
  redelivered input runs on its own, and the poison input alone runs out of deliveries;
* bytes: the input bytes held plus those asked for stay within ``max_bytes``
  (``KRT_MAX_INFLIGHT_BYTES``): each request carries the rest of that budget as its ``max_bytes``,
  and none is sent while less than one largest message (``message_bytes``) is left. A backlog of
  1 MiB envelopes then arrives at the pace the node works through it, instead of 256 MiB at once
  overflowing the server's buffer for the connection (it drops a "slow consumer").
"""

from __future__ import annotations

__all__ = ["Credits"]


class Credits:
    """Pull-credit bookkeeping for one replica."""

    __slots__ = ("batch", "cap", "careful", "held_bytes", "max_bytes", "max_inflight", "message_bytes", "prefetch",
                 "requested", "requested_bytes", "running")

    def __init__(self, max_inflight: int, max_bytes: int = 0, message_bytes: int = 1024 * 1024) -> None:
        self.max_inflight = max_inflight
        self.cap = 2 * max_inflight  # messages held from delivery to settlement
        self.batch = max(1, max_inflight // 4)  # smallest request worth sending while busy
        self.requested = 0  # asked for, not yet delivered, expired or cancelled
        self.running = 0  # handlers running now
        self.prefetch = 0  # messages delivered ahead of a free slot (0, or ``batch`` while handlers wait)
        self.max_bytes = max_bytes  # 0: no byte budget
        self.message_bytes = message_bytes  # the largest message the server may deliver (its max_payload)
        self.held_bytes = 0  # input bytes delivered and not yet settled
        self.requested_bytes = 0  # byte budget of the requests still open
        self.careful = True  # one message at a time (see above); off at the first first-delivery

    def free(self, held: int, waiting: int) -> int:
        """Messages that may still come: ``held`` are being handled or published, ``waiting`` wait for a slot."""
        return min(self.max_inflight + self.prefetch - self.running, self.cap - held) - waiting

    def want(self, held: int, waiting: int) -> int:
        """How many messages to request now; 0 when not worth a request yet (runs once or twice a message)."""
        if self.careful:
            return 1 if held + waiting + self.requested == 0 else 0
        # free() - requested, inline: a second call here costs more than the arithmetic.
        want = min(self.max_inflight + self.prefetch - self.running, self.cap - held) - waiting - self.requested
        if want <= 0 or (want < self.batch and held + waiting + self.requested > 0):
            return 0
        if (self.max_bytes and self.max_bytes - self.held_bytes - self.requested_bytes < self.message_bytes
                and held + waiting + self.requested > 0):
            return 0
        return want

    def bytes_left(self) -> int:
        """The byte budget a new request may carry."""
        return self.max_bytes - self.held_bytes - self.requested_bytes

    def may_start(self) -> bool:
        """Whether a delivered message may start its handler now (else it waits for a slot)."""
        return self.running < self.max_inflight

    def delivered(self, size: int) -> None:
        """A message of ``size`` bytes arrived for one of our requests (the consumer inlines this)."""
        if self.requested > 0:
            self.requested -= 1
        self.held_bytes += size
        self.requested_bytes = max(0, self.requested_bytes - size)

    def settled(self, size: int) -> None:
        """A message of ``size`` bytes was settled: its bytes are free again."""
        self.held_bytes -= size

    def request_ended(self, unused: int | None, unused_bytes: int | None = None) -> None:
        """A pull request ended (expired, or could not be filled); ``unused`` None when unknown: all of it."""
        self.requested = 0 if unused is None else max(0, self.requested - unused)
        if unused_bytes is not None:
            self.requested_bytes = max(0, self.requested_bytes - unused_bytes)
        if not self.requested:
            self.requested_bytes = 0

    def handlers_wait(self, waiting: bool) -> None:
        """Whether handler calls wait on something (the last call decides): hold messages ahead for them."""
        self.prefetch = self.batch if waiting else 0
