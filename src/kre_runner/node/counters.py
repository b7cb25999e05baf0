"""What the node counts on its message path: plain integers and duration histograms, no lock.

The consumer and its modules update a :class:`NodeMetrics` with plain operations on the event loop's
thread; ops/metrics.py exposes it to Prometheus when scraped (the only reader, from the HTTP thread).
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Callable

__all__ = ["HANDLER_BUCKETS", "WORKFLOW_BUCKETS", "DurationHistogram", "NodeMetrics"]

HANDLER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)
# A whole workflow adds the hops between nodes and their queues.
WORKFLOW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0)


class DurationHistogram:
    """A histogram kept as plain numbers, filled in batches.

    ``observe`` is ``list.append`` (a C call, no Python frame: it runs once per message); the
    durations are sorted into the buckets by :meth:`fold`, which the consumer calls every second and
    every read calls first. Sorting a batch and cutting it at the bucket bounds costs a fraction of
    a bisect per message.
    """

    __slots__ = ("_counts", "_folding", "_pending", "_recent", "_sum", "bounds", "observe")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._recent = [0.0, 0]  # the sum and count of the durations folded since ``take_mean``
        self._pending: list[float] = []
        self.observe = self._pending.append
        # The consumer's ticker and the HTTP thread's reads both fold: one at a time.
        self._folding = threading.Lock()

    def take_mean(self) -> float:
        """The mean duration observed since the last call (0: none); the consumer paces sync handlers by it."""
        self.fold()
        with self._folding:
            total, count = self._recent
            self._recent = [0.0, 0]
        return total / count if count else 0.0

    def fold(self) -> None:
        """Move the durations observed since the last fold into the buckets."""
        pending = self._pending
        if not pending:
            return
        with self._folding:
            self._fold(pending)

    def _fold(self, pending: list[float]) -> None:
        # Take what is there now from the same list (``observe`` stays bound to it); a duration
        # appended meanwhile by the loop's thread stays for the next fold.
        taken = len(pending)
        if not taken:
            return
        batch = sorted(pending[:taken])
        del pending[:taken]
        start = 0
        for i, bound in enumerate(self.bounds):
            end = bisect_right(batch, bound, start)
            self._counts[i] += end - start
            start = end
        self._counts[-1] += len(batch) - start
        total = sum(batch)
        self._sum += total
        self._recent[0] += total
        self._recent[1] += len(batch)

    @property
    def counts(self) -> list[int]:
        self.fold()
        return self._counts

    @property
    def sum(self) -> float:
        self.fold()
        return self._sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs as the exposition format wants them."""
        buckets = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return buckets


def _zero() -> int:
    return 0


class NodeMetrics:
    """What the node counts; the consumer updates it on the event loop thread with plain operations.

    Outcomes of handled messages, each message counted once, when it is settled:

    * ``ok``: its output (or nothing, for a filter) was stored and the input acked;
    * ``error``: the handler raised or returned a wrong type; the error envelope was stored, input acked;
    * ``invalid``: the input was not an envelope; the error envelope was stored, input acked;
    * ``filtered``: the handler returned None (or the last node had already replied): nothing published;
    * ``retried``: nakked to be handled again (a publish failed, the handler raised ``Retry``, or it was
      handed back at shutdown);
    * ``dead_lettered``: out of deliveries, copied to the dead letters and terminated.

    Also ``publish_failures`` (publishes not stored: refused, no PubAck in time, no stream, ...; counted
    by the publisher, and nothing else), ``redeliveries`` (inputs delivered more than once, counted on
    each such delivery), and what failed when no publish did: ``interrupted`` (a handler's run cancelled
    by the shutdown before its outcome was published; the input is handed back), ``internal_errors``
    (the runner's own code failed building or sending an outcome; retried) and ``never_settled``
    (an input that lost a reference, retried by the keep-alive check: a bug). ``dead_letter_failures``
    counts dead-letter publishes refused (the copy, or the error envelope after it); ``dead_letters_held``
    returns the inputs the node holds, unacked, until their dead letter is stored.
    ``inflight`` returns the messages held by the consumer; ``consumer_pending`` and
    ``consumer_ack_pending`` come from the consumer's info (the consumer reads it every 5 s), ``None``
    until first read. ``influx_dropped`` and ``db_errors`` read the sinks' own counters.
    """

    def __init__(self) -> None:
        self.ok = 0
        self.error = 0
        self.invalid = 0
        self.filtered = 0
        self.retried = 0
        self.dead_lettered = 0
        self.publish_failures = 0
        self.interrupted = 0
        self.internal_errors = 0
        self.never_settled = 0
        self.dead_letter_failures = 0
        self.dead_letters_held: Callable[[], int] = _zero
        self.redeliveries = 0
        self.handler_seconds = DurationHistogram(HANDLER_BUCKETS)
        self.workflow_seconds = DurationHistogram(WORKFLOW_BUCKETS)
        # list.append, bound: metrics.observe_handler(seconds) costs one C call (see DurationHistogram).
        self.observe_handler = self.handler_seconds.observe
        self.observe_workflow = self.workflow_seconds.observe
        self.inflight: Callable[[], int] = _zero
        self.consumer_pending: int | None = None
        self.consumer_ack_pending: int | None = None
        self.influx_dropped: Callable[[], int] = _zero
        self.db_errors: Callable[[], int] = _zero

    def fold(self) -> None:
        """Sort the durations observed lately into their buckets (bounds the memory they hold)."""
        self.handler_seconds.fold()
        self.workflow_seconds.fold()

    @property
    def processed(self) -> int:
        """Messages settled with an ack (for /info)."""
        return self.ok + self.error + self.invalid + self.filtered

    @property
    def errors(self) -> int:
        """Messages that ended in an error envelope (for /info)."""
        return self.error + self.invalid
