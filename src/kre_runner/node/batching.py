"""Batch handlers: ``handler_batch(ctx, batch)`` called on many inputs at once, each input settled on its own.

A model called once per input wastes most of a GPU, and on a CPU re-reads its weights every call;
called on a batch it does the same work for many inputs at once. What must not change is what
happens to each input (README, "What happens to a message"): its own output envelope, tracking
entry, ``Nats-Msg-Id`` and elapsed-time point, acked only once that output is stored.

The life of an input of a batch handler, beside the map at the top of consumer.py:

    deliver   ``Batcher.add``       decoded at once; an input that is not an envelope, or that already
                                    carries an error, gets its outcome now and never reaches the handler
    collect   ``_collecting``       the batch closes when it holds ``KRT_BATCH_SIZE`` inputs, or
                                    ``KRT_BATCH_WAIT_MS`` after its first; while every runner is busy
                                    it keeps filling (up to the size) until one is free
    call      ``_runner``/``_call`` ``max(1, KRT_HANDLER_THREADS)`` batch calls at a time; sync ones in a
                                    thread, so the event loop keeps acking, publishing and collecting
                                    (and one more closed batch per thread queued for it)
    outcome   outcome.Outcomes      one per input: output, error envelope (an ``Exception`` item, or
                                    the whole batch when the call raises or returns a bad list), nothing
    settle    ``_run``'s finally    every input's handler reference is released, whatever raised or
                                    was cancelled; each is acked after its own publish is stored
    shutdown  ``stop``              inputs collected but not started are handed back at once; batches
                                    already running finish within the shutdown grace

Each input of a collected or running batch counts as a running handler in ``credits.Credits``, so
``KRT_MAX_INFLIGHT`` still bounds the messages a replica holds.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..context import Context, Retry
from ..handler import UserCode
from .credits import Credits
from .envelope import KreNatsMessage
from .outcome import Outcome, Outcomes
from .settlement import INTERRUPTED, Job, Settlement, retry_later

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["Batcher", "current_tracking_ids", "describe_one_at_a_time", "in_batch_handler", "one_at_a_time"]


# The batch whose handler call is running in this task or handler thread (ctx.batch_tracking_ids).
_current_batch: contextvars.ContextVar[list[Job]] = contextvars.ContextVar("kre_current_batch")


def in_batch_handler() -> bool:
    """Whether a batch handler is running in this task or thread."""
    return _current_batch.get(None) is not None


def current_tracking_ids() -> list[str]:
    """``ctx.batch_tracking_ids()``: the running batch's tracking ids, in the order of its inputs."""
    batch = _current_batch.get(None)
    if batch is None:
        raise RuntimeError("ctx.batch_tracking_ids() must be called from within a batch handler")
    return [job.envelope.tracking_id if job.envelope is not None else "" for job in batch]


def one_at_a_time(code: UserCode) -> UserCode:
    """``KRT_BATCH_SIZE=1``: the batch handler as a per-message handler, run by the consumer's own paths.

    A batch of one has nothing to collect, so it takes the path a plain handler takes (on the event
    loop, in ``KRT_HANDLER_THREADS`` threads, or as a coroutine) at a plain handler's cost. The list
    contract holds: an ``Exception`` item is raised as if the handler had raised it (an error
    envelope; ``Retry``: handed back) and a list of the wrong length fails the input. The consumer
    answers ``ctx.batch_tracking_ids`` and refuses ``early_reply``/``early_exit`` as in a batch.
    """
    handle_batch = code.handler
    if code.handler_is_async:
        async def handler(ctx: Context, payload: Any) -> Any:
            return _only_result(await handle_batch(ctx, [payload]))
    else:
        def handler(ctx: Context, payload: Any) -> Any:  # type: ignore[misc]
            return _only_result(handle_batch(ctx, [payload]))
    return dataclasses.replace(code, handler=handler, batch=False)


def describe_one_at_a_time(code: UserCode, threads: int) -> str:
    """The start-up line of a batch handler at ``KRT_BATCH_SIZE=1`` (``code`` already adapted)."""
    where = "as a coroutine" if code.handler_is_async else f"in {threads} thread(s)" if threads else "on the event loop"
    return (f"batch handler with KRT_BATCH_SIZE=1: called with one input at a time, {where}, as a per-message "
            f"handler would be")


def _only_result(results: Any) -> Any:
    """The one result of a batch of one; an ``Exception`` item is raised (its own traceback, if any, kept)."""
    if type(results) is not list or len(results) != 1:
        problem = _check(results, 1)
        if problem is not None:
            raise BatchResultError(problem)
    result = results[0]
    if isinstance(result, Exception):
        raise result
    return result


class BatchResultError(Exception):
    """A batch handler returned something that is not one result per input."""


class Batcher:
    """Collects delivered inputs into batches, calls the batch handler, publishes and settles each input."""

    def __init__(
        self,
        settings: Settings,
        code: UserCode,
        ctx: Context,
        logger: logging.Logger,
        *,
        pipeline: Pipeline,
        outcomes: Outcomes,
        settlement: Settlement,
        credits: Credits,
        pull: Callable[[], Awaitable[None]],
        observe_handler: Callable[[float], None] | None = None,
    ) -> None:
        self._code = code
        self._ctx = ctx
        self._log = logger
        # The message pipeline's own steps, around one handler call per batch (pipeline.py).
        self._clock = pipeline.clock
        self._open = pipeline.open
        self._record = pipeline.record
        self._publish = pipeline.publish
        self._drop_reference = pipeline.drop_reference
        self._internal_error = pipeline.internal_error
        self._outcomes = outcomes
        self._settlement = settlement
        self._jobs = settlement.jobs
        self._credits = credits
        self._pull = pull
        self._observe_handler = observe_handler or _ignore
        # A batch larger than KRT_MAX_INFLIGHT could never fill: it would always wait for the linger.
        self.size = min(settings.batch_size, settings.max_inflight)
        self.wait = settings.batch_wait
        self.runners = max(1, settings.handler_threads)  # batch calls running at once
        self._pool = None if code.handler_is_async else ThreadPoolExecutor(self.runners, "kre-batch")
        self.pool = self._pool  # where a sync init runs: the thread the batch calls run on (one, by default)
        # Sync handlers: one more full batch per thread waits in the pool's queue, so a thread goes
        # straight on to it rather than waiting for the event loop to hand it over after each call.
        # A partial batch whose wait is over starts only on an idle thread: until then it keeps filling.
        self._slots = self.runners if self._pool is None else 2 * self.runners
        self._submitted: dict[Future[Any], list[Job]] = {}  # calls handed to the pool, not yet returned
        self._collecting: list[Job] = []
        self._ready: deque[list[Job]] = deque()  # closed batches waiting for a free runner
        self._timer: asyncio.TimerHandle | None = None
        self._lingered = False  # the collecting batch's wait is over: it starts as soon as a runner is free
        self._running = 0  # runners (tasks) in progress, each with a batch at a time
        self._stopping = False
        self._returned: list[Job] = []  # delivered while stopping, not collected
        self._tasks: set[asyncio.Task[None]] = set()
        if settings.batch_size > settings.max_inflight:
            logger.warning("KRT_BATCH_SIZE=%d is larger than KRT_MAX_INFLIGHT=%d: batches hold at most %d inputs",
                           settings.batch_size, settings.max_inflight, self.size)

    def describe(self) -> str:
        kind = "async" if self._code.handler_is_async else "sync, in threads"
        return (f"batch handler ({kind}): up to {self.size} inputs per call, {self.wait * 1000:g} ms wait for a "
                f"batch to fill, {self.runners} call(s) at a time")

    # ---------------------------------------------------------------- collecting

    async def add(self, job: Job, data: bytes) -> None:
        """A delivered input: into the batch being collected, or (not an envelope, an error) settled now."""
        if self._stopping:  # delivered while the subscription drains: handed back once it is closed
            self._returned.append(job)
            return
        self._jobs.add(job)
        queued = False
        error: str | None = INTERRUPTED
        try:
            opened = self._open(job, data)
            if type(opened) is KreNatsMessage:
                self._collect(job)
                queued = True
                return
            await self._publish(job, opened)  # type: ignore[arg-type]  # no handler sees this input
            error = None
        except Exception as exc:
            error = self._internal_error(job, exc)
        finally:
            if not queued:
                job.handled_at = time.monotonic()
                await self._drop_reference(job, error)

    def _collect(self, job: Job) -> None:
        self._credits.running += 1
        batch = self._collecting
        batch.append(job)
        if len(batch) >= self.size:
            self._close()
        elif len(batch) == 1:
            if self.wait:
                self._timer = asyncio.get_running_loop().call_later(self.wait, self._linger_over)
            else:
                self._linger_over()

    def _close(self) -> None:
        """The collecting batch is complete: it starts now, or when a runner is free."""
        batch = self._take_collecting()
        if self._running < self._slots:
            self._start(batch)
        else:
            self._ready.append(batch)

    def _linger_over(self) -> None:
        self._timer = None
        if not self._collecting or self._stopping:
            return
        if self._running < self._slots and self._idle_thread():
            self._start(self._take_collecting())
        else:
            self._lingered = True  # and it keeps filling meanwhile

    def _idle_thread(self) -> bool:
        return self._pool is None or len(self._submitted) < self.runners

    def _take_collecting(self) -> list[Job]:
        batch, self._collecting = self._collecting, []
        self._lingered = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return batch

    def _start(self, batch: list[Job]) -> None:
        self._running += 1
        task = asyncio.create_task(self._runner(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _runner(self, batch: list[Job]) -> None:
        """This batch, then the next closed one, until none is left (no task per batch under load)."""
        task = asyncio.current_task()
        try:
            while True:
                for job in batch:
                    job.task = task
                await self._run(batch)
                if self._stopping:
                    return
                if self._ready:
                    batch = self._ready.popleft()
                elif self._lingered and self._idle_thread():
                    batch = self._take_collecting()
                else:
                    return  # (a lingering batch is then started by the runner whose call returns last)
        finally:
            self._running -= 1

    # ---------------------------------------------------------------- one batch

    async def _run(self, batch: list[Job]) -> None:
        """Call the handler on ``batch``, publish each input's outcome, release every input once."""
        errors: list[str | None] = [INTERRUPTED] * len(batch)
        freed = False
        try:
            outcomes = await self._call(batch)
            credits = self._credits
            credits.running -= len(batch)
            freed = True
            if credits.want(len(self._jobs), 0):
                await self._pull()
            for i, (job, outcome) in enumerate(zip(batch, outcomes, strict=True)):
                try:
                    await self._publish(job, outcome)
                    errors[i] = None
                except Exception as exc:
                    errors[i] = self._internal_error(job, exc)
        except Exception as exc:  # building the outcomes failed in a way Outcomes could not absorb
            reason = self._internal_error(batch[0], exc)
            errors = [reason if e is not None else None for e in errors]
        finally:
            if not freed:
                self._credits.running -= len(batch)
            done = time.monotonic()
            for job, error in zip(batch, errors, strict=True):
                job.handled_at = done
                await self._drop_reference(job, error)

    async def _call(self, batch: list[Job]) -> list[Outcome]:
        """The handler's call and each input's outcome; the user's failures become error envelopes."""
        payloads = [job.envelope.payload for job in batch]  # type: ignore[union-attr]  # decoded in ``add``
        now = self._clock.now
        start = now()
        token = _current_batch.set(batch)
        try:
            if self._code.handler_is_async:
                results = await self._code.handler(self._ctx, payloads)
            else:
                assert self._pool is not None
                call = self._pool.submit(contextvars.copy_context().run, self._code.handler, self._ctx, payloads)
                self._submitted[call] = batch
                try:
                    results = await asyncio.wrap_future(call)
                finally:
                    del self._submitted[call]
        except Exception as exc:
            self._observe_handler(time.time() - start[0])
            if isinstance(exc, Retry):  # a transient failure of the whole batch: every input again later
                for job in batch:
                    retry_later(job, str(exc), exc.delay)
                return [None] * len(batch)
            reason = str(exc) or type(exc).__name__
            self._log.warning("batch handler failed on %d inputs (%s): every one gets an error envelope: %s: %s",
                              len(batch), _seqs(batch), type(exc).__name__, reason[:500], exc_info=exc)
            return self._all_failed(batch, reason, start[1])
        finally:
            _current_batch.reset(token)
        end = now()
        self._observe_handler(end[0] - start[0])  # one handler call: the batch's
        problem = _check(results, len(batch))
        if problem is not None:
            self._log.error("%s (%s): every input of the batch gets an error envelope", problem, _seqs(batch))
            return self._all_failed(batch, problem, start[1])
        outcomes: list[Outcome] = []
        record = self._record
        for job, result in zip(batch, results, strict=True):
            envelope = job.envelope
            assert envelope is not None
            if isinstance(result, Retry):
                retry_later(job, str(result), result.delay)
                outcomes.append(None)
                continue
            if isinstance(result, BaseException):
                outcomes.append(self._outcomes.failed(job, envelope, result, start))  # type: ignore[arg-type]
                continue
            record(envelope, start[0], end[0])
            outcomes.append(self._outcomes.output(job, envelope, result, start, end))
        return outcomes

    def _all_failed(self, batch: list[Job], reason: str, start: str) -> list[Outcome]:
        return [self._outcomes.error(job, job.envelope or KreNatsMessage(), reason, start) for job in batch]

    # ---------------------------------------------------------------- stopping

    def stopping(self) -> None:
        """SIGTERM: no batch starts from now on; running batches go on to finish."""
        self._stopping = True

    async def hand_back(self) -> None:
        """Once the input subscription is closed, hand back the inputs collected but not started.

        Not before: JetStream redelivers a handed-back input at once, to an open pull request of this
        node's if it has one, and an input delivered to a closed subscription waits out its ack wait.
        """
        never_started = [job for batch in self._ready for job in batch] + self._take_collecting()
        self._ready.clear()
        self._credits.running -= len(never_started)
        for call, batch in list(self._submitted.items()):
            if call.cancel():  # still in the pool's queue (its runner's finally releases its credits)
                never_started += batch
        for job in never_started:
            await self._settlement.hand_back(job, "collected for a batch that had not started when the node stopped")
        returned, self._returned = self._returned, []
        for job in returned:
            await self._settlement.hand_back(job, "delivered while the node was stopping")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _check(results: Any, expected: int) -> str | None:
    """Why the batch handler's return value is not one result per input (None when it is)."""
    if not isinstance(results, (list, tuple)):
        return (f"batch handler returned {type(results).__name__}; expected a list with one result per input "
                f"({expected})")
    if len(results) != expected:
        return f"batch handler returned {len(results)} results for {expected} inputs"
    return None


def _seqs(batch: list[Job]) -> str:
    seqs = sorted(job.seq for job in batch)
    return f"input seq {seqs[0]}" if len(seqs) == 1 else f"input seqs {seqs[0]}…{seqs[-1]}"


def _ignore(seconds: float) -> None:
    """No histogram to fill (a Batcher built without metrics)."""
