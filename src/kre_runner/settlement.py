"""Settlement: the one module that acks, naks and keeps inputs alive. Every reason is here.

Each delivered input is a :class:`Job` holding references: one for its handler (released by the
consumer in a ``finally``, whatever raised or was cancelled), one per publish waiting for its
PubAck (output, error envelope, early reply). When the last reference goes, the input is
settled, exactly once (``Job.settled``):

* ``+ACK`` — every publish it made was stored (an output, an error envelope, a pass-through; or
  nothing to publish: a filter, a last node whose request was already answered);
* ``-NAK`` with a delay growing with the delivery count — a publish failed or its PubAck did not
  come in time, or the pipeline was interrupted before its outcome was published: retried, and
  the redelivery republishes with the same ``Nats-Msg-Id``, so the stream drops the duplicate;
  with the handler's own delay when it raised ``kre_runner.Retry``;
* dead-lettered, then ``+TERM`` — the input failed so on its ``KRT_MAX_DELIVER``-th delivery, or
  arrives for a further delivery (the process died or hung on it every time): a copy goes to the
  dead-letter stream and an error envelope to the entrypoint; once both are stored it is
  terminated (never delivered again). If they cannot be stored it is nakked and tried again;
* ``+ACK`` at once, without running the handler — a redelivered input this node acked recently (a
  restarted server that lost recent ack state): running it again would duplicate its output once
  the stream has forgotten its ``Nats-Msg-Id``;
* ``-NAK`` at once (:meth:`Settlement.hand_back`) — the node is stopping: a message that never
  started, or one still running when the shutdown grace ran out, goes to another replica now
  rather than after the ack wait;
* ``+WPI`` (:meth:`Settlement.keep_alive`) — a handler still running, or a message waiting for a
  free slot, past half the ack wait: JetStream must not redeliver it meanwhile. A job whose
  handler is done gets none past the publish timeout: its PubAcks are due by then.

A lost ack or nak (the connection dropped) is logged: JetStream redelivers after the ack wait and
``Nats-Msg-Id`` keeps the output single.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from .credits import Credits
from .envelope import KreNatsMessage
from .metrics import NodeMetrics
from .natsfast import Wire

__all__ = ["Job", "Settlement", "hold_inflated", "nak_delay", "parse_ack_subject", "retry_later"]

_ACK = b"+ACK"
_IN_PROGRESS = b"+WPI"
_HAND_BACK = b"-NAK"
_TERMINATE = b"+TERM"
_NAK_DELAYS = (0.5, 1, 2, 5, 10, 30)  # seconds, by delivery count, for inputs whose outcome was not stored
_ACK_MEMORY = 32768  # inputs acked recently, remembered per generation (two generations)

# Publishes the dead-letter copy and error envelope of a job (one reference each), see deadletter.py.
DeadLetter = Callable[["Job", str], Awaitable[None]]


class Job:
    """One input message from delivery to settlement."""

    __slots__ = ("ack_subject", "data", "dead_letter", "done", "early_exit", "envelope", "failed", "inflated", "kind",
                 "msg_id", "refs", "replied", "retry_delay", "settled", "task", "touched")

    def __init__(self, ack_subject: str, msg_id: str, now: float, data: bytes = b"") -> None:
        self.ack_subject = ack_subject
        self.msg_id = msg_id  # Nats-Msg-Id of its output: the same for every delivery of the input
        self.data = data  # the input as delivered (its size counts against KRT_MAX_INFLIGHT_BYTES)
        self.inflated = 0  # a compressed input: the bytes its envelope holds beyond len(data) (counted too)
        self.refs = 1  # the handler's own reference
        self.failed: str | None = None  # why its outcome was not stored, or why it must be retried
        self.retry_delay: float | None = None  # the handler's Retry(delay=...)
        self.dead_letter = False  # being dead-lettered: its publishes are the copy and the error envelope
        self.kind: str | None = None  # what its outcome was, for the metrics: None (ok), error, invalid, filtered
        self.envelope: KreNatsMessage | None = None
        self.replied = False  # ctx.early_reply succeeded
        self.early_exit = False  # ctx.early_exit() was called
        self.touched = now  # last sign of life sent to JetStream (delivery, or +WPI)
        self.done = 0.0  # when its handler's part was over (0: still running or waiting)
        self.settled = False
        self.task: asyncio.Task[None] | None = None

    @property
    def seq(self) -> int:
        """The input's stream sequence (parsed when needed: only logs and naks use it)."""
        return parse_ack_subject(self.ack_subject)[1]

    @property
    def delivered(self) -> int:
        return parse_ack_subject(self.ack_subject)[2]

    def log_fields(self) -> dict[str, object]:
        """``extra=`` for a log line about this input (JSON logs carry them as fields)."""
        return {"tracking_id": self.envelope.tracking_id if self.envelope is not None else None, "seq": self.seq}


class Settlement:
    """Acks, naks and keep-alives of one consumer. ``jobs``: the inputs being handled or published."""

    def __init__(self, wire: Wire, logger: logging.Logger, *, ack_wait: float, publish_timeout: float,
                 max_deliver: int = 0, dead_letter: DeadLetter | None = None, credits: Credits | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        self._wire = wire
        self._log = logger
        self._keepalive_after = ack_wait / 2
        self._publish_timeout = publish_timeout
        self._max_deliver = max_deliver  # 0: no limit
        self._dead_letter = dead_letter
        self.jobs: set[Job] = set()  # added by the consumer when a handler starts, removed here
        self.acked = 0
        self.nakked = 0
        self.dead_lettered = 0
        self._credits = credits or Credits(1)  # settling an input frees the bytes it held
        self._metrics = metrics or NodeMetrics()  # settled inputs by outcome, publish failures
        self._acked_now: set[str] = set()  # Nats-Msg-Ids of inputs acked recently, in two generations
        self._acked_before: set[str] = set()

    def out_of_deliveries(self, delivered: int) -> bool:
        """Whether a delivery this late only moves the input to the dead letters (its handler had its chances)."""
        return 0 < self._max_deliver < delivered

    async def release(self, job: Job, error: str | None = None) -> bool:
        """Drop one reference (``error``: why its part failed, None if it succeeded); True if this settled the input."""
        if error is not None:
            self._metrics.publish_failures += 1
            if job.failed is None:
                job.failed = error
        job.refs -= 1
        if job.refs or job.settled:
            return False
        if job.failed is None:
            command = _TERMINATE if job.dead_letter else _ACK
            metrics = self._metrics
            if job.dead_letter:
                self.dead_lettered += 1
                metrics.dead_lettered += 1
            else:
                self.acked += 1
                self._acked_now.add(job.msg_id)
                if job.kind is None:
                    metrics.ok += 1
                else:
                    setattr(metrics, job.kind, getattr(metrics, job.kind) + 1)
        elif not job.dead_letter and self._dead_letter is not None and job.delivered >= self._max_deliver > 0:
            # Out of deliveries: the dead-letter copy and error envelope hold the job until stored.
            job.dead_letter, reason, job.failed = True, job.failed, None
            self._log.error("input seq %d failed on all %d deliveries: dead-lettering it: %s", job.seq,
                            job.delivered, reason, extra=job.log_fields())
            job.refs = 1
            await self._dead_letter(job, reason)
            return await self.release(job)
        else:
            self.nakked += 1
            self._metrics.retried += 1
            delay = job.retry_delay
            if delay is None:
                delay = nak_delay(job.delivered)
            self._log.warning("input seq %d will be retried in %gs: %s", job.seq, delay, job.failed,
                              extra=job.log_fields())
            command = b'-NAK {"delay": %d}' % int(delay * 1e9)
        job.settled = True
        self.jobs.discard(job)
        self._credits.held_bytes -= len(job.data) + job.inflated
        try:
            await self._wire.publish(job.ack_subject, command)
        except Exception as exc:
            self._lost(job, command, exc)
        return True

    async def acked_before(self, job: Job) -> bool:
        """A redelivered input this node acked recently: ack it again, at once; True if so."""
        if job.msg_id not in self._acked_now and job.msg_id not in self._acked_before:
            return False
        self._log.warning("input seq %d was acked already (the server lost its ack state?): acking it again "
                          "without running the handler", job.seq)
        await self._settle(job, _ACK)
        return True

    def age_memory(self) -> None:
        """Called every second: past ``_ACK_MEMORY`` inputs acked, start a new generation of them."""
        if len(self._acked_now) >= _ACK_MEMORY:
            self._acked_before, self._acked_now = self._acked_now, set()

    async def hand_back(self, job: Job, why: str) -> None:
        """The node is stopping: give an unsettled input to another replica now (``why`` is logged)."""
        if job.settled:
            return
        self.nakked += 1
        self._metrics.retried += 1
        self._log.warning("returning input seq %d for redelivery: %s", job.seq, why, extra=job.log_fields())
        await self._settle(job, _HAND_BACK)

    async def _settle(self, job: Job, command: bytes) -> None:
        """Settle ``job`` with ``command`` (what ``release`` does inline, once per message, for acks and naks)."""
        job.settled = True
        self.jobs.discard(job)
        self._credits.held_bytes -= len(job.data) + job.inflated
        try:
            await self._wire.publish(job.ack_subject, command)
        except Exception as exc:
            self._lost(job, command, exc)

    async def keep_alive(self, now: float, waiting: Iterable[Job]) -> list[Job]:
        """``+WPI`` for inputs still being handled or waiting for a slot; returns those settled as stuck.

        A job whose handler is done waits only for PubAcks, which the publisher fails after the
        publish timeout; one still unsettled twice that long after has lost a reference (a bug):
        it is nakked rather than kept forever.
        """
        stuck: list[Job] = []
        for job in [*self.jobs, *waiting]:
            if job.done and now - job.done > self._publish_timeout:
                if now - job.done > 2 * self._publish_timeout + 1:
                    self._log.error("input seq %d was never settled (%d references left): retrying it",
                                    job.seq, job.refs)
                    job.refs = 1
                    await self.release(job, "never settled")
                    stuck.append(job)
                continue
            if now - job.touched > self._keepalive_after:
                job.touched = now
                try:
                    await self._wire.publish(job.ack_subject, _IN_PROGRESS)
                except Exception as exc:
                    self._lost(job, _IN_PROGRESS, exc)
        return stuck

    def _lost(self, job: Job, command: bytes, exc: Exception) -> None:
        self._log.warning("could not send %s for input seq %d (redelivered after the ack wait; its output is "
                          "not duplicated): %s", command[:4].decode(), job.seq, exc)


def hold_inflated(job: Job, envelope: KreNatsMessage, credits: Credits) -> None:
    """A compressed input was inflated: until it settles it holds its envelope's size, not its wire size.

    The extra bytes count against ``KRT_MAX_INFLIGHT_BYTES`` (so the node pulls less meanwhile) and
    settlement frees them with the input's own.
    """
    extra = envelope.ByteSize() - len(job.data)
    if extra > 0:
        job.inflated = extra
        credits.held_bytes += extra


def retry_later(job: Job, reason: str, delay: float) -> None:
    """The handler raised ``kre_runner.Retry``: nothing is published now; the input is nakked with ``delay``."""
    job.failed = f"the handler asked for a retry: {reason or 'Retry'}"
    job.retry_delay = delay


def nak_delay(delivered: int) -> float:
    """Seconds before an input whose outcome was not stored on its ``delivered``-th delivery is retried."""
    return _NAK_DELAYS[min(delivered, len(_NAK_DELAYS)) - 1]


def parse_ack_subject(reply: str) -> tuple[str, int, int]:
    """(stream, stream sequence, delivery count) from a ``$JS.ACK`` reply subject (v1 or v2 form)."""
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return tokens[2], int(tokens[5]), int(tokens[4])
        if len(tokens) >= 11:  # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>...
            return tokens[4], int(tokens[7]), int(tokens[6])
    except ValueError:
        pass
    return "unknown", 0, 1
