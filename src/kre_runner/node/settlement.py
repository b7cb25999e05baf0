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
  dead-letter stream, then (once the copy is stored) an error envelope to the entrypoint; once
  both are stored it is terminated (never delivered again). If either is refused, the input is
  held, unacked and kept alive with ``+WPI``, and the refused publish retried from the node until
  stored (a nak would spend deliveries JetStream has few of left); /readyz fails meanwhile;
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

Over 400 lines, deliberately: every reason an input is acked, nakked, held or terminated stays in
this one module, where a reader finds them all at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from ..nats.fast import Wire
from .counters import NodeMetrics
from .credits import Credits
from .envelope import KreNatsMessage, KreNatsMessageV3

__all__ = [
    "DEAD_LETTER_COPY",
    "DEAD_LETTER_DELIVERIES",
    "DEAD_LETTER_TELL",
    "INTERNAL_ERROR",
    "INTERRUPTED",
    "NEVER_SETTLED",
    "Job",
    "Settlement",
    "hold_inflated",
    "nak_delay",
    "parse_ack_subject",
    "request_id",
    "retry_later",
]

# Why a job's own part failed when no publish did (the publisher counts failed publishes itself); each is
# counted under its own name when released, so kre_publish_failures counts only publishes.
INTERRUPTED = "interrupted before its outcome was published"  # cancelled (shutdown) between delivery and publish
INTERNAL_ERROR = "internal error: "  # the start of the reason for an error of the runner's own code
NEVER_SETTLED = "never settled"  # a job that lost a reference, found by the keep-alive check

_ACK = b"+ACK"
_IN_PROGRESS = b"+WPI"
_HAND_BACK = b"-NAK"
_TERMINATE = b"+TERM"
_NAK_DELAYS = (0.5, 1, 2, 5, 10, 30)  # seconds, by delivery count, for inputs whose outcome was not stored
_ACK_MEMORY = 32768  # inputs acked recently, remembered per generation (two generations)

# Deliveries beyond KRT_MAX_DELIVER on the consumer (setup.py): a delivery past the limit does not run
# the handler, it only moves the input to the dead letters; two of them, for replicas that stop (or die)
# while dead-lettering an input.
DEAD_LETTER_DELIVERIES = 2

# Job.dead_letter: which dead-letter publish the job waits for. The copy first; the error envelope only
# once the copy is stored, so that the entrypoint is never told of a dead letter that is not there.
DEAD_LETTER_COPY = 1
DEAD_LETTER_TELL = 2

# Publishes the dead-letter copy or the error envelope of a job, by ``Job.dead_letter`` (one reference
# per publish), see deadletter.py.
SendDeadLetter = Callable[["Job", str], Awaitable[None]]


class _Letter:
    """An input being dead-lettered: why, and how its refused publishes are retried."""

    __slots__ = ("held", "reason", "refusals", "refused", "retry_at")

    def __init__(self, reason: str) -> None:
        self.reason = reason  # why it is dead-lettered (Kre-Error, and the error envelope)
        self.held = False  # a publish of it was refused: held, unacked, until stored
        self.refusals = 0
        self.refused = ""  # what was refused last, and why
        self.retry_at = 0.0  # monotonic time of the next try


class Job:
    """One input message from delivery to settlement."""

    __slots__ = ("ack_subject", "data", "dead_letter", "early_exit", "envelope", "failed", "handled_at", "handling",
                 "inflated", "kind", "msg_id", "outbox", "refs", "replied", "retry_delay", "sends", "settled", "task",
                 "touched")

    def __init__(self, ack_subject: str, msg_id: str, now: float, data: bytes = b"") -> None:
        self.ack_subject = ack_subject
        self.msg_id = msg_id  # Nats-Msg-Id of its output: the same for every delivery of the input
        self.data = data  # the input as delivered (its size counts against KRT_MAX_INFLIGHT_BYTES)
        self.inflated = 0  # a compressed input: the bytes its envelope holds beyond len(data) (counted too)
        self.refs = 1  # the handler's own reference
        self.failed: str | None = None  # why its outcome was not stored, or why it must be retried
        self.retry_delay: float | None = None  # the handler's Retry(delay=...)
        self.dead_letter = 0  # being dead-lettered: DEAD_LETTER_COPY, then DEAD_LETTER_TELL
        self.kind: str | None = None  # what its outcome was, for the metrics: None (ok), error, invalid, filtered
        self.envelope: KreNatsMessage | KreNatsMessageV3 | None = None
        self.replied = False  # ctx.early_reply succeeded
        self.early_exit = False  # ctx.early_exit() was called
        self.handling = False  # its handler runs now (awaited by a worker): ctx.early_reply may act on it
        self.touched = now  # last sign of life sent to JetStream (delivery, or +WPI)
        self.handled_at = 0.0  # when its handler's part was over (0: still running or waiting)
        self.settled = False
        self.task: asyncio.Task[None] | None = None
        self.sends = 0  # KRE 3.x: ctx.send_* calls so far (each its own Nats-Msg-Id)
        self.outbox: list[tuple[str, bytes, str]] | None = None  # 3.x: sends held until an in-place call returns

    @property
    def seq(self) -> int:
        """The input's stream sequence (parsed when needed: only logs and naks use it)."""
        return parse_ack_subject(self.ack_subject)[1]

    @property
    def delivered(self) -> int:
        return parse_ack_subject(self.ack_subject)[2]

    def log_fields(self) -> dict[str, object]:
        """``extra=`` for a log line about this input (JSON logs carry them as fields)."""
        return {"tracking_id": request_id(self.envelope), "seq": self.seq}


class Settlement:
    """Acks, naks and keep-alives of one consumer. ``jobs``: the inputs being handled or published."""

    def __init__(self, wire: Wire, logger: logging.Logger, *, ack_wait: float, publish_timeout: float,
                 max_deliver: int = 0, dead_letter: SendDeadLetter | None = None, credits: Credits | None = None,
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
        self._metrics = metrics or NodeMetrics()  # settled inputs by outcome, why parts failed
        self._acked_now: set[str] = set()  # Nats-Msg-Ids of inputs acked recently, in two generations
        self._acked_before: set[str] = set()
        self._letters: dict[Job, _Letter] = {}  # inputs being dead-lettered (rare): why, and whether held
        self._metrics.dead_letters_held = self.held_dead_letters

    def out_of_deliveries(self, delivered: int) -> bool:
        """Whether a delivery this late only moves the input to the dead letters (its handler had its chances)."""
        return 0 < self._max_deliver < delivered

    async def drop_reference(self, job: Job, error: str | None = None) -> bool:
        """Drop one reference (``error``: why its part failed, None if it succeeded); True if this settled the input."""
        if error is not None:
            if error == INTERRUPTED:
                self._metrics.interrupted += 1
            elif error == NEVER_SETTLED:
                self._metrics.never_settled += 1
            elif error.startswith(INTERNAL_ERROR):
                self._metrics.internal_errors += 1
            if job.failed is None:
                job.failed = error
        job.refs -= 1
        if job.refs or job.settled:
            return False
        if job.failed is None:
            command = _TERMINATE if job.dead_letter else _ACK
            metrics = self._metrics
            if job.dead_letter:
                if job.dead_letter == DEAD_LETTER_COPY:  # the copy is stored: now tell the entrypoint
                    return await self._dead_letter_step(job, DEAD_LETTER_TELL)
                self.dead_lettered += 1
                metrics.dead_lettered += 1
                letter = self._letters.pop(job, None)
                if letter is not None and letter.held:
                    self._log.warning("input seq %d dead-lettered at last, after %d refused attempt(s)", job.seq,
                                      letter.refusals, extra=job.log_fields())
            else:
                self.acked += 1
                self._acked_now.add(job.msg_id)
                if job.kind is None:
                    metrics.ok += 1
                else:
                    setattr(metrics, job.kind, getattr(metrics, job.kind) + 1)
        elif job.dead_letter:
            # Its dead-letter copy or error envelope was not stored. A nak would spend one of the few
            # deliveries JetStream has left for it (KRT_MAX_DELIVER + DEAD_LETTER_DELIVERIES), and then
            # strand it: the node holds it instead, with keep-alives, and tries again (keep_alive).
            self._hold(job)
            return False
        elif self._dead_letter is not None and job.delivered >= self._max_deliver > 0:
            # Out of deliveries: the dead-letter copy, then the error envelope, hold the job until stored.
            self._letters[job] = _Letter(job.failed)
            self._log.error("input seq %d failed on all %d deliveries: dead-lettering it: %s", job.seq,
                            job.delivered, job.failed, extra=job.log_fields())
            job.failed = None
            return await self._dead_letter_step(job, DEAD_LETTER_COPY)
        else:
            self.nakked += 1
            self._metrics.retried += 1
            delay = job.retry_delay
            if delay is None:
                delay = nak_delay(job.delivered)
            self._log.warning("input seq %d will be retried in %gs: %s", job.seq, delay, job.failed,
                              extra=job.log_fields())
            command = b'-NAK {"delay": %d}' % int(delay * 1e9)
        # _settle, in place: a coroutine per input here cost ~1 % of a message (bench/README.md).
        self._close(job)
        try:
            await self._wire.publish(job.ack_subject, command)
        except Exception as exc:
            self._lost(job, command, exc)
        return True

    async def _dead_letter_step(self, job: Job, stage: int) -> bool:
        """Publish the copy (``DEAD_LETTER_COPY``) or the error envelope (``DEAD_LETTER_TELL``) of ``job``."""
        assert self._dead_letter is not None  # jobs are dead-lettered only when it is set
        job.dead_letter = stage
        job.refs = 1  # held here until the publish below has its reference
        await self._dead_letter(job, self._letters[job].reason)
        return await self.drop_reference(job)

    def _hold(self, job: Job) -> None:
        """A dead-letter publish of ``job`` was refused: keep the input, unacked and alive, and retry it later."""
        letter = self._letters[job]
        what = "its dead-letter copy" if job.dead_letter == DEAD_LETTER_COPY else "its error envelope"
        reason, job.failed = job.failed, None
        letter.refusals += 1
        letter.refused = f"{what}: {reason}"
        letter.retry_at = time.monotonic() + nak_delay(letter.refusals)
        self._metrics.dead_letter_failures += 1
        job.handled_at = 0.0  # waiting for no PubAck now: it gets keep-alives like a running handler
        if not letter.held:
            letter.held = True
            self._log.error("input seq %d: %s was refused (%s): the node holds the input, unacked, and retries "
                            "until it is stored (every %gs at most); no error envelope goes out before its copy is "
                            "stored, and /readyz says the node cannot dead-letter meanwhile", job.seq, what, reason,
                            _NAK_DELAYS[-1], extra=job.log_fields())
        else:
            self._log.debug("input seq %d: %s refused again (attempt %d): %s", job.seq, what, letter.refusals, reason)

    def held_dead_letters(self) -> int:
        """Inputs held because a dead-letter publish was refused (the gauge ``kre_dead_letter_held_messages``)."""
        return sum(1 for letter in self._letters.values() if letter.held)

    def cannot_dead_letter(self) -> str | None:
        """Why dead letters are not being stored now (for /readyz), None when none is held."""
        held = [letter for letter in self._letters.values() if letter.held]
        if not held:
            return None
        return (f"{len(held)} input(s) held unacked and retried until stored; last refused: "
                f"{max(held, key=lambda letter: letter.retry_at).refused}")

    async def redelivered(self, job: Job, delivered: int, release: Callable[[Job], Awaitable[None]]) -> bool:
        """A redelivery: settled here when running the handler again would be wrong (acked before, or out of
        deliveries: ``release`` then dead-letters it); True if so."""
        self._metrics.redeliveries += 1
        self._log.info("input seq %d redelivered (delivery %d)", job.seq, delivered, extra={"seq": job.seq})
        if await self.acked_before(job):
            return True
        if not self.out_of_deliveries(delivered):
            return False
        job.failed = (f"the handler ran {self._max_deliver} times (KRT_MAX_DELIVER) with no outcome: the process "
                      f"died or hung on it, its acks were lost, or its dead letter was refused")
        self.jobs.add(job)
        job.handled_at = time.monotonic()
        await release(job)
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
        letter = self._letters.pop(job, None)
        refused = letter.refused if letter is not None and letter.held else ""
        # Deliveries JetStream has left for it (the consumer's max_deliver is KRT_MAX_DELIVER + DEAD_LETTER_DELIVERIES).
        spare = self._max_deliver + DEAD_LETTER_DELIVERIES - job.delivered if self._max_deliver > 0 else 1
        if spare <= 0:
            stream, seq, _ = parse_ack_subject(job.ack_subject)
            self._log.error("input seq %d is returned (%s) on its last delivery (KRT_MAX_DELIVER + %d)%s: JetStream "
                            "will not deliver it again; it stays unacked in stream %s at seq %d: copy it by hand "
                            "(nats stream get %s %d) and publish it again", job.seq, why, DEAD_LETTER_DELIVERIES,
                            f", not dead-lettered: {refused} was refused" if refused else "", stream, seq, stream,
                            seq, extra=job.log_fields())
        elif refused:
            self._log.error("returning input seq %d for redelivery (%s) without its dead letter: %s was refused; "
                            "the replica it goes to dead-letters it without running the handler (%d spare "
                            "deliveries left)", job.seq, why, refused, spare, extra=job.log_fields())
        else:
            self._log.warning("returning input seq %d for redelivery: %s", job.seq, why, extra=job.log_fields())
        await self._settle(job, _HAND_BACK)

    def _close(self, job: Job) -> None:
        """``job`` is settled: the one place its state changes for it (out of the held inputs, its bytes free),
        just before its ack, nak or termination is sent."""
        job.settled = True
        self.jobs.discard(job)
        self._credits.freed(len(job.data) + job.inflated)

    async def _settle(self, job: Job, command: bytes) -> None:
        """Settle ``job`` with ``command`` (the cold paths: acked before, handed back; ``drop_reference`` sends in
        place)."""
        self._close(job)
        try:
            await self._wire.publish(job.ack_subject, command)
        except Exception as exc:
            self._lost(job, command, exc)

    async def keep_alive(self, now: float, waiting: Iterable[Job], after: float | None = None) -> list[Job]:
        """``+WPI`` for inputs still being handled, waiting for a slot or held as dead letters, silent for longer
        than ``after`` (default half the ack wait); returns those settled.

        A job whose handler is done waits only for PubAcks, which the publisher fails after the
        publish timeout; one still unsettled twice that long after has lost a reference (a bug):
        it is nakked rather than kept forever. Held dead letters whose retry is due are published again.
        """
        stuck: list[Job] = []
        if after is None:
            after = self._keepalive_after
        for job, letter in list(self._letters.items()):
            # A held dead letter whose retry is due (refs 0: no publish of it in flight).
            due = letter.held and not job.refs and not job.settled and letter.retry_at <= now
            if due and await self._dead_letter_step(job, job.dead_letter):
                stuck.append(job)
        for job in [*self.jobs, *waiting]:
            if job.handled_at and now - job.handled_at > self._publish_timeout:
                if now - job.handled_at > 2 * self._publish_timeout + 1:
                    self._log.error("input seq %d was never settled (%d references left): retrying it",
                                    job.seq, job.refs)
                    job.refs = 1
                    await self.drop_reference(job, NEVER_SETTLED)
                    stuck.append(job)
                continue
            if now - job.touched > after:
                job.touched = now
                try:
                    await self._wire.publish(job.ack_subject, _IN_PROGRESS)
                except Exception as exc:
                    self._lost(job, _IN_PROGRESS, exc)
        return stuck

    def _lost(self, job: Job, command: bytes, exc: Exception) -> None:
        self._log.warning("could not send %s for input seq %d (redelivered after the ack wait; its output is "
                          "not duplicated): %s", command[:4].decode(), job.seq, exc)


def request_id(envelope: KreNatsMessage | KreNatsMessageV3 | None) -> str | None:
    """What identifies the request an input belongs to in logs: v2's ``tracking_id``, 3.x's ``request_id``."""
    if envelope is None:
        return None
    return envelope.tracking_id if type(envelope) is KreNatsMessage else envelope.request_id  # type: ignore[union-attr]


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
