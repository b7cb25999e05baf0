"""The node's loop: pull → decode → handler → publish → ack. All ack/nak decisions live here.

Design, top to bottom:

* One durable **pull** consumer per node (``{KRT_VERSION}-{KRT_NODE_NAME}``), shared by every
  replica: JetStream hands each message to exactly one puller, which gives queue semantics
  without a push consumer's flow control.
* **Continuous pull with credits.** Pull requests are sent ahead into one inbox subscription so the
  server streams messages while earlier ones are still being handled. Credits are bounded so that
  at most ``KRT_MAX_INFLIGHT`` handlers run at once, and at most as many more messages wait only
  for their output's PubAck.
* Each message becomes a ``_Job`` holding a reference count: one for the handler, one per publish
  waiting for its PubAck (output, error envelope, early reply). When it drops to zero the input is
  **acked only if every publish was stored**, otherwise nakked with a delay so it is retried. A
  redelivered input republishes with the same ``Nats-Msg-Id``, so the stream drops the duplicate.
* Sync handlers run inline on the event loop (fastest; set ``KRT_HANDLER_THREADS`` for handlers
  that block), async handlers run as one task per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from .config import Settings
from .context import Context
from .dispatch import Dispatcher
from .envelope import EnvelopeError, KreNatsMessage, TrackingClock, decode, encode
from .handler import UserCode
from .publisher import PubAckPublisher, Wire

__all__ = ["Consumer", "SetupError"]

_ACK = b"+ACK"
_IN_PROGRESS = b"+WPI"
_PULL_EXPIRES = 30.0  # seconds a pull request waits on the server
_HEARTBEAT = 5.0  # server heartbeat on an open pull request; 3 missed => requests presumed lost
_NAK_DELAYS = (0.5, 1, 2, 5, 10, 30)  # by delivery count, for inputs whose output was not stored
_HEADER_ROOM = 512  # room left in max_payload for the Nats-Msg-Id header and protocol line
_SLOW_INLINE_S = 0.5  # a sync handler slower than this should run in threads: say so once
_WAITING_HANDLER_S = 0.001  # a handler call this long waited on something: keep messages at hand

# The job whose handler is running in this task or handler thread (read by ctx.early_reply).
_current_job: contextvars.ContextVar[_Job] = contextvars.ContextVar("kre_current_job")


class SetupError(RuntimeError):
    """The stream or consumer this node needs is missing or incompatible."""


class _Job:
    """One input message from delivery to ack/nak."""

    __slots__ = ("ack_subject", "envelope", "failed", "msg_id", "refs", "replied", "task", "touched")

    def __init__(self, ack_subject: str, msg_id: str, now: float) -> None:
        self.ack_subject = ack_subject
        self.msg_id = msg_id
        self.refs = 1  # the handler's own reference, released when it has published its results
        self.failed: str | None = None
        self.envelope: KreNatsMessage | None = None
        self.replied = False
        self.touched = now
        self.task: asyncio.Task[None] | None = None

    @property
    def seq(self) -> int:
        """The input's stream sequence (parsed when needed: only logs and naks use it)."""
        return _parse_ack_subject(self.ack_subject)[1]

    @property
    def delivered(self) -> int:
        return _parse_ack_subject(self.ack_subject)[2]


class Consumer:
    """Consumes the node's input until ``stop`` is set, then drains in-flight work and returns."""

    def __init__(
        self,
        settings: Settings,
        code: UserCode,
        nc: Client,
        ctx: Context,
        logger: logging.Logger,
        *,
        record_elapsed: Callable[[KreNatsMessage, float, float], None] | None = None,
    ) -> None:
        self._s = settings
        self._code = code
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._ctx = ctx
        self._log = logger
        self._record_elapsed = record_elapsed
        self._clock = TrackingClock()
        self._wire = Wire(nc)
        self._dispatcher = Dispatcher(nc)
        self._publisher = PubAckPublisher(nc, self._dispatcher, self._wire, settings.publish_timeout, self._stored)
        self._pool = ThreadPoolExecutor(settings.handler_threads, "kre-handler") if settings.handler_threads else None
        self._inline = not code.handler_is_async and self._pool is None  # handler runs in the inbox callback
        self._error_subject = settings.entrypoint_subject or settings.output_subject
        self._output_subject = settings.output_subject
        self._node_name = settings.node_name
        self._is_last_node = settings.is_last_node
        self._max_inflight = settings.max_inflight
        self._inline_job: _Job | None = None  # the job whose inline (sync) handler is running
        self._limit = 1024 * 1024 - _HEADER_ROOM
        self._pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{settings.stream}.{settings.consumer_name}"
        # Nats-Msg-Id = {node}:{stream}:{stream sequence}: the same for every delivery of an input.
        self._node_id = settings.node_name.replace("\r", "").replace("\n", "")
        self._msg_id_prefix = f"{self._node_id}:{settings.stream}:"
        self._ack_prefix = f"$JS.ACK.{settings.stream}.{settings.consumer_name}."
        self._ack_prefix_len = len(self._ack_prefix)
        self._inbox = nc.new_inbox()
        self._inbox_sub: Subscription | None = None
        self._jobs: set[_Job] = set()
        # Messages delivered while KRT_MAX_INFLIGHT handlers run: they start as slots free up.
        self._backlog: deque[tuple[_Job, bytes]] = deque()
        self._requested = 0  # messages asked for and not yet delivered or expired
        self._batch = max(1, settings.max_inflight // 4)
        # KRT_MAX_INFLIGHT bounds the handlers running at once; a slot is free again as soon as its
        # handler returns, not when its output's PubAck comes back (a round trip later). Messages
        # waiting only for PubAcks are bounded too: at most another KRT_MAX_INFLIGHT.
        self._running = 0
        self._cap = 2 * settings.max_inflight
        # Handlers that wait (on I/O, or in threads) also keep a quarter of KRT_MAX_INFLIGHT messages
        # delivered ahead, so a freed slot starts the next message at once instead of a pull round
        # trip later (an async handler awaiting 10 ms of I/O kept its slots ~30 % idle without this).
        # It is on while handler calls take over _WAITING_HANDLER_S (the last call decides): for
        # handlers that never wait, messages held ahead only cost CPU (~10 % here). Inline sync
        # handlers take messages one at a time as they arrive: nothing to gain there.
        self._prefetch = 0
        self._last_seen = time.monotonic()
        self._pulling = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = threading.get_ident()
        self._idle = asyncio.Event()
        self._idle.set()
        self._warned_slow = False
        self._type_urls: dict[Any, str] = {}
        self.processed = 0
        self.errors = 0

    # ---------------------------------------------------------------- setup

    async def setup(self) -> None:
        """Check the stream, create or update the durable consumer, learn the publish limit."""
        s = self._s
        try:
            stream = await self._js.stream_info(s.stream)
        except NotFoundError:
            raise SetupError(f"stream {s.stream!r} does not exist (KRT_NATS_STREAM): create it, "
                             f"e.g. subjects [{s.stream}.*], before starting the node") from None
        limits = [self._nc.max_payload]
        out_stream = stream
        if not _subject_in(s.output_subject, stream.config.subjects or []):
            try:
                name = await self._js.find_stream_name_by_subject(s.output_subject)
                out_stream = await self._js.stream_info(name)
            except NotFoundError:
                self._log.warning("no stream captures KRT_NATS_OUTPUT=%s: outputs will fail until one does",
                                  s.output_subject)
        if out_stream.config.max_msg_size and out_stream.config.max_msg_size > 0:
            limits.append(out_stream.config.max_msg_size)
        self._limit = min(limits) - _HEADER_ROOM
        await self._ensure_consumer()

    async def _ensure_consumer(self) -> None:
        s = self._s
        config = ConsumerConfig(
            durable_name=s.consumer_name,
            filter_subject=s.input_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if s.deliver_policy == "all" else DeliverPolicy.NEW,
            ack_wait=s.ack_wait,
            max_deliver=-1,
            # Each replica bounds itself with KRT_MAX_INFLIGHT; the consumer must not cap the sum.
            max_ack_pending=-1,
            max_waiting=512,
        )
        try:
            existing = await self._js.consumer_info(s.stream, s.consumer_name)
        except NotFoundError:
            existing = None
        if existing is not None and existing.config.deliver_subject:
            raise SetupError(
                f"consumer {s.consumer_name!r} on stream {s.stream!r} is a push consumer (left by the original "
                f"runner?); kre-runner uses a pull consumer of that name. Delete it once its messages are "
                f"processed: nats consumer rm {s.stream} {s.consumer_name}"
            )
        if existing is None:
            await self._js.add_consumer(s.stream, config)
        elif existing.config.ack_wait != s.ack_wait or existing.config.filter_subject != s.input_subject:
            await self._js.update_consumer(s.stream, config)
        self._log.info("consuming %s from stream %s with durable pull consumer %s (max in flight %d)",
                       s.input_subject, s.stream, s.consumer_name, s.max_inflight)

    # ---------------------------------------------------------------- run

    async def run_init(self) -> None:
        """The user's ``init(ctx)``, once, before the first pull; on the thread handlers will use."""
        init = self._code.init
        if init is None:
            return
        if self._code.init_is_async:
            await init(self._ctx)
        elif self._pool is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, init, self._ctx)
        else:
            init(self._ctx)

    async def run(self, stop: asyncio.Event) -> None:
        """Process messages until ``stop`` is set, then shut down without losing any."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await self._publisher.start()
        self._inbox_sub = await self._dispatcher.subscribe(self._inbox, self._on_delivery)
        self._pulling = True
        await self._pull()
        ticker = asyncio.create_task(self._tick())
        try:
            await stop.wait()
        finally:
            await self._shutdown()
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)

    async def on_reconnect(self) -> None:
        """Pull requests may not have survived (a restarted server forgets them): ask again."""
        self._requested = 0
        await self._pull()

    async def _shutdown(self) -> None:
        grace = self._s.shutdown_grace
        deadline = time.monotonic() + grace
        self._pulling = False
        if self._inbox_sub is not None:
            # UNSUB ends our pull requests on the server; drain still runs what was already delivered.
            try:
                await asyncio.wait_for(self._inbox_sub.drain(), grace)
            except Exception as exc:
                self._log.warning("draining the input subscription failed: %s", exc)
        if self._jobs:
            # Delivered messages held back by the bound start as slots free up (see _finish): they are
            # in flight too, and finishing them beats handing them back.
            self._log.info("stopping: waiting up to %.1fs for %d in-flight messages", grace,
                           len(self._jobs) + len(self._backlog))
            self._idle.clear()  # set again by _finish when the last job is done
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
        # Out of grace: let another replica take what is left now rather than after the ack wait.
        never_started = list(self._backlog)
        self._backlog.clear()
        for job, _ in never_started:
            await self._safe_publish(job.ack_subject, b"-NAK")
        for job in list(self._jobs):
            self._log.warning("shutdown grace over: returning input seq %d for redelivery", job.seq)
            await self._safe_publish(job.ack_subject, b"-NAK")
            self._jobs.discard(job)
            if job.task is not None:
                job.task.cancel()
        await self._publisher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            await self._nc.flush(timeout=2)
        except Exception as exc:
            self._log.warning("final flush failed: %s", exc)
        self._log.info("stopped after %d messages (%d errors)", self.processed, self.errors)

    # ---------------------------------------------------------------- pulling

    async def _pull(self) -> None:
        """Top the credit back up to KRT_MAX_INFLIGHT, in requests of at least a quarter of it."""
        if not self._pulling:
            return
        want = self._max_inflight_free() - self._requested
        if want <= 0 or (want < self._batch and len(self._jobs) + len(self._backlog) + self._requested > 0):
            return
        self._requested += want
        request = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (want, _PULL_EXPIRES * 1e9, _HEARTBEAT * 1e9)
        try:
            await self._wire.publish(self._pull_subject, request, self._inbox)
        except Exception as exc:
            self._requested -= want
            self._log.warning("pull request failed: %s", exc)

    async def _tick(self) -> None:
        """Once a second: PubAck timeouts, in-progress acks, lost pull requests."""
        keepalive = self._s.ack_wait / 2
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._publisher.expire()
                now = time.monotonic()
                for job in [*self._jobs, *(job for job, _ in self._backlog)]:
                    if now - job.touched > keepalive:
                        job.touched = now
                        await self._safe_publish(job.ack_subject, _IN_PROGRESS)
                if self._pulling and self._requested and now - self._last_seen > 3 * _HEARTBEAT:
                    self._log.warning("no heartbeat from the server for %.0fs: renewing pull requests",
                                      now - self._last_seen)
                    self._last_seen = now
                    await self.on_reconnect()
                elif self._pulling:
                    await self._pull()
            except Exception:  # the ticker must survive anything, or timeouts stop being enforced
                self._log.exception("periodic maintenance failed")

    def _on_status(self, headers: dict[str, str] | None) -> None:
        headers = headers or {}
        status = headers.get("Status", "")
        if status == "100":
            return  # idle heartbeat
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None:
            # A request ended (expired, or the server could not fill it); return its unused credit.
            self._requested = max(0, self._requested - int(pending))
        elif status in ("408", "409"):
            self._requested = 0
        if status == "409" and "Exceeded" not in headers.get("Description", ""):
            self._log.warning("pull request ended: %s %s", status, headers.get("Description", ""))

    # ---------------------------------------------------------------- per message

    async def _on_delivery(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Inbox route: status messages, or one input message (for sync handlers, all of its work)."""
        if not reply:  # only JetStream status messages (heartbeats, request ends) have no reply
            self._last_seen = time.monotonic()
            self._on_status(headers)
            await self._pull()
            return
        self._last_seen = time.monotonic()
        if self._requested > 0:
            self._requested -= 1
        if self._running >= self._max_inflight:
            self._backlog.append((self._new_job(reply), data))
            return
        job = self._new_job(reply)
        if not self._inline:
            self._start(job, data)
            return
        # Sync handler: the whole pipeline runs here, in order, with no task and no context variable
        # per message (the callback runs one message at a time, so ``_inline_job`` is unambiguous).
        self._jobs.add(job)
        try:
            envelope = job.envelope = decode(data)
        except EnvelopeError as exc:
            outcome = self._invalid_input(job, exc)
        else:
            now = self._clock.now
            start = now()
            self._inline_job = job
            try:
                result = self._code.handler(self._ctx, envelope.payload)
            except Exception as exc:
                outcome = self._handler_failed(job, envelope, exc, start)
            else:
                end = now()
                if end[0] - start[0] > _SLOW_INLINE_S and not self._warned_slow:
                    self._warn_slow(end[0] - start[0])
                outcome = self._outcome(job, envelope, result, start, end)
            finally:
                self._inline_job = None
        await self._send(job, outcome)
        if self._max_inflight_free() - self._requested >= self._batch:
            await self._pull()

    def _new_job(self, reply: str) -> _Job:
        # Nats-Msg-Id = {node}:{stream}:{stream sequence}, read off the ack subject
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>.
        if reply.startswith(self._ack_prefix):
            delivered, seq, _ = reply[self._ack_prefix_len:].split(".", 2)
            msg_id = self._msg_id_prefix + seq
        else:  # the longer form with a JetStream domain and account
            stream, sequence, count = _parse_ack_subject(reply)
            delivered = str(count)
            msg_id = f"{self._node_id}:{stream}:{sequence}"
        job = _Job(reply, msg_id, self._last_seen)
        if delivered != "1":
            self._log.info("input seq %d redelivered (delivery %s)", job.seq, delivered)
        return job

    def _max_inflight_free(self) -> int:
        """Slots free for new messages: handlers running, and messages waiting only for PubAcks, are bounded."""
        return (min(self._max_inflight + self._prefetch - self._running, self._cap - len(self._jobs))
                - len(self._backlog))

    def _start(self, job: _Job, data: bytes) -> None:
        """Take a slot and start a worker on this message (async handlers, or sync ones in threads)."""
        self._running += 1
        job.task = asyncio.create_task(self._work(job, data))

    async def _work(self, job: _Job, data: bytes) -> None:
        """A worker: this message, then those waiting for a slot, until none is left.

        Going straight on to the next message (rather than a task per message) starts its handler
        as soon as this one's output is sent: when many handlers finish together (their I/O was
        issued together), each slot turns over without waiting for the whole wave to be sent.
        """
        task = job.task
        try:
            while True:
                job.task = task
                self._jobs.add(job)
                await self._process(job, data)
                if self._max_inflight_free() - self._requested >= self._batch:
                    await self._pull()
                if not self._backlog:
                    break
                job, data = self._backlog.popleft()
        finally:
            self._running -= 1
        if self._max_inflight_free() - self._requested >= self._batch:
            await self._pull()

    async def _process(self, job: _Job, data: bytes) -> None:
        # The inline path's steps (_on_delivery), awaiting the handler: kept as two short copies because
        # sharing them would cost the inline path the coroutine frames it exists to avoid.
        try:
            envelope = job.envelope = decode(data)
        except EnvelopeError as exc:
            outcome = self._invalid_input(job, exc)
        else:
            now = self._clock.now
            start = now()
            token = _current_job.set(job)
            try:
                result = await self._call_handler(envelope.payload)
            except Exception as exc:
                outcome = self._handler_failed(job, envelope, exc, start)
            else:
                end = now()
                self._prefetch = self._batch if end[0] - start[0] > _WAITING_HANDLER_S else 0
                outcome = self._outcome(job, envelope, result, start, end)
            finally:
                _current_job.reset(token)
        await self._send(job, outcome)

    async def _call_handler(self, payload: AnyProto) -> Any:
        code = self._code
        if code.handler_is_async:
            return await code.handler(self._ctx, payload)
        assert self._pool is not None  # sync handlers not run inline run in the pool
        call = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, code.handler, self._ctx, payload)

    def _warn_slow(self, seconds: float) -> None:
        self._warned_slow = True
        self._log.warning("the sync handler blocked the event loop for %.0f ms (acks, PubAcks and heartbeats "
                          "wait meanwhile): set KRT_HANDLER_THREADS to run it in threads", seconds * 1000)

    # An outcome is what a message publishes once its handler is done: (subject, envelope bytes), or
    # None when it publishes nothing. Outputs and error envelopes share the input's Nats-Msg-Id, so a
    # redelivered input yields one result or one error, never both.

    def _outcome(self, job: _Job, envelope: KreNatsMessage, result: Any, start: tuple[float, str],
                 end: tuple[float, str]) -> tuple[str, bytes] | None:
        """The handler returned ``result``: the output envelope, an error envelope, or nothing."""
        if self._record_elapsed is not None:
            self._record_elapsed(envelope, start[0], end[0])
        if result is None or (self._is_last_node and (envelope.replied or job.replied)):
            return None  # a filter, or the entrypoint already has its answer
        # The input envelope becomes the output: tracking_id, reply, replied and tracking carry over.
        if isinstance(result, Message) and not isinstance(result, AnyProto):
            self._pack(envelope.payload, result)
        elif isinstance(result, AnyProto):
            envelope.payload.CopyFrom(result)
        else:
            return self._error(job, envelope, f"handler returned {type(result).__name__}; expected a protobuf "
                               f"message, google.protobuf.Any or None", start[1])
        if job.replied:
            envelope.replied = True
        entry = envelope.tracking.add()
        entry.node_name = self._node_name
        entry.start = start[1]
        entry.end = end[1]
        try:
            return self._output_subject, encode(envelope, self._limit)
        except EnvelopeError as exc:
            del envelope.tracking[-1]
            return self._error(job, envelope, str(exc), start[1])

    def _invalid_input(self, job: _Job, exc: EnvelopeError) -> tuple[str, bytes]:
        self._log.warning("input seq %d is not a valid envelope: %s", job.seq, exc)
        return self._error(job, KreNatsMessage(), f"invalid input message at seq {job.seq}: {exc}",
                           self._clock.now()[1])

    def _handler_failed(self, job: _Job, envelope: KreNatsMessage, exc: Exception,
                        start: tuple[float, str]) -> tuple[str, bytes]:
        self._log.warning("handler failed on input seq %d: %s: %s", job.seq, type(exc).__name__, exc,
                          exc_info=self._log.isEnabledFor(logging.DEBUG))
        return self._error(job, envelope, str(exc) or type(exc).__name__, start[1])

    def _error(self, job: _Job, envelope: KreNatsMessage, reason: str, start: str) -> tuple[str, bytes]:
        """An error envelope keeps tracking_id, reply and tracking so the entrypoint can match it."""
        self.errors += 1
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
        return self._error_subject, encode(error, self._limit)

    async def _send(self, job: _Job, outcome: tuple[str, bytes] | None, msg_id: str | None = None) -> None:
        """Publish the outcome, then drop the handler's (or early reply's) reference: PubAcks settle the input."""
        if outcome is not None:
            job.refs += 1
            await self._publisher.publish(outcome[0], outcome[1], msg_id or job.msg_id, job)
        await self._release(job)

    def early_reply(self, response: Message) -> Awaitable[None]:
        """``ctx.early_reply``: answer the entrypoint for the message whose handler is running.

        The reply is one more publish of the job, so the input waits for its PubAck too.
        """
        job = self._inline_job or _current_job.get(None)
        if job is None:
            raise RuntimeError("ctx.early_reply must be called from within a handler")
        subject = self._s.entrypoint_subject
        if subject is None:
            raise RuntimeError("ctx.early_reply needs KRT_NATS_ENTRYPOINT_SUBJECT")
        envelope = job.envelope
        if envelope is None or envelope.replied or job.replied:
            raise RuntimeError("an early reply was already sent for this request")
        job.replied = True
        reply = KreNatsMessage(tracking_id=envelope.tracking_id, reply=envelope.reply)
        if isinstance(response, AnyProto):
            reply.payload.CopyFrom(response)
        else:
            self._pack(reply.payload, response)
        data = encode(reply, self._limit)
        job.refs += 1  # taken now, so the input cannot be acked before the reply is published
        send = self._send(job, (subject, data), f"{job.msg_id}:reply")
        if threading.get_ident() == self._loop_thread:
            return asyncio.ensure_future(send)
        # Called from a handler thread (KRT_HANDLER_THREADS): hop onto the event loop. The loop runs
        # this before it sees the handler's return, so the reference is in place in time.
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(send, self._loop)  # type: ignore[return-value]

    async def _stored(self, job: _Job, error: str | None) -> None:
        """A publish of ``job`` is settled: stored (``error`` None) or not."""
        if error is not None:
            job.failed = error
        job.refs -= 1
        if not job.refs:
            await self._finish(job)

    async def _release(self, job: _Job) -> None:
        """Drop the handler's (or an early reply's) reference."""
        job.refs -= 1
        if not job.refs:
            await self._finish(job)

    async def _finish(self, job: _Job) -> None:
        """The last reference is gone: ack only when every publish was stored, else nak to retry."""
        try:
            self._jobs.remove(job)
        except KeyError:
            return  # already handed back at the end of the shutdown grace
        if job.failed is None:
            self.processed += 1
            command = _ACK
        else:
            delay = _NAK_DELAYS[min(job.delivered, len(_NAK_DELAYS)) - 1]
            self._log.warning("input seq %d will be retried in %gs: %s", job.seq, delay, job.failed)
            command = b'-NAK {"delay": %d}' % int(delay * 1e9)
        await self._safe_publish(job.ack_subject, command)
        if self._backlog and self._running < self._max_inflight:
            self._start(*self._backlog.popleft())
        if not self._jobs:
            self._idle.set()
        if self._max_inflight_free() - self._requested >= self._batch:
            await self._pull()

    def _pack(self, payload: AnyProto, message: Message) -> None:
        """``payload.Pack(message)`` with the type URL built once per message type (Pack: ~2 µs, this: ~0.7)."""
        descriptor = message.DESCRIPTOR
        type_url = self._type_urls.get(descriptor)
        if type_url is None:
            type_url = self._type_urls[descriptor] = f"type.googleapis.com/{descriptor.full_name}"
        payload.type_url = type_url
        payload.value = message.SerializeToString()

    async def _safe_publish(self, subject: str, data: bytes) -> None:
        """Acks and naks: if one is lost, the ack wait redelivers and Nats-Msg-Id dedupes the output."""
        try:
            await self._wire.publish(subject, data)
        except Exception as exc:
            self._log.warning("could not send %s to %s: %s", data[:4].decode(), subject, exc)


def _parse_ack_subject(reply: str) -> tuple[str, int, int]:
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


def _subject_in(subject: str, patterns: list[str]) -> bool:
    parts = subject.split(".")
    for pattern in patterns:
        pat = pattern.split(".")
        for i, token in enumerate(pat):
            if token == ">":
                if len(parts) > i:
                    return True
                break
            if i >= len(parts) or (token != "*" and token != parts[i]):
                break
        else:
            if len(pat) == len(parts):
                return True
    return False
