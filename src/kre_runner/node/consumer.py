"""The node's loop: pull → decode → handler → publish → settle, for one durable pull consumer.

The life of an input, and the module that owns each step:

    setup     setup.prepare           the stream captures our subjects; the durable consumer
                                      ``{KRT_VERSION}-{KRT_NODE_NAME}`` exists (shared by every replica)
    pull      pulling.PullLink        pull requests as the credits (credits.Credits) allow; their status
                                      messages; leader elections, reconnects, a deleted consumer
    deliver   ``_on_delivery``        called by nats.fast.Dispatcher in nats-py's reader task: the input
                                      becomes a settlement.Job; a redelivery may be settled at once
                                      (``_redelivered``: acked before, or out of deliveries)
    route     ``_on_delivery``        batch handlers: batching.Batcher; a sync handler on the loop:
                                      pipeline.Pipeline.run right there (fastest); others, and a sync
                                      handler too slow for that (paced, credits.py): workers.Workers,
                                      a worker per free slot, inputs waiting for one kept alive
    handle    pipeline.Pipeline       decode, the handler call (current.Current tells ctx which input
                                      it is), the outcome (outcome.Outcomes), the publish (publisher)
    settle    settlement.Settlement   ack once every publish was stored, else nak, or dead-letter
                                      (deadletter.py); the handler's reference is released in the
                                      pipeline's ``finally``, so the input settles once; the consumer
                                      hears of it once (``Workers.freed``), to start what waits for the slot
    maintain  maintenance.Maintenance PubAck timeouts, keep-alives, missed heartbeats (every second);
                                      a look at the consumer (every few seconds, apart)
    shutdown  ``_shutdown``           stop pulling, finish in-flight inputs within the grace, hand
                                      back the rest
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from nats.aio.client import Client

from ..config import Settings
from ..context import Context
from ..handler import UserCode
from ..nats.fast import Dispatcher, FastPath, Wire, check, describe
from .batching import Batcher, describe_one_at_a_time, one_at_a_time
from .counters import NodeMetrics
from .credits import Credits
from .current import Current
from .deadletter import DeadLetters
from .envelope import TrackingClock
from .failures import RateLimitedLog
from .maintenance import Maintenance
from .outcome import Outcomes
from .pipeline import Pipeline
from .publisher import PubAckPublisher
from .pulling import PullLink
from .settlement import Job, Settlement, parse_ack_subject
from .setup import prepare
from .v3 import OutcomesV3, PipelineV3, Sends
from .workers import Workers

__all__ = ["Consumer"]


class Consumer:
    """Consumes the node's input until ``stop`` is set, then drains in-flight work and returns."""

    def __init__(self, settings: Settings, code: UserCode, nc: Client, ctx: Context, logger: logging.Logger, *,
                 record_elapsed: Callable[..., None] | None = None,
                 metrics: NodeMetrics | None = None, failures: RateLimitedLog | None = None,
                 fast_path: FastPath | None = None) -> None:
        self._s = settings
        self._one_at_a_time = code.batch and min(settings.batch_size, settings.max_inflight) == 1
        if self._one_at_a_time:
            code = one_at_a_time(code)  # nothing to collect: the per-message paths
        self._code = code
        self._nc = nc
        self._ctx = ctx
        self._log = logger
        self.fast_path = fast_path or check(nc)  # run.py passes nats.fast.probe's result
        wire = Wire(nc, self.fast_path)
        dispatcher = Dispatcher(nc, self.fast_path)
        self.metrics = metrics = metrics or NodeMetrics()
        failures = failures or RateLimitedLog(logger, "handler failures")
        clock = TrackingClock()
        self._publisher = PubAckPublisher(nc, dispatcher, wire, settings.publish_timeout, self._publish_done,
                                          metrics=metrics)
        # The generation (v3.py): the 3.x envelope, routing and sends plug into the same pipeline.
        v3 = settings.generation == "v3"
        self._outcomes = (OutcomesV3 if v3 else Outcomes)(settings, clock, logger, failures)
        self._credits = credits = Credits(settings.max_inflight, settings.max_inflight_bytes,
                                          ack_wait=settings.ack_wait)
        self._settlement = Settlement(wire, logger, ack_wait=settings.ack_wait,
                                      publish_timeout=settings.publish_timeout, max_deliver=settings.max_deliver,
                                      credits=credits, metrics=metrics,
                                      dead_letter=DeadLetters(settings, self._publisher, self._outcomes).send)
        self._jobs = self._settlement.jobs  # started and not yet settled (settlement removes them)
        self._workers = workers = Workers(credits, self._jobs)
        self._waiting = workers.waiting  # delivered while every slot is busy, kept alive until they start
        metrics.inflight = workers.inflight
        self._pool = ThreadPoolExecutor(settings.handler_threads, "kre-handler") if settings.handler_threads else None
        self.link = PullLink(settings, nc, wire, dispatcher, credits, metrics, logger, held=workers.held)
        self.current = Current(settings, self._outcomes, self._publisher, one_at_a_time=self._one_at_a_time)
        self._pipeline = (PipelineV3 if v3 else Pipeline)(
            settings, code, ctx, logger, clock=clock, outcomes=self._outcomes, publisher=self._publisher,
            settlement=self._settlement, credits=credits, current=self.current, metrics=metrics, pool=self._pool,
            record_elapsed=record_elapsed, on_settled=workers.freed, pull=self.link.pull)
        self._on_loop = self._pipeline.on_loop
        # KRE 3.x: ctx.send_* and the input queries (None in v2).
        self.sends = Sends(self._outcomes, self._publisher, self.current) if isinstance(self._outcomes, OutcomesV3) \
            else None
        self._maintenance = Maintenance(ack_wait=settings.ack_wait, publisher=self._publisher,
                                        settlement=self._settlement, link=self.link, credits=credits,
                                        metrics=metrics, failures=failures, paced=self._on_loop,
                                        waiting=workers.waiting_jobs, on_settled=workers.freed, logger=logger)
        workers.bind(self._pipeline.run, self.link.pull,
                     functools.partial(self._maintenance.before_blocking, nc) if self._on_loop else None)
        # Batch handlers (batching.py): delivered inputs go to the batcher instead of the paths below.
        self._batcher = Batcher(settings, code, ctx, logger, pipeline=self._pipeline, outcomes=self._outcomes,
                                settlement=self._settlement, credits=credits, pull=self.link.pull,
                                observe_handler=metrics.observe_handler) if code.batch else None
        # Nats-Msg-Id = {node}:{stream}:{stream sequence}: the same for every delivery of an input.
        self._node_id = settings.node_name.replace("\r", "").replace("\n", "")
        self._msg_id_prefix = f"{self._node_id}:{settings.stream}:"
        self._ack_prefix = f"$JS.ACK.{settings.stream}.{settings.consumer_name}."
        self._ack_prefix_len = len(self._ack_prefix)

    # ---------------------------------------------------------------- what the node reads

    @property
    def processed(self) -> int:
        """Inputs acked."""
        return self._settlement.acked

    @property
    def errors(self) -> int:
        """Error envelopes built for this node's own failures."""
        return self._outcomes.errors

    @property
    def bound(self) -> bool:
        """The durable consumer exists and is pulled from (readiness)."""
        return self.link.bound

    def cannot_dead_letter(self) -> str | None:
        """Why inputs wait for the dead-letter stream (for /readyz), None when none does."""
        problem = self._settlement.cannot_dead_letter()
        if problem is None:
            return None
        return f"stream {self._s.dead_letter_stream} (KRT_DEAD_LETTER_STREAM) refuses dead letters: {problem}"

    # ---------------------------------------------------------------- start

    async def setup(self) -> None:
        """Check the stream, create or reuse the durable consumer, learn the publish limits."""
        self._log.info(describe(self.fast_path))
        self._outcomes.set_publish_limit(await prepare(self._nc, self._s, self._log))
        self._credits.message_bytes = self._nc.max_payload
        inflated = self._outcomes.max_inflated = self._s.inflated_limit(self._nc.max_payload)
        self._pipeline.max_inflated = inflated
        self._log.info("consuming %s from stream %s with durable pull consumer %s (max in flight %d)",
                       self._s.input_subject, self._s.stream, self._s.consumer_name, self._s.max_inflight)
        if self._batcher is not None:
            self._log.info(self._batcher.describe())
        elif self._one_at_a_time:
            self._log.info(describe_one_at_a_time(self._code, self._s.handler_threads))

    async def run_init(self) -> None:
        """The user's ``init(ctx)``, once, before the first pull, on the thread the handlers use (pipeline.py)."""
        await self._pipeline.run_init(self._pool if self._batcher is None else self._batcher.pool)

    async def attach(self) -> str:
        """Receive on the inbox without pulling; returns its subject (a test seam: feed it MSG bytes)."""
        self.current.bind_loop()
        await self._publisher.start()
        await self.link.receive(self._on_delivery)
        return self.link.inbox

    @property
    def puback_prefix(self) -> str:
        """Where PubAcks of this node's publishes are addressed (``prefix + number``; a test seam)."""
        return self._publisher.prefix

    @property
    def published(self) -> int:
        """Publishes sent so far (a test seam: a handler thread's outputs reach the loop later)."""
        return self._publisher.sent

    @property
    def inflight(self) -> int:
        """Inputs held: being handled or published, or waiting for a slot."""
        return self._workers.inflight()

    def stop_threads(self) -> None:
        """Wait for the handler threads to finish and end them (a test seam; ``run`` does it on shutdown)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Process messages until ``stop`` is set, then shut down without losing any."""
        await self.attach()
        await self.link.start()
        self._maintenance.start()
        try:
            await stop.wait()
        finally:
            await self._shutdown()

    async def on_reconnect(self) -> None:
        """After a reconnect: PubAcks of publishes in flight are lost, and pull requests may be: again."""
        resent = await self._publisher.resend()
        if resent:
            self._log.info("reconnected: published again the %d outputs waiting for their PubAck", resent)
        self.link.reconnected()

    # ---------------------------------------------------------------- per message

    async def _on_delivery(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Inbox route: status messages, or one input (for a sync handler on the loop, all of its work)."""
        link = self.link
        link.last_seen = now = time.monotonic()
        if not reply:  # only JetStream status messages (heartbeats, request ends) have no reply
            link.on_status(headers)
            await link.pull()
            return
        credits = self._credits
        credits.delivered(len(data))
        # Nats-Msg-Id = {node}:{stream}:{stream sequence}, read off the ack subject
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>.
        if reply.startswith(self._ack_prefix):
            delivered, seq, _ = reply[self._ack_prefix_len:].split(".", 2)
            job = Job(reply, self._msg_id_prefix + seq, now, data)
        else:  # the longer form with a JetStream domain and account
            stream, sequence, count = parse_ack_subject(reply)
            delivered = str(count)
            job = Job(reply, f"{self._node_id}:{stream}:{sequence}", now, data)
        if delivered != "1":
            credits.careful = True
            if await self._settlement.redelivered(job, int(delivered), self._pipeline.drop_reference):
                delivered = ""  # settled without running the handler
        elif credits.careful:
            credits.careful = False
        if not delivered:
            pass
        elif self._batcher is not None:
            await self._batcher.add(job, data)
        elif self._on_loop and not credits.paced:
            await self._pipeline.run(job, data)  # in order, one at a time: no task, no slot
        else:
            if self._on_loop:
                # Paced (credits.py): it may have waited in the socket buffer behind the last call, so it
                # counts as due for a keep-alive, which the worker sends before its next call.
                job.touched = 0.0
            if credits.may_start():
                self._workers.start(job, data)
            else:
                self._waiting.append((job, data))
        if credits.want(len(self._jobs), len(self._waiting)):
            await link.pull()

    async def _publish_done(self, job: Job, error: str | None) -> None:
        """A publish of ``job`` was stored (``error`` None) or failed: its reference goes."""
        await self._pipeline.drop_reference(job, error)

    # ---------------------------------------------------------------- stopping

    async def _shutdown(self) -> None:
        grace = self._s.shutdown_grace
        deadline = time.monotonic() + grace
        self.link.pulling = False
        if self._batcher is not None:
            self._batcher.stopping()  # no batch starts now; those collected are handed back below
        await self.link.stop(grace)  # no open pull request is left for a handed-back input to come back to
        if self._batcher is not None:
            await self._batcher.hand_back()
        if self._jobs or self._waiting:
            # Inputs waiting for a slot start as slots free up: they are in flight too, and finishing
            # them beats handing them back.
            self._log.info("stopping: waiting up to %.1fs for %d in-flight messages", grace, self._workers.inflight())
            idle = self._workers.idle
            idle.clear()  # set again by Workers.freed when the last job is done
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(idle.wait(), max(0.0, deadline - time.monotonic()))
        # Out of grace: let another replica take what is left now rather than after the ack wait.
        for job in self._workers.take_waiting():
            await self._settlement.hand_back(job, "never started before the shutdown grace ran out")
        for job in list(self._jobs):
            await self._settlement.hand_back(job, "shutdown grace over")
            if job.task is not None:
                job.task.cancel()
        await self._maintenance.stop()
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
