"""The node's loop: pull → decode → handler → publish → settle, for one durable pull consumer.

The life of an input, and the module that owns each step:

    setup     jetstream.prepare     the stream captures our subjects; the durable consumer
                                    ``{KRT_VERSION}-{KRT_NODE_NAME}`` exists (shared by every replica)
    pull      credits.Credits       how many messages to ask for; ``_pull`` sends the request
    deliver   ``_on_delivery``      called by natsfast.Dispatcher in nats-py's reader task: the input
                                    becomes a settlement.Job, starts, or waits for a free slot; a
                                    redelivery may be settled at once (``_redelivered``: acked before,
                                    or out of deliveries: dead-lettered without running the handler)
    handle    inline                sync handlers run right there, on the event loop (fastest);
              ``_work``             async handlers, and sync ones in threads, run on workers that go
                                    straight on to the next waiting input
              batching.Batcher      batch handlers: inputs collected into batches, one call per batch
    outcome   outcome.Outcomes      output / error / pass-through envelope, or nothing
    publish   publisher             one reference per publish, released by its PubAck or timeout
    settle    settlement.Settlement ack when every publish was stored, else nak, or dead-letter
                                    (deadletter.py) when out of deliveries; the handler's own
                                    reference is released in a ``finally``: whatever raises or is
                                    cancelled between delivery and here, the input settles once
    shutdown  ``_shutdown``         stop pulling, finish in-flight inputs within the grace, hand
                                    back the rest

``_tick`` runs once a second beside it: PubAck timeouts, keep-alives, lost pull requests, and
every few seconds a look at the consumer (its lag for the metrics, its ack floor; a consumer found
deleted is recreated by ``_recover``). ``on_reconnect`` republishes what waited for a PubAck.
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
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from .batching import Batcher, current_tracking_ids, in_batch_handler, one_at_a_time
from .config import Settings
from .context import Context, Retry
from .credits import Credits
from .deadletter import DeadLetters
from .elapsed import WorkflowClock
from .envelope import EnvelopeError, KreNatsMessage, TrackingClock, decode
from .handler import UserCode
from .jetstream import SetupError, prepare, recreate
from .logs import RateLimitedLog
from .metrics import NodeMetrics
from .natsfast import Dispatcher, FastPath, Wire, check, describe
from .outcome import Outcome, Outcomes
from .publisher import PubAckPublisher
from .settlement import Job, Settlement, parse_ack_subject, retry_later

__all__ = ["Consumer", "SetupError"]

_PULL_EXPIRES = 30.0  # seconds a pull request waits on the server
_HEARTBEAT = 5.0  # server heartbeat on an open pull request; 3 missed => requests presumed lost
_SLOW_INLINE_S = 0.5  # a sync handler slower than this should run in threads: say so once
_WAITING_HANDLER_S = 0.001  # a handler call this long waited on something: keep messages at hand
_INTERRUPTED = "interrupted before its outcome was published"
# Pull requests that end with these are part of the routine (a byte budget spent, a batch filled).
_USUAL_409 = ("Exceeded", "Batch Completed", "Exceeds MaxBytes")
_CONSUMER_CHECK_TICKS = 5  # seconds between looks at the consumer (ack floor, existence)
_MISSING_LOG_EVERY = 30.0  # seconds between log lines while the stream or consumer is missing
_LEADERLESS_POLL = 0.25  # seconds between looks for a consumer leader after a reconnect
_LEADERLESS_WAIT = 30.0  # then pull anyway (the missed-heartbeat check still applies)

# The job whose handler is running in this task or handler thread (read by ctx.early_reply/early_exit).
_current_job: contextvars.ContextVar[Job] = contextvars.ContextVar("kre_current_job")


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
        metrics: NodeMetrics | None = None,
        failures: RateLimitedLog | None = None,
        fast_path: FastPath | None = None,
    ) -> None:
        self._s = settings
        self._one_at_a_time = code.batch and min(settings.batch_size, settings.max_inflight) == 1
        if self._one_at_a_time:
            code = one_at_a_time(code)  # nothing to collect: the per-message paths
        self._code = code
        self._nc = nc
        self._ctx = ctx
        self._log = logger
        self._record_elapsed = record_elapsed
        self._clock = TrackingClock()
        self.fast_path = fast_path or check(nc)  # node.py passes natsfast.probe's result
        self._wire = Wire(nc, self.fast_path)
        self._dispatcher = Dispatcher(nc, self.fast_path)
        self._publisher = PubAckPublisher(nc, self._dispatcher, self._wire, settings.publish_timeout, self._release)
        self.metrics = metrics or NodeMetrics()
        self._observe_handler = self.metrics.observe_handler
        self._failures = failures or RateLimitedLog(logger, "handler failures")
        self._outcomes = Outcomes(settings, self._clock, logger, self._failures)
        self._credits = Credits(settings.max_inflight, settings.max_inflight_bytes)
        self._settlement = Settlement(self._wire, logger, ack_wait=settings.ack_wait,
                                      publish_timeout=settings.publish_timeout, max_deliver=settings.max_deliver,
                                      dead_letter=DeadLetters(settings, self._publisher, self._outcomes).send,
                                      credits=self._credits, metrics=self.metrics)
        self.metrics.inflight = self._inflight
        self._workflow_clock = WorkflowClock() if settings.is_last_node else None
        self._jobs = self._settlement.jobs  # started and not yet settled (settlement removes them)
        self._pool = ThreadPoolExecutor(settings.handler_threads, "kre-handler") if settings.handler_threads else None
        self._inline = not code.handler_is_async and self._pool is None  # handler runs in the inbox route
        # Batch handlers (batching.py): delivered inputs go to the batcher instead of the paths below.
        self._batcher = Batcher(
            settings, code, ctx, logger, clock=self._clock, outcomes=self._outcomes, publisher=self._publisher,
            settlement=self._settlement, credits=self._credits, release=self._release, pull=self._pull,
            internal_error=self._internal_error, record_elapsed=record_elapsed,
            observe_handler=self.metrics.observe_handler) if code.batch else None
        self._inline_job: Job | None = None  # the job whose inline (sync) handler is running
        self._pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{settings.stream}.{settings.consumer_name}"
        # Nats-Msg-Id = {node}:{stream}:{stream sequence}: the same for every delivery of an input.
        self._node_id = settings.node_name.replace("\r", "").replace("\n", "")
        self._msg_id_prefix = f"{self._node_id}:{settings.stream}:"
        self._ack_prefix = f"$JS.ACK.{settings.stream}.{settings.consumer_name}."
        self._ack_prefix_len = len(self._ack_prefix)
        self._inbox = nc.new_inbox()
        self._inbox_sub: Subscription | None = None
        # Inputs delivered while KRT_MAX_INFLIGHT handlers run: they start as slots free up.
        self._waiting: deque[tuple[Job, bytes]] = deque()
        self._last_seen = time.monotonic()
        self._pulling = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = threading.get_ident()
        self._idle = asyncio.Event()
        self._idle.set()
        self._warned_slow = False
        self._settled_since_look = 0  # settlements since _release last looked at the credit
        self._ack_floor: int | None = None  # the consumer's ack floor (stream seq) when last looked at
        self._recovering: asyncio.Task[None] | None = None
        self._rebinding: asyncio.Task[None] | None = None  # after a reconnect: re-pull once a leader answers
        self.bound = False  # the durable consumer exists and we pull from it (readiness)
        self.consumer_info: ConsumerInfo | None = None  # refreshed every few seconds

    @property
    def processed(self) -> int:
        """Inputs acked."""
        return self._settlement.acked

    @property
    def errors(self) -> int:
        """Error envelopes built for this node's own failures."""
        return self._outcomes.errors

    # ---------------------------------------------------------------- start

    async def setup(self) -> None:
        """Check the stream, create or reuse the durable consumer, learn the publish limit."""
        self._log.info(describe(self.fast_path))
        self._outcomes.set_publish_limit(await prepare(self._nc, self._s, self._log))
        self._credits.message_bytes = self._nc.max_payload
        self._log.info("consuming %s from stream %s with durable pull consumer %s (max in flight %d)",
                       self._s.input_subject, self._s.stream, self._s.consumer_name, self._s.max_inflight)
        if self._batcher is not None:
            self._log.info(self._batcher.describe())
        elif self._one_at_a_time:
            where = ("as a coroutine" if self._code.handler_is_async else
                     f"in {self._s.handler_threads} thread(s)" if self._pool is not None else "on the event loop")
            self._log.info("batch handler with KRT_BATCH_SIZE=1: called with one input at a time, %s, as a "
                           "per-message handler would be", where)

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
        await self._watch_leader()
        self._pulling = True
        self.bound = True
        await self._pull()
        await self._check_consumer()  # the lag gauges and the ack floor from the start
        ticker = asyncio.create_task(self._tick())
        try:
            await stop.wait()
        finally:
            await self._shutdown()
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)

    async def on_reconnect(self) -> None:
        """After a reconnect: PubAcks of publishes in flight are lost, and pull requests may be: again, at once."""
        resent = await self._publisher.resend()
        if resent:
            self._log.info("reconnected: published again the %d outputs waiting for their PubAck", resent)
        if self._rebinding is None or self._rebinding.done():
            self._rebinding = asyncio.create_task(self._renew_pulls_when_led())

    async def _watch_leader(self) -> None:
        """In a cluster, pull requests die with the consumer's leader: re-pull when a new one is elected.

        JetStream announces each election on an advisory subject; without permission to subscribe
        to it the node still recovers, after three missed heartbeats.
        """
        subject = f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{self._s.stream}.{self._s.consumer_name}"
        try:
            await self._dispatcher.subscribe(subject, self._on_leader_elected)
        except Exception as exc:
            self._log.info("not watching consumer leader elections (%s): after a leader change, pulls resume "
                           "after three missed heartbeats", exc)

    async def _on_leader_elected(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        self._log.info("consumer %s has a new leader: renewing pull requests", self._s.consumer_name)
        await self._renew_pulls()

    async def _renew_pulls_when_led(self) -> None:
        """After a reconnect: pull once the consumer answers, i.e. it has a leader.

        A pull request sent while the consumer is leaderless (its leader's server was the one that
        died) is dropped without a word; the request would then be renewed only after three missed
        heartbeats.
        """
        deadline = time.monotonic() + _LEADERLESS_WAIT
        js = self._nc.jetstream(timeout=1.0)
        while self._pulling and time.monotonic() < deadline:
            try:
                info = await js.consumer_info(self._s.stream, self._s.consumer_name)
                if info.cluster is None or info.cluster.leader:
                    break
            except NotFoundError:
                break  # the consumer check recreates it
            except Exception as exc:
                self._log.debug("consumer not answering yet after the reconnect: %s", exc)
            await asyncio.sleep(_LEADERLESS_POLL)
        await self._renew_pulls()

    async def _renew_pulls(self) -> None:
        """Pull requests may not have survived (a restarted server forgets them): ask again."""
        self._credits.request_ended(None)
        await self._pull()

    # ---------------------------------------------------------------- pulling

    async def _pull(self) -> None:
        """Ask for as many messages as the credits allow (see credits.py)."""
        if not self._pulling:
            return
        want = self._credits.want(len(self._jobs), len(self._waiting))
        if not want:
            return
        credits = self._credits
        max_bytes = credits.opened(want)
        if max_bytes:
            request = b'{"batch":%d,"max_bytes":%d,"expires":%d,"idle_heartbeat":%d}' % (
                want, max_bytes, _PULL_EXPIRES * 1e9, _HEARTBEAT * 1e9)
        else:  # small messages: the count alone keeps the bytes far within the budget (credits.py)
            request = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (want, _PULL_EXPIRES * 1e9, _HEARTBEAT * 1e9)
        try:
            await self._wire.publish(self._pull_subject, request, self._inbox)
        except Exception as exc:
            credits.not_sent()
            self._log.warning("pull request failed: %s", exc)

    async def _tick(self) -> None:
        """Once a second: PubAck timeouts, keep-alives, lost pull requests; every few seconds, the consumer."""
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            try:
                await self._publisher.expire()
                now = time.monotonic()
                if await self._settlement.keep_alive(now, [job for job, _ in self._waiting]):
                    self._settled()
                self.metrics.fold()
                self._settlement.age_memory()
                if ticks % _CONSUMER_CHECK_TICKS == 0:
                    self._failures.flush()  # the count of tracebacks left out, once their minute is over
                    if self._pulling:
                        await self._check_consumer()
                if self._pulling and self._credits.requested and now - self._last_seen > 3 * _HEARTBEAT:
                    self._log.warning("no heartbeat from the server for %.0fs: renewing pull requests",
                                      now - self._last_seen)
                    self._last_seen = now
                    await self._check_consumer()
                    await self._renew_pulls()
                else:
                    await self._pull()
            except Exception:  # the ticker must survive anything, or timeouts stop being enforced
                self._log.exception("periodic maintenance failed")

    async def _check_consumer(self) -> None:
        """Consumer info: its ack floor (where a recreated consumer starts), and whether it still exists."""
        if self._recovering is not None or not self._nc.is_connected:
            return
        try:
            info = await self._nc.jetstream().consumer_info(self._s.stream, self._s.consumer_name)
        except NotFoundError:
            self._consumer_lost("it no longer exists")
            return
        except Exception as exc:
            self._log.debug("consumer info failed: %s", exc)
            return
        self.consumer_info = info
        self.metrics.consumer_pending = info.num_pending
        self.metrics.consumer_ack_pending = info.num_ack_pending
        if info.ack_floor is not None:
            self._ack_floor = info.ack_floor.stream_seq

    def _consumer_lost(self, why: str) -> None:
        if self._recovering is None and self._pulling:
            self.bound = False
            self._log.error("durable consumer %s on stream %s is gone (%s): recreating it", self._s.consumer_name,
                            self._s.stream, why)
            self._recovering = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        """Recreate the deleted consumer (or wait for its stream), then pull again."""
        js = self._nc.jetstream()
        start = None if self._ack_floor is None else self._ack_floor + 1
        waited = 0.0
        try:
            while self._pulling:
                try:
                    if await recreate(js, self._s, self._log, start):
                        break
                    if waited % _MISSING_LOG_EVERY == 0:
                        self._log.error("stream %s (KRT_NATS_STREAM) does not exist: waiting for it; the node is "
                                        "not ready", self._s.stream)
                    start = None  # a stream created again holds only new messages: take them all
                except Exception as exc:
                    if waited % _MISSING_LOG_EVERY == 0:
                        self._log.error("cannot recreate consumer %s yet: %s", self._s.consumer_name, exc)
                await asyncio.sleep(1.0)
                waited += 1.0
            else:
                return
            self.bound = True
            await self._renew_pulls()
        finally:
            self._recovering = None

    def _on_status(self, headers: dict[str, str] | None) -> None:
        headers = headers or {}
        status = headers.get("Status", "")
        if status == "100":
            return  # idle heartbeat
        pending = headers.get("Nats-Pending-Messages")
        description = headers.get("Description", "")
        if pending is not None:
            # A request ended (expired, or the server could not fill it); return its unused credit.
            pending_bytes = headers.get("Nats-Pending-Bytes")
            self._credits.request_ended(int(pending), None if pending_bytes is None else int(pending_bytes))
        elif status in ("408", "409", "404"):
            self._credits.request_ended(None)
        if status == "409" and "Consumer Deleted" in description:
            self._consumer_lost("409 Consumer Deleted")
        elif status == "409" and not any(usual in description for usual in _USUAL_409):
            self._log.warning("pull request ended: %s %s", status, description)

    # ---------------------------------------------------------------- per message

    async def _on_delivery(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Inbox route: status messages, or one input (for inline sync handlers, all of its work)."""
        self._last_seen = time.monotonic()
        if not reply:  # only JetStream status messages (heartbeats, request ends) have no reply
            self._on_status(headers)
            await self._pull()
            return
        credits = self._credits
        # credits.delivered(len(data)), inline: this runs once per message.
        size = len(data)
        credits.held_bytes += size
        if size > credits.largest:
            credits.largest = size
        if credits.open:
            credits.requested -= 1
            head = credits.open[0]
            head[0] -= 1
            head[1] -= size
            credits.requested_bytes -= size
            if head[0] <= 0:  # filled by count: the rest of its byte budget is free again
                credits.requested_bytes -= head[1]
                credits.open.popleft()
        # Nats-Msg-Id = {node}:{stream}:{stream sequence}, read off the ack subject
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>.
        if reply.startswith(self._ack_prefix):
            delivered, seq, _ = reply[self._ack_prefix_len:].split(".", 2)
            job = Job(reply, self._msg_id_prefix + seq, self._last_seen, data)
        else:  # the longer form with a JetStream domain and account
            stream, sequence, count = parse_ack_subject(reply)
            delivered = str(count)
            job = Job(reply, f"{self._node_id}:{stream}:{sequence}", self._last_seen, data)
        if delivered != "1":
            credits.careful = True
            if await self._redelivered(job, int(delivered)):
                delivered = ""  # settled without running the handler
        elif credits.careful:
            credits.careful = False
        if not delivered:
            pass
        elif self._batcher is not None:
            await self._batcher.add(job, data)
        elif not credits.may_start():
            self._waiting.append((job, data))
        elif not self._inline:
            self._start(job, data)
        else:
            # Sync handler: the whole pipeline runs here, in order, with no task and no context variable
            # per message (the route runs one message at a time, so ``_inline_job`` is unambiguous). The
            # same steps as ``_process``, which awaits the handler: two short copies, because sharing
            # them would cost this path the coroutine frames it exists to avoid.
            self._jobs.add(job)
            error: str | None = _INTERRUPTED
            try:
                outcome = self._handle_inline(job, data)
                if outcome is not None:
                    job.refs += 1
                    await self._publisher.publish(outcome[0], outcome[1], job.msg_id, job)
                error = None
            except Exception as exc:
                error = self._internal_error(job, exc)
            finally:
                job.done = time.monotonic()
                await self._release(job, error)
        if credits.want(len(self._jobs), len(self._waiting)):
            await self._pull()

    def _handle_inline(self, job: Job, data: bytes) -> Outcome:
        try:
            envelope = job.envelope = decode(data)
        except EnvelopeError as exc:
            return self._outcomes.invalid(job, exc)
        if envelope.error:
            return self._outcomes.passthrough(job, envelope)
        now = self._clock.now
        start = now()
        self._inline_job = job
        try:
            result = self._code.handler(self._ctx, envelope.payload)
        except Exception as exc:
            return self._failed(job, envelope, exc, start)
        finally:
            self._inline_job = None
        end = now()
        took = end[0] - start[0]
        self._observe_handler(took)
        if took > _SLOW_INLINE_S and not self._warned_slow:
            self._warn_slow(took)
        if self._record_elapsed is not None:
            self._record_elapsed(envelope, start[0], end[0])
        if self._workflow_clock is not None:
            self._workflow_clock.observe(envelope, end[0], self.metrics)
        return self._outcomes.output(job, envelope, result, start, end)

    async def _redelivered(self, job: Job, delivered: int) -> bool:
        """A redelivery: settle it here when running the handler again would be wrong; True if so."""
        self.metrics.redeliveries += 1
        self._log.info("input seq %d redelivered (delivery %d)", job.seq, delivered, extra={"seq": job.seq})
        if await self._settlement.acked_before(job):
            return True
        if self._settlement.out_of_deliveries(delivered):
            job.failed = (f"the handler ran {self._s.max_deliver} times (KRT_MAX_DELIVER) with no outcome: the "
                          f"process died or hung on it, or its acks were lost")
            self._jobs.add(job)
            job.done = time.monotonic()
            await self._release(job)  # settlement dead-letters it
            return True
        return False

    def _start(self, job: Job, data: bytes) -> None:
        """Take a slot and start a worker on this input (async handlers, or sync ones in threads)."""
        self._credits.running += 1
        job.task = asyncio.create_task(self._work(job, data))

    async def _work(self, job: Job, data: bytes) -> None:
        """A worker: this input, then those waiting for a slot, until none is left.

        Going straight on to the next input (rather than a task per input) starts its handler as
        soon as this one's output is sent: when many handlers finish together (their I/O was issued
        together), each slot turns over without waiting for the whole wave to be sent.
        """
        task = job.task
        credits = self._credits
        try:
            while True:
                job.task = task
                self._jobs.add(job)
                await self._process(job, data)
                if credits.want(len(self._jobs), len(self._waiting)):
                    await self._pull()
                if not self._waiting:
                    break
                job, data = self._waiting.popleft()
        finally:
            credits.running -= 1
        if credits.want(len(self._jobs), len(self._waiting)):
            await self._pull()

    async def _process(self, job: Job, data: bytes) -> None:
        """One input on a worker: the inline path's steps, awaiting the handler (see ``_on_delivery``)."""
        error: str | None = _INTERRUPTED
        try:
            outcome = await self._handle(job, data)
            if outcome is not None:
                job.refs += 1
                await self._publisher.publish(outcome[0], outcome[1], job.msg_id, job)
            error = None
        except Exception as exc:
            error = self._internal_error(job, exc)
        finally:
            job.done = time.monotonic()
            await self._release(job, error)

    async def _handle(self, job: Job, data: bytes) -> Outcome:
        try:
            envelope = job.envelope = decode(data)
        except EnvelopeError as exc:
            return self._outcomes.invalid(job, exc)
        if envelope.error:
            return self._outcomes.passthrough(job, envelope)
        now = self._clock.now
        start = now()
        token = _current_job.set(job)
        try:
            result = await self._call_handler(envelope.payload)
        except Exception as exc:
            return self._failed(job, envelope, exc, start)
        finally:
            _current_job.reset(token)
        end = now()
        took = end[0] - start[0]
        self._observe_handler(took)
        self._credits.handlers_wait(took > _WAITING_HANDLER_S)
        if self._record_elapsed is not None:
            self._record_elapsed(envelope, start[0], end[0])
        if self._workflow_clock is not None:
            self._workflow_clock.observe(envelope, end[0], self.metrics)
        return self._outcomes.output(job, envelope, result, start, end)

    async def _call_handler(self, payload: AnyProto) -> Any:
        code = self._code
        if code.handler_is_async:
            return await code.handler(self._ctx, payload)
        assert self._pool is not None  # sync handlers not run inline run in the pool
        call = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, code.handler, self._ctx, payload)

    def _failed(self, job: Job, envelope: KreNatsMessage, exc: Exception, start: tuple[float, str]) -> Outcome:
        """The handler raised: an error envelope, or for ``Retry`` nothing now and a retry later."""
        self._observe_handler(time.time() - start[0])
        if isinstance(exc, Retry):
            retry_later(job, str(exc), exc.delay)
            return None
        return self._outcomes.failed(job, envelope, exc, start)

    def _internal_error(self, job: Job, exc: Exception) -> str:
        """Building or publishing an outcome failed in a way the outcome builders could not absorb."""
        self._log.error("input seq %d: internal error, it will be retried: %s: %s", job.seq, type(exc).__name__, exc,
                        exc_info=exc)
        return f"internal error: {type(exc).__name__}: {exc}"

    def _warn_slow(self, seconds: float) -> None:
        self._warned_slow = True
        self._log.warning("the sync handler blocked the event loop for %.0f ms (acks, PubAcks and heartbeats "
                          "wait meanwhile): set KRT_HANDLER_THREADS to run it in threads", seconds * 1000)

    # ---------------------------------------------------------------- settling

    async def _release(self, job: Job, error: str | None = None) -> None:
        """Drop a reference of ``job`` (its handler's, or a publish's: ``error`` None when stored)."""
        if await self._settlement.release(job, error):
            jobs, waiting, credits = self._jobs, self._waiting, self._credits
            if waiting and credits.running < credits.max_inflight:  # _settled(), inline: once per message
                self._start(*waiting.popleft())
            if not jobs:
                self._idle.set()
            # Credit is asked for in chunks of ``batch``, so a look every ``batch`` settlements finds each
            # chunk as soon as it is free; a look at every settlement cost ~2.5 % of a message.
            self._settled_since_look += 1
            if self._settled_since_look >= credits.batch or not jobs:
                self._settled_since_look = 0
                if credits.want(len(jobs), len(waiting)):
                    await self._pull()

    def _settled(self) -> None:
        """An input was settled: its slot may start a waiting input."""
        if self._waiting and self._credits.may_start():
            self._start(*self._waiting.popleft())
        if not self._jobs:
            self._idle.set()

    # ---------------------------------------------------------------- ctx.early_reply / early_exit

    def _inflight(self) -> int:
        return len(self._jobs) + len(self._waiting)

    def _running_job(self) -> Job | None:
        """The input whose handler runs in this task or thread (None outside a per-message handler)."""
        return self._inline_job or _current_job.get(None)

    def current_tracking_id(self) -> str | None:
        """The tracking id of the input whose handler runs in this task or thread (ctx.logger lines carry it)."""
        job = self._running_job()
        if job is None or job.envelope is None:
            return None
        return job.envelope.tracking_id

    def batch_tracking_ids(self) -> list[str]:
        """``ctx.batch_tracking_ids()``: the running batch's, or with ``KRT_BATCH_SIZE=1`` the input's."""
        if not self._one_at_a_time:
            return current_tracking_ids()
        if self._running_job() is None:
            raise RuntimeError("ctx.batch_tracking_ids() must be called from within a batch handler")
        return [self.current_tracking_id() or ""]

    def _current(self, what: str) -> Job:
        if self._one_at_a_time or in_batch_handler():  # the batch contract, whatever the batch size
            raise RuntimeError(f"ctx.{what} acts on one message: it is not available in a batch handler")
        job = self._running_job()
        if job is None:
            raise RuntimeError(f"ctx.{what} must be called from within a handler")
        if self._s.entrypoint_subject is None:
            raise RuntimeError(f"ctx.{what} needs KRT_NATS_ENTRYPOINT_SUBJECT")
        return job

    def early_reply(self, response: Message) -> Awaitable[None]:
        """``ctx.early_reply``: answer the entrypoint for the input whose handler is running.

        The reply is one more publish of the job, so the input waits for its PubAck too.
        """
        job = self._current("early_reply")
        data = self._outcomes.early_reply(job, response)  # raises (to the handler) when it cannot be sent
        job.replied = True
        job.refs += 1  # taken now, so the input cannot be settled before the reply is published
        send = self._publisher.publish(self._s.entrypoint_subject or "", data, f"{job.msg_id}:reply", job)
        if threading.get_ident() == self._loop_thread:
            return asyncio.ensure_future(send)
        # Called from a handler thread (KRT_HANDLER_THREADS): hop onto the event loop. The loop runs
        # this before it sees the handler's return, so the reference is in place in time.
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(send, self._loop)  # type: ignore[return-value]

    def early_exit(self) -> None:
        """``ctx.early_exit``: this input's output goes to the entrypoint; later nodes never see the request."""
        self._current("early_exit").early_exit = True

    # ---------------------------------------------------------------- stopping

    async def _shutdown(self) -> None:
        grace = self._s.shutdown_grace
        deadline = time.monotonic() + grace
        self._pulling = False
        if self._batcher is not None:
            await self._batcher.stop()  # inputs collected for batches not started: handed back at once
        if self._inbox_sub is not None:
            # UNSUB ends our pull requests on the server; drain still runs what was already delivered.
            try:
                await asyncio.wait_for(self._inbox_sub.drain(), grace)
            except Exception as exc:
                self._log.warning("draining the input subscription failed: %s", exc)
        if self._jobs or self._waiting:
            # Inputs waiting for a slot start as slots free up (see _settled): they are in flight too,
            # and finishing them beats handing them back.
            self._log.info("stopping: waiting up to %.1fs for %d in-flight messages", grace,
                           len(self._jobs) + len(self._waiting))
            self._idle.clear()  # set again by _settled when the last job is done
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
        # Out of grace: let another replica take what is left now rather than after the ack wait.
        never_started = list(self._waiting)
        self._waiting.clear()
        for job, _ in never_started:
            await self._settlement.hand_back(job, "never started before the shutdown grace ran out")
        for job in list(self._jobs):
            await self._settlement.hand_back(job, "shutdown grace over")
            if job.task is not None:
                job.task.cancel()
        for task in (self._recovering, self._rebinding):
            if task is not None:
                task.cancel()
        await self._publisher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._batcher is not None:
            self._batcher.close()
        try:
            await self._nc.flush(timeout=2)
        except Exception as exc:
            self._log.warning("final flush failed: %s", exc)
        self._log.info("stopped after %d messages (%d errors)", self.processed, self.errors)
