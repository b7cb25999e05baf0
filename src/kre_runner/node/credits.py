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
* bytes: the input bytes held plus those that may still arrive stay within ``max_bytes``
  (``KRT_MAX_INFLIGHT_BYTES``). Each request carries a byte budget (its ``max_bytes``): an equal
  share per message slot, ``max_bytes / cap`` per message asked for, at least one largest message
  (``message_bytes``), at most what is left. None is sent while less than one largest message is
  left. The open requests are kept in order (the server fills them in order): a request filled by
  count frees the rest of its budget. A backlog of 1 MiB envelopes then arrives at the pace the
  node works through it, instead of 256 MiB at once overflowing the server's buffer for the
  connection (it drops a "slow consumer"). A byte budget slows the server's deliveries (~10 % of
  a drain of small messages, bench/README.md), so a request carries one only when the messages
  seen so far (``largest``) could fill half the budget, and always before the first message;
* pace (sync handlers on the event loop only): while such a handler runs, the loop does nothing
  else, so inputs delivered behind it cannot be kept alive, and one pulled too many waits past its
  ack wait and is delivered again (its handler then runs twice). So at most ``window`` inputs are
  asked for and not yet started: as many as the recent calls let start within ``START_WITHIN`` of
  the ack wait. An input waits for the sum of the calls before it, so the pace is their mean
  (weighted to the recent ones): one call stretched by the machine moves it little, calls that
  alternate fast and slow move it by their average. One call of ``AT_ONCE`` of the ack wait or more
  paces at once: the inputs behind it need keep-alives before the next. Calls under ``floor`` (an
  eighth of the slowest mean that leaves all ``cap`` inputs unpaced) cannot move the pace and are
  not counted one by one; once a second the mean comes down to that second's true mean. ``paced``
  says the window binds (calls slower than the ack wait over ``cap``): the consumer then queues
  inputs as jobs, kept alive until they start.
"""

from __future__ import annotations

from collections import deque

__all__ = ["AT_ONCE", "START_WITHIN", "Credits"]

# Inputs asked for must be able to start within this part of the ack wait, at the measured pace.
START_WITHIN = 0.5
# One call this part of the ack wait or slower paces at once, whatever the mean.
AT_ONCE = 0.25
# The mean must pass the pace by this factor to move it up: not a shrink of the window every call.
_PACE_MARGIN = 1.25
# A sync handler's pace follows its calls' mean down by at most this factor a look (up: at once): a slow
# first call (a model warming up) paces the node for a few seconds, not for minutes.
_PACE_RELAX = 0.5


class Credits:
    """Pull-credit bookkeeping for one replica."""

    __slots__ = ("ack_wait", "cap", "careful", "chunk", "floor", "held_bytes", "largest", "max_bytes", "max_inflight",
                 "mean", "message_bytes", "open", "pace", "paced", "prefetch", "requested", "requested_bytes",
                 "running", "slots", "window")

    def __init__(self, max_inflight: int, max_bytes: int = 0, message_bytes: int = 1024 * 1024,
                 ack_wait: float = 30.0) -> None:
        self.max_inflight = max_inflight
        self.slots = max_inflight  # handlers that may run at once (1 while ``paced``: one sync handler on the loop)
        self.cap = 2 * max_inflight  # messages held from delivery to settlement
        self.chunk = max(1, max_inflight // 4)  # smallest request worth sending while busy
        self.requested = 0  # asked for, not yet delivered, expired or cancelled
        self.running = 0  # handlers running now
        self.prefetch = 0  # messages delivered ahead of a free slot (0, or ``chunk`` while handlers wait)
        self.ack_wait = ack_wait
        self.pace = 0.0  # the recent calls' time of a sync handler on the event loop (0: none measured)
        self.mean = 0.0  # its calls' weighted mean
        self.floor = ack_wait * START_WITHIN / self.cap / 8  # calls under this are left to ``relax``
        self.window = self.cap  # inputs that may be asked for and not yet started (see ``paced_by``)
        self.paced = False  # the window binds: inputs are queued as jobs rather than handled as they arrive
        self.max_bytes = max_bytes  # 0: no byte budget
        self.message_bytes = message_bytes  # the largest message the server may deliver (its max_payload)
        self.held_bytes = 0  # input bytes delivered and not yet settled
        self.requested_bytes = 0  # byte budget left in the requests still open
        self.open: deque[list[int]] = deque()  # [messages, bytes] left in each open request, oldest first
        self.largest = 0  # the largest message delivered so far
        self.careful = True  # one message at a time (see above); off at the first first-delivery

    def want(self, held: int, waiting: int) -> int:
        """How many messages to request now (``held``: being handled or published; ``waiting``: delivered, not
        started); 0 when not worth a request yet. Runs once or twice a message."""
        if self.careful:
            return 1 if held + waiting + self.requested == 0 else 0
        want = min(self.max_inflight + self.prefetch - self.running, self.cap - held, self.window) - waiting \
            - self.requested
        if want <= 0 or (want < self.chunk and held + waiting + self.requested > 0):
            return 0
        if (self.max_bytes and self.max_bytes - self.held_bytes - self.requested_bytes < self.message_bytes
                and held + waiting + self.requested > 0):
            return 0
        return want

    def bytes_left(self) -> int:
        """The byte budget not held nor promised to an open request."""
        return self.max_bytes - self.held_bytes - self.requested_bytes

    def opened(self, count: int) -> int:
        """A request for ``count`` messages is sent: its byte budget (``max_bytes``; 0: none), counted as open."""
        budget = 0
        if self.max_bytes and (not self.largest or (self.requested + count) * self.largest * 2 > self.max_bytes):
            budget = max(1, min(max(self.message_bytes, self.max_bytes * count // self.cap), self.bytes_left()))
        self.requested += count
        self.requested_bytes += budget
        self.open.append([count, budget])
        return budget

    def not_sent(self) -> None:
        """The request just ``opened`` could not be sent."""
        count, budget = self.open.pop()
        self.requested -= count
        self.requested_bytes -= budget

    def may_start(self) -> bool:
        """Whether a delivered message may start its handler now (else it waits for a slot)."""
        return self.running < self.slots

    def delivered(self, size: int) -> None:
        """A message of ``size`` bytes arrived for our oldest open request (runs once a message)."""
        self.held_bytes += size
        if size > self.largest:
            self.largest = size
        if self.open:
            self.requested -= 1
            head = self.open[0]
            head[0] -= 1
            head[1] -= size
            self.requested_bytes -= size
            if head[0] <= 0:  # filled by count: the rest of its budget is free again
                self.requested_bytes -= head[1]
                self.open.popleft()

    def freed(self, size: int) -> None:
        """A message of ``size`` bytes was settled: its bytes are free again."""
        self.held_bytes -= size

    def request_ended(self, unused: int | None, unused_bytes: int | None = None) -> None:
        """The oldest open request ended (expired, or its byte budget ran out); ``unused`` None: all of them."""
        if unused is None or not self.open:
            self.requested = self.requested_bytes = 0
            self.open.clear()
            return
        if unused == 0:
            return  # "Batch Completed": a request filled by count, already closed by its last message
        count, budget = self.open.popleft()
        self.requested -= count
        self.requested_bytes -= budget

    def handlers_wait(self, waiting: bool) -> None:
        """Whether handler calls wait on something (the last call decides): hold messages ahead for them."""
        self.prefetch = self.chunk if waiting else 0

    def called(self, seconds: float) -> None:
        """A sync handler on the event loop took ``seconds`` (over ``floor``): a slower pace shrinks the window."""
        # An exponentially weighted mean: the newest call weighs 1/8.
        mean = self.mean = self.mean * 0.875 + seconds * 0.125
        if seconds >= self.ack_wait * AT_ONCE:
            self.paced_by(max(seconds, mean))
        elif mean > self.pace * _PACE_MARGIN:
            self.paced_by(mean)

    def paced_by(self, seconds: float) -> None:
        """Calls take ``seconds`` now: at most as many inputs asked for as start within ``START_WITHIN``."""
        self.pace = seconds
        window = int(self.ack_wait * START_WITHIN / seconds) if seconds > 0 else self.cap
        self.window = max(1, min(self.cap, window))
        self.paced = self.window < self.cap
        self.slots = 1 if self.paced else self.max_inflight
        self.chunk = max(1, min(self.max_inflight, self.window) // 4)

    def relax(self, recent: float) -> None:
        """Once a second: ``recent``, the mean of the calls since the last look (0: none, the pace stays).

        The mean comes down to it (calls under ``floor`` were not counted, and one slow call weighs
        little after a second of others); a pace over the mean comes down, at most by half a look.
        """
        if recent <= 0:
            return
        if recent < self.mean:
            self.mean = recent
        if self.mean < self.pace:
            self.paced_by(max(self.mean, self.pace * _PACE_RELAX))
