"""What a handled input publishes: the output, error, pass-through and early-reply envelopes.

An outcome is ``(subject, envelope bytes)``, or ``None`` when the input publishes nothing. These
builders do no I/O and never raise to the loop: whatever goes wrong while building an output
(an unserialisable message, an envelope too large even compressed) becomes an error envelope,
and an error envelope that cannot be built whole is cut down until it can (error text shortened,
then the tracking left out). Outputs and error envelopes share the input's ``Nats-Msg-Id``, so a
redelivered input yields one result or one error, never both.

Where each goes:

* output → ``KRT_NATS_OUTPUT``; after ``ctx.early_exit()`` → ``KRT_NATS_ENTRYPOINT_SUBJECT`` with
  ``early_exit = true``; nothing on the last node once the request was answered early;
* error envelope, and an input that already carries ``error`` (passed on unchanged with this
  node's tracking entry, the handler not called) → the entrypoint subject (else the output);
* early reply → the entrypoint subject, its ``Nats-Msg-Id`` the input's plus ``:reply``.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from typing import Any

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

from ..config import Settings
from .envelope import EnvelopeError, KreNatsMessage, TrackingClock, decode, encode
from .failures import RateLimitedLog
from .settlement import Job

__all__ = ["Outcome", "Outcomes"]

Outcome = tuple[str, bytes] | None
_HEADER_ROOM = 512  # room left in max_payload for the Nats-Msg-Id header and protocol line
_MAX_REASON = 8192  # characters of an error text kept in an error envelope
# The runner's own frames (every sub-package) and the standard library's (asyncio, the thread pool).
_RUNNER_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sysconfig.get_paths()["stdlib"])


class Outcomes:
    """Builds outcomes for one node. ``limit``: the largest envelope it may publish (set at setup)."""

    envelope_type: type = KreNatsMessage  # the generation's envelope (v3.py's OutcomesV3: the 3.x one)
    # v2: an input that already carries an error is passed on without calling the handler (3.x: it is not).
    passes_errors_on = True

    def __init__(self, settings: Settings, clock: TrackingClock, logger: logging.Logger,
                 failures: RateLimitedLog | None = None) -> None:
        self._node_name = settings.node_name
        self._is_last_node = settings.is_last_node
        self._output_subject = settings.output_subject
        self._entrypoint_subject = settings.entrypoint_subject
        self._error_subject = settings.entrypoint_subject or settings.output_subject
        self._clock = clock
        self._log = logger
        # Handler failures: tracebacks for the first few a minute, then one line counting the rest.
        self._failures = failures or RateLimitedLog(logger, "handler failures")
        self._type_urls: dict[Any, str] = {}
        self.limit = 1024 * 1024 - _HEADER_ROOM
        # The most a compressed input may inflate to (decode's bound), set again once connected.
        self.max_inflated = settings.inflated_limit(1024 * 1024)
        self.errors = 0  # error envelopes built for this node's own failures
        self.passed_errors = 0  # inputs that already carried an error

    def decode(self, data: bytes) -> Any:
        """An input of this generation (for a dead letter whose envelope was never decoded)."""
        return decode(data, self.max_inflated, self.envelope_type)

    def now(self) -> str:
        """The current time as a tracking timestamp."""
        return self._clock.now()[1]

    def set_publish_limit(self, max_bytes: int) -> None:
        """The server's or output stream's message size limit, less room for headers."""
        self.limit = max_bytes - _HEADER_ROOM

    def output(self, job: Job, envelope: KreNatsMessage, result: Any, start: tuple[float, str],
               end: tuple[float, str]) -> Outcome:
        """The handler returned ``result``: the output envelope, an error envelope, or nothing."""
        if result is None or (self._is_last_node and (envelope.replied or job.replied)):
            job.kind = "filtered"
            return None  # a filter, or the entrypoint already has its answer
        # The input envelope becomes the output: tracking_id, reply, replied and tracking carry over.
        tracked = False
        try:
            if isinstance(result, Message) and not isinstance(result, AnyProto):
                self._pack(envelope.payload, result)
            elif isinstance(result, AnyProto):
                envelope.payload.CopyFrom(result)
            else:
                reason = (f"handler returned {type(result).__name__}; expected a protobuf message, "
                          f"google.protobuf.Any or None")
                self._failures.log(logging.WARNING, "input seq %d: %s", job.seq, reason, extra=job.log_fields())
                return self.error(job, envelope, reason, start[1])
            if job.replied:
                envelope.replied = True
            subject = self._output_subject
            if job.early_exit:
                envelope.early_exit = True
                subject = self._entrypoint_subject or subject  # early_exit() checked it is set
            entry = envelope.tracking.add()
            tracked = True
            entry.node_name = self._node_name
            entry.start = start[1]
            entry.end = end[1]
            return subject, encode(envelope, self.limit)
        except Exception as exc:  # unserialisable message (e.g. a required field unset), too large, ...
            if tracked:
                del envelope.tracking[-1]
            reason = str(exc) if isinstance(exc, EnvelopeError) else \
                f"the handler's result cannot be serialised: {type(exc).__name__}: {exc}"
            self._failures.log(logging.WARNING, "input seq %d: %s", job.seq, reason, exc_info=exc,
                               extra=job.log_fields())
            return self.error(job, envelope, reason, start[1])

    def failed(self, job: Job, envelope: KreNatsMessage, exc: Exception, start: tuple[float, str]) -> Outcome:
        """The handler raised ``exc``."""
        reason = str(exc) or type(exc).__name__
        self._failures.log(logging.WARNING, "handler failed on input seq %d: %s: %s", job.seq, type(exc).__name__,
                           _shorten(reason), exc_info=user_traceback(exc), extra=job.log_fields())
        return self.error(job, envelope, reason, start[1])

    def invalid(self, job: Job, exc: EnvelopeError) -> Outcome:
        """The input is not an envelope."""
        self._log.warning("input seq %d is not a valid envelope: %s", job.seq, exc, extra=job.log_fields())
        outcome = self.error(job, KreNatsMessage(), f"invalid input message at seq {job.seq}: {exc}",
                             self._clock.now()[1])
        job.kind = "invalid"
        return outcome

    def passthrough(self, job: Job, envelope: KreNatsMessage) -> Outcome:
        """The input already carries an error: on to the error subject unchanged, with this node's entry."""
        self.passed_errors += 1
        job.kind = "error"
        now = self._clock.now()[1]
        entry = envelope.tracking.add()
        entry.node_name = self._node_name
        entry.start = entry.end = now
        try:
            return self._error_subject, encode(envelope, self.limit)
        except Exception:  # too large to pass on whole: keep the request's ids and the error text
            return self.error(job, envelope, f"(passed on) {envelope.error}", now)

    def error(self, job: Job, envelope: KreNatsMessage, reason: str, start: str) -> Outcome:
        """An error envelope keeps tracking_id, reply and tracking so the entrypoint can match it."""
        self.errors += 1
        job.kind = "error"
        reason = _shorten(reason, _MAX_REASON)
        error = KreNatsMessage(
            tracking_id=envelope.tracking_id,
            reply=envelope.reply,
            replied=envelope.replied or job.replied,
            error=f"error in '{self._node_name}': {reason}",
        )
        error.tracking.extend(envelope.tracking)
        entry = error.tracking.add()
        entry.node_name = self._node_name
        entry.start = start
        entry.end = self._clock.now()[1]
        try:
            return self._error_subject, encode(error, self.limit)
        except EnvelopeError:  # the input's own tracking is too large to send back: leave it out
            del error.tracking[:-1]
            return self._error_subject, encode(error, self.limit)

    def early_reply(self, job: Job, response: Message) -> bytes:
        """The early reply's envelope; raises (to the handler) when it cannot be sent."""
        envelope = job.envelope
        if envelope is None or envelope.replied or job.replied:
            raise RuntimeError("an early reply was already sent for this request")
        reply = KreNatsMessage(tracking_id=envelope.tracking_id, reply=envelope.reply)
        if isinstance(response, AnyProto):
            reply.payload.CopyFrom(response)
        elif isinstance(response, Message):
            self._pack(reply.payload, response)
        else:
            raise TypeError(f"ctx.early_reply takes a protobuf message, not {type(response).__name__}")
        return encode(reply, self.limit)

    def _pack(self, payload: AnyProto, message: Message) -> None:
        """``payload.Pack(message)`` with the type URL built once per message type (Pack: ~2 µs, this: ~0.7)."""
        descriptor = message.DESCRIPTOR
        type_url = self._type_urls.get(descriptor)
        if type_url is None:
            type_url = self._type_urls[descriptor] = f"type.googleapis.com/{descriptor.full_name}"
        payload.value = message.SerializeToString()
        payload.type_url = type_url


def user_traceback(exc: BaseException) -> BaseException:
    """``exc`` with the runner's own frames left out of its traceback: the user's code is what to read."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith(_RUNNER_DIRS):
        tb = tb.tb_next  # the runner's frames, and asyncio's or the thread pool's in between
    return exc.with_traceback(tb)


def _shorten(text: str, limit: int = 500) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was (a 3 MB exception text stays readable)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
