"""The KRE 3.x generation: its envelope, handler routing, sends and error envelope, plugged into the one pipeline.

A 3.x node runs through the same consumer, settlement, publisher, dead letters, metrics and fast
paths as a v2 node; only these steps differ, so only they are overridden here (the v2 path keeps
its own code, untouched by 3.x):

* decode: the 3.x ``KreNatsMessage`` (same gzip framing and inflate bound); an input that is not one
  gets a 3.x error envelope on the output subject;
* route: **every** input reaches a handler, ERROR and early inputs too: the handler named by the
  input's ``from_node`` in ``custom_handlers``, else ``default_handler``;
* outputs: zero or more ``ctx.send_*`` while the handler runs, each published at once with its own
  ``Nats-Msg-Id`` ``{node}:{stream}:{seq}:{send index}`` and holding a reference on the input, so the
  input is acked after the PubAck of every send; a redelivered input sends the same ids, and the
  stream drops what its first attempt stored. What the handler returns is not an output (warned once);
* failure: the handler raised → ``KreNatsMessage{request_id, error, from_node, ERROR}`` on the output
  subject (no channel), with the input's own ``Nats-Msg-Id``;
* timing: ``node_elapsed_time`` with ``from_node`` and ``success`` (ops/elapsed.py's 3.x recorder).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable
from typing import Any

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

from ..proto.kre_nats_msg_v3_pb2 import MessageType
from .current import Current
from .envelope import EnvelopeError, KreNatsMessageV3, encode
from .outcome import Outcome, Outcomes, _shorten, user_traceback
from .pipeline import Pipeline
from .publisher import PubAckPublisher
from .settlement import Job

__all__ = ["EARLY_EXIT", "EARLY_REPLY", "ERROR", "OK", "OutcomesV3", "PipelineV3", "Sends"]

OK, ERROR, EARLY_REPLY, EARLY_EXIT = MessageType.OK, MessageType.ERROR, MessageType.EARLY_REPLY, MessageType.EARLY_EXIT
_CHANNEL_RE = re.compile(r"^[^\s*>.]+$")  # one subject token
_MAX_REASON = 8192


class OutcomesV3(Outcomes):
    """The 3.x outcomes: no output from the return value, error envelopes on the output subject."""

    envelope_type = KreNatsMessageV3
    passes_errors_on = False  # every input reaches a handler, ERROR ones too

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warned_return = False

    def output(self, job: Job, envelope: Any, result: Any, start: tuple[float, str],  # type: ignore[override]
               end: tuple[float, str]) -> Outcome:
        """Outputs went out through ``ctx.send_*`` already; a returned value is not one (warned once)."""
        if result is not None and not self._warned_return:
            self._warned_return = True
            self._log.warning("the handler returned a %s: in KRE 3.x a return value is ignored (as the original "
                              "runner did); send outputs with await ctx.send_output(msg) (zero or more per input)",
                              type(result).__name__)
        return None

    def failed(self, job: Job, envelope: Any, exc: Exception,  # type: ignore[override]
               start: tuple[float, str]) -> Outcome:
        """The handler raised: the original's error text, naming this node and the input's ``from_node``."""
        reason = str(exc) or type(exc).__name__
        self._failures.log(logging.WARNING, "handler failed on input seq %d (from node %s): %s: %s", job.seq,
                           envelope.from_node or "?", type(exc).__name__, _shorten(reason),
                           exc_info=user_traceback(exc), extra=job.log_fields())
        return self._error(job, envelope, f"Error in node '{self._node_name}' executing handler for node "
                                          f"'{envelope.from_node}': {reason}")

    def invalid(self, job: Job, exc: EnvelopeError) -> Outcome:
        self._log.warning("input seq %d is not a valid KRE 3.x envelope: %s", job.seq, exc, extra=job.log_fields())
        outcome = self._error(job, KreNatsMessageV3(), f"Error in node '{self._node_name}': invalid input message at "
                                                       f"seq {job.seq}: {exc}")
        job.kind = "invalid"
        return outcome

    def error(self, job: Job, envelope: Any, reason: str, start: str) -> Outcome:  # type: ignore[override]
        """An error envelope of this node's own (dead letters): the 3.x shape, on the output subject."""
        return self._error(job, envelope, f"Error in node '{self._node_name}': {reason}")

    def _error(self, job: Job, envelope: KreNatsMessageV3, text: str) -> Outcome:
        self.errors += 1
        job.kind = "error"
        error = KreNatsMessageV3(request_id=envelope.request_id, error=_shorten(text, _MAX_REASON),
                                 from_node=self._node_name, message_type=ERROR)
        return self._output_subject, encode(error, self.limit)

    def send(self, envelope: KreNatsMessageV3, message_type: int, message: Message, channel: str,
             forward: bool) -> tuple[str, bytes]:
        """The envelope of one ``ctx.send_*``; raises (to the handler) what it cannot send."""
        if channel and not _CHANNEL_RE.match(channel):
            raise ValueError(f"channel {channel!r} is not a subject token: use letters, digits, - or _ (no dots, "
                             f"spaces, * or >)")
        out = KreNatsMessageV3(request_id=envelope.request_id, from_node=self._node_name, message_type=message_type)
        if forward:
            if not isinstance(message, AnyProto):
                raise TypeError(f"ctx.send_any takes a google.protobuf.Any, not {type(message).__name__}")
            out.payload.CopyFrom(message)
        elif isinstance(message, Message):
            self._pack(out.payload, message)
        else:
            raise TypeError(f"ctx.send_* takes a protobuf message, not {type(message).__name__}")
        subject = f"{self._output_subject}.{channel}" if channel else self._output_subject
        return subject, encode(out, self.limit)


class _Sent:
    """What ``ctx.send_*`` returns to a sync handler called in place: done already if awaited (the pipeline
    publishes the send when the handler returns; the input waits for its PubAck all the same)."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


_SENT = _Sent()


class Sends:
    """``ctx.send_*`` and the input queries of the 3.x ctx: they act on the input whose handler runs now."""

    def __init__(self, outcomes: OutcomesV3, publisher: PubAckPublisher, current: Current) -> None:
        self._outcomes = outcomes
        self._publisher = publisher
        self._current = current

    def _job(self, what: str) -> Job:
        return self._current.handled(what)

    def send(self, what: str, message_type: int, message: Message, channel: str = "",
             forward: bool = False) -> Awaitable[None]:
        """Publish one output of the running input; the input is acked only after its PubAck."""
        job = self._job(what)
        subject, data = self._outcomes.send(job.envelope, message_type, message, channel, forward)  # type: ignore[arg-type]
        index = job.sends
        job.sends = index + 1
        job.refs += 1  # taken now: the input cannot settle before this send is stored
        msg_id = f"{job.msg_id}:{index}"
        if job is self._current.inline:
            # A sync handler called in place, on the loop's thread: its sends go out in order once it
            # returns (PipelineV3.run), without a task each.
            if job.outbox is None:
                job.outbox = []
            job.outbox.append((subject, data, msg_id))
            return _SENT
        return self._current.submit(self._publisher.publish(subject, data, msg_id, job))

    def envelope(self, what: str) -> KreNatsMessageV3:
        """The running input's envelope (``get_request_id``, ``is_message_*``)."""
        return self._job(what).envelope  # type: ignore[return-value]


class PipelineV3(Pipeline):
    """:class:`Pipeline` with the 3.x decode, routing and failure point; its one ``run`` serves both generations.

    Routing is a handler wrapper: it picks ``custom_handlers[from_node]`` or ``default_handler`` for the
    input whose call runs now (``current``), so the call itself, the pace, the outcome and the
    settlement are the pipeline's own code, not a 3.x copy of it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._code.custom_handlers:
            self._handler = _router(self._handler, dict(self._code.custom_handlers), self._current,
                                    awaited=self._code.handler_is_async)

    async def run(self, job: Job, data: bytes) -> None:
        """The pipeline's run, then the sends a sync handler made in place (each holds its reference already)."""
        try:
            await super().run(job, data)
        finally:
            outbox = job.outbox
            if outbox:
                job.outbox = None
                publish = self._publisher.publish
                for subject, output, msg_id in outbox:
                    await publish(subject, output, msg_id, job)

    def _failed(self, job: Job, envelope: Any, exc: Exception, start: tuple[float, str]) -> Outcome:
        """The 3.x timing point is written for a failed call too (``success=false``); the error envelope
        goes out after the sends the handler made before it raised."""
        self._record_v3(envelope, start[0], False)
        outcome = super()._failed(job, envelope, exc, start)
        outbox = job.outbox
        if outcome is None or not outbox:
            return outcome
        job.refs += 1
        outbox.append((outcome[0], outcome[1], job.msg_id))
        return None

    def _record_v3(self, envelope: KreNatsMessageV3, started: float, success: bool, ended: float = 0.0) -> None:
        if self._record_elapsed is not None:
            self._record_elapsed(envelope, started, ended or self._clock.now()[0], success)


def _router(default: Any, routes: dict[str, Any], current: Current, *, awaited: bool) -> Any:
    """A handler that calls the one the running input's ``from_node`` names (an async one if any is async)."""

    def pick() -> Any:
        job = current.running()
        envelope = job.envelope if job is not None else None
        return routes.get(envelope.from_node, default) if envelope is not None else default

    if awaited:
        async def route_awaited(ctx: Any, payload: Any) -> Any:
            result = pick()(ctx, payload)  # a sync handler beside async ones runs on the loop, as the original's
            return await result if inspect.isawaitable(result) else result

        return route_awaited

    def route(ctx: Any, payload: Any) -> Any:
        return pick()(ctx, payload)

    return route
