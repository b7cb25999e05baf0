"""The input whose handler runs now: what ``ctx.early_reply``, ``early_exit`` and ``batch_tracking_ids`` act on.

``ctx`` is one object shared by every handler call, so it reaches the input being handled through
this bridge. An awaited handler (async, or sync in a thread) finds its input in a context variable
the pipeline sets around the call; a sync handler on the event loop finds it in :attr:`Current.inline`,
which only the loop's thread reads (another thread, one the handler started, would otherwise act
on whichever input runs now). Either acts only while the handler runs: a task or thread that
outlives the call gets a ``RuntimeError``, never a publish after its input was settled.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any

from google.protobuf.message import Message

from ..config import Settings
from .batching import current_tracking_ids, in_batch_handler
from .outcome import Outcomes
from .publisher import PubAckPublisher
from .settlement import Job, request_id

__all__ = ["Current"]

# The input whose awaited handler runs in this task or handler thread.
_running: contextvars.ContextVar[Job] = contextvars.ContextVar("kre_running_input")


class Current:
    """Which input a handler call belongs to, and the ctx calls that act on it."""

    def __init__(self, settings: Settings, outcomes: Outcomes, publisher: PubAckPublisher, *,
                 one_at_a_time: bool) -> None:
        self._s = settings
        self._outcomes = outcomes
        self._publisher = publisher
        self._one_at_a_time = one_at_a_time  # a batch handler at KRT_BATCH_SIZE=1: the batch contract holds
        self.inline: Job | None = None  # the input whose sync handler runs on the loop now (set by the pipeline)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = threading.get_ident()

    def bind_loop(self) -> None:
        """The event loop the node runs on (``early_reply`` from a handler thread hops onto it)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    @staticmethod
    def enter(job: Job) -> contextvars.Token[Job]:
        """An awaited handler starts on ``job``."""
        job.handling = True
        return _running.set(job)

    @staticmethod
    def leave(job: Job, token: contextvars.Token[Job]) -> None:
        job.handling = False
        _running.reset(token)

    def running(self) -> Job | None:
        """The input whose handler runs in this task or thread (None outside a per-message handler)."""
        job = _running.get(None)
        if job is None and threading.get_ident() == self._loop_thread:
            job = self.inline
        return job

    def tracking_id(self) -> str | None:
        """The running input's tracking id (``ctx.logger`` lines carry it)."""
        job = self.running()
        if job is None:
            return None
        return request_id(job.envelope)

    def batch_tracking_ids(self) -> list[str]:
        """``ctx.batch_tracking_ids()``: the running batch's, or with ``KRT_BATCH_SIZE=1`` the input's."""
        if not self._one_at_a_time:
            return current_tracking_ids()
        if self.running() is None:
            raise RuntimeError("ctx.batch_tracking_ids() must be called from within a batch handler")
        return [self.tracking_id() or ""]

    def handled(self, what: str) -> Job:
        """The input whose handler runs now and may still act on it (``ctx.{what}``), else a RuntimeError."""
        job = self.running()
        if job is None:
            raise RuntimeError(f"ctx.{what} must be called from within the handler itself, while it runs (not "
                               f"from a thread it started, nor outside a handler)")
        if not job.handling and job is not self.inline:
            raise RuntimeError(f"ctx.{what} was called after the handler returned (from a task or thread it "
                               f"started): its input is settled by then; call it before the handler returns, "
                               f"e.g. await the task")
        return job

    def _acting_on(self, what: str) -> Job:
        if self._one_at_a_time or in_batch_handler():  # the batch contract, whatever the batch size
            raise RuntimeError(f"ctx.{what} acts on one message: it is not available in a batch handler")
        job = self.handled(what)
        if self._s.entrypoint_subject is None:
            raise RuntimeError(f"ctx.{what} needs KRT_NATS_ENTRYPOINT_SUBJECT")
        return job

    def early_reply(self, response: Message) -> Awaitable[None]:
        """``ctx.early_reply``: answer the entrypoint for the running input.

        The reply is one more publish of the input, so it is acked only once the reply is stored too.
        """
        job = self._acting_on("early_reply")
        data = self._outcomes.early_reply(job, response)  # raises (to the handler) when it cannot be sent
        job.replied = True
        job.refs += 1  # taken now, so the input cannot be settled before the reply is published
        return self.submit(self._publisher.publish(self._s.entrypoint_subject or "", data, f"{job.msg_id}:reply", job))

    def submit(self, send: Coroutine[Any, Any, None]) -> Awaitable[None]:
        """Run a publish of the running input on the event loop, from its thread or a handler thread."""
        if threading.get_ident() == self._loop_thread:
            return asyncio.ensure_future(send)
        # From a handler thread (KRT_HANDLER_THREADS): onto the event loop, which runs this before it
        # sees the handler's return, so the reference is in place in time.
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(send, self._loop)  # type: ignore[return-value]

    def early_exit(self) -> None:
        """``ctx.early_exit``: this input's output goes to the entrypoint; later nodes never see the request."""
        self._acting_on("early_exit").early_exit = True
