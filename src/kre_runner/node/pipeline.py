"""One input from delivery to settlement: decode → handler → outcome → publish → settle, on every path.

The consumer hands each input to :meth:`Pipeline.run` once. A sync handler on the event loop is
called in place (no task, no context variable: the fastest path); an async handler, or a sync one
in a thread, is awaited. Batch handlers use the same pieces around one call per batch
(:meth:`open`, :meth:`record`, :meth:`publish`, :meth:`release`, batching.py). Whatever raises or is
cancelled between delivery and the publish, ``run`` releases the input's own reference in a
``finally``, so it settles exactly once (settlement.py); the consumer hears of it once, through
``on_settled``, to start what waits for the freed slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from ..config import Settings
from ..context import Context, Retry
from ..handler import UserCode
from .counters import NodeMetrics
from .credits import Credits
from .current import Current
from .envelope import GZIP_MAGIC, EnvelopeError, KreNatsMessage, TrackingClock, decode
from .outcome import Outcome, Outcomes
from .publisher import PubAckPublisher
from .settlement import INTERNAL_ERROR, INTERRUPTED, Job, Settlement, hold_inflated, retry_later
from .timing import WorkflowClock

__all__ = ["Pipeline"]

_SLOW_INLINE_S = 0.5  # a sync handler slower than this on the loop should run in threads: say so once
_WAITING_HANDLER_S = 0.001  # an awaited call this long waited on something: keep inputs at hand (credits.py)


class Pipeline:
    """Runs inputs through the handler and settles them; one per consumer."""

    def __init__(self, settings: Settings, code: UserCode, ctx: Context, logger: logging.Logger, *,
                 clock: TrackingClock, outcomes: Outcomes, publisher: PubAckPublisher, settlement: Settlement,
                 credits: Credits, current: Current, metrics: NodeMetrics, pool: ThreadPoolExecutor | None,
                 record_elapsed: Callable[..., None] | None,
                 on_settled: Callable[[], bool], pull: Callable[[], Awaitable[None]]) -> None:
        self._code = code
        self._handler = code.handler
        self._ctx = ctx
        self._log = logger
        self.clock = self._clock = clock
        self._outcomes = outcomes
        self._publisher = publisher
        self._settlement = settlement
        self._jobs = settlement.jobs
        self._credits = credits
        self._current = current
        self._metrics = metrics
        self._observe_handler = metrics.observe_handler
        self._pool = pool
        self._record_elapsed = record_elapsed
        self._workflow_clock = WorkflowClock() if settings.is_last_node else None
        self._on_settled = on_settled  # the consumer's: True when the freed credit is worth a pull
        self._pull = pull
        # A sync handler without threads runs on the loop's thread, in place: paced by its calls (credits.py).
        self.on_loop = not code.handler_is_async and pool is None
        self.max_inflated = outcomes.max_inflated  # decode's bound (KRT_MAX_INFLATED_BYTES), set at setup
        self._warned_slow = False
        self._envelope_type: type = outcomes.envelope_type  # what ``open`` returns for an input a handler sees
        self._passes_errors_on = outcomes.passes_errors_on

    async def run_init(self, pool: ThreadPoolExecutor | None) -> None:
        """The user's ``init(ctx)``; a sync one on the thread the handlers use: the event loop's by default
        (the probes have a thread of their own), else ``pool``'s (one thread, or one of N)."""
        init = self._code.init
        if init is None:
            return
        if self._code.init_is_async:
            await init(self._ctx)
        elif pool is not None:
            await asyncio.get_running_loop().run_in_executor(pool, init, self._ctx)
        else:
            init(self._ctx)

    async def run(self, job: Job, data: bytes) -> None:
        """One input, from its delivery to its settlement."""
        self._jobs.add(job)
        error: str | None = INTERRUPTED
        try:
            opened = self.open(job, data)
            if type(opened) is not self._envelope_type:
                outcome: Outcome = opened  # type: ignore[assignment]  # no handler sees this input
            elif self.on_loop:
                outcome = self._call_in_place(job, opened)
            else:
                outcome = await self._call(job, opened)
            if outcome is not None:
                job.refs += 1  # the publish's reference, released by its PubAck or timeout
                await self._publisher.publish(outcome[0], outcome[1], job.msg_id, job)
            error = None
        except Exception as exc:
            error = self.internal_error(job, exc)
        finally:
            job.handled_at = time.monotonic()
            await self.drop_reference(job, error)

    def open(self, job: Job, data: bytes) -> KreNatsMessage | Outcome:
        """The input's envelope, or the outcome of an input no handler sees (not an envelope, an error)."""
        try:
            envelope = job.envelope = decode(data, self.max_inflated, self._envelope_type)
        except EnvelopeError as exc:
            return self._outcomes.invalid(job, exc)
        if data[:2] == GZIP_MAGIC:
            hold_inflated(job, envelope, self._credits)
        if envelope.error and self._passes_errors_on:  # (3.x: every input reaches a handler)
            return self._outcomes.passthrough(job, envelope)
        return envelope

    def _call_in_place(self, job: Job, envelope: KreNatsMessage) -> Outcome:
        """A sync handler on the loop's thread (one call at a time, so ``current.inline`` is unambiguous)."""
        now = self._clock.now
        start = now()
        current = self._current
        current.inline = job
        try:
            result = self._handler(self._ctx, envelope.payload)
        except Exception as exc:
            return self._failed(job, envelope, exc, start)
        finally:
            current.inline = None
        end = now()
        took = end[0] - start[0]
        self._observe_handler(took)
        credits = self._credits
        if took > credits.floor:
            credits.called(took)  # fewer inputs asked for ahead of a slower handler (credits.py)
        if took > _SLOW_INLINE_S and not self._warned_slow:
            self._warn_slow(took)
        # record(), in place: this runs once a message.
        if self._record_elapsed is not None:
            self._record_elapsed(envelope, start[0], end[0])
        if self._workflow_clock is not None:
            self._workflow_clock.observe(envelope, end[0], self._metrics)
        return self._outcomes.output(job, envelope, result, start, end)

    async def _call(self, job: Job, envelope: KreNatsMessage) -> Outcome:
        """An async handler, or a sync one in a thread, awaited."""
        now = self._clock.now
        start = now()
        token = self._current.enter(job)
        try:
            if self._code.handler_is_async:
                result = await self._handler(self._ctx, envelope.payload)
            else:
                assert self._pool is not None
                call = contextvars.copy_context().run
                result = await asyncio.get_running_loop().run_in_executor(
                    self._pool, call, self._handler, self._ctx, envelope.payload)
        except Exception as exc:
            return self._failed(job, envelope, exc, start)
        finally:
            self._current.leave(job, token)
        end = now()
        took = end[0] - start[0]
        self._observe_handler(took)
        self._credits.handlers_wait(took > _WAITING_HANDLER_S)
        self.record(envelope, start[0], end[0])
        return self._outcomes.output(job, envelope, result, start, end)

    def record(self, envelope: KreNatsMessage, started: float, ended: float) -> None:
        """The elapsed-time point of a handled input and, on the last node, its workflow's duration."""
        if self._record_elapsed is not None:
            self._record_elapsed(envelope, started, ended)
        if self._workflow_clock is not None:
            self._workflow_clock.observe(envelope, ended, self._metrics)

    def _failed(self, job: Job, envelope: KreNatsMessage, exc: Exception, start: tuple[float, str]) -> Outcome:
        """The handler raised: an error envelope, or for ``Retry`` nothing now and a retry later."""
        self._observe_handler(time.time() - start[0])
        if isinstance(exc, Retry):
            retry_later(job, str(exc), exc.delay)
            return None
        return self._outcomes.failed(job, envelope, exc, start)

    def internal_error(self, job: Job, exc: Exception) -> str:
        """Building or publishing an outcome failed in a way the outcome builders could not absorb."""
        self._log.error("input seq %d: internal error, it will be retried: %s: %s", job.seq, type(exc).__name__, exc,
                        exc_info=exc)
        return f"{INTERNAL_ERROR}{type(exc).__name__}: {exc}"

    async def publish(self, job: Job, outcome: Outcome) -> None:
        """Publish ``job``'s outcome (if any), holding a reference until its PubAck."""
        if outcome is not None:
            job.refs += 1
            await self._publisher.publish(outcome[0], outcome[1], job.msg_id, job)

    async def drop_reference(self, job: Job, error: str | None = None) -> None:
        """Drop a reference of ``job`` (its handler's, or a publish's: ``error`` None when stored)."""
        if await self._settlement.drop_reference(job, error) and self._on_settled():
            await self._pull()

    def _warn_slow(self, seconds: float) -> None:
        self._warned_slow = True
        self._log.warning("the sync handler blocked the event loop for %.0f ms (acks, PubAcks and heartbeats "
                          "wait meanwhile; the node pulls fewer inputs at a time to keep their ack wait): set "
                          "KRT_HANDLER_THREADS to run it in threads", seconds * 1000)
