"""Slots: inputs that do not run in place get a worker per free slot; the others wait, kept alive, for one.

A sync handler on the event loop runs in place, in the reader task (consumer.py). Async handlers,
handlers in threads and a paced sync handler (credits.py) run here instead: up to ``credits.slots``
workers at once, each going on to the next waiting input when its own is handled. An input
waiting for a slot is held (counted, and kept alive by maintenance.py) from its delivery on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from .credits import Credits
from .settlement import Job

__all__ = ["Workers"]


class Workers:
    """The slots of one consumer: which inputs run in a worker now, and which wait for one."""

    def __init__(self, credits: Credits, jobs: set[Job]) -> None:
        self._credits = credits
        self._jobs = jobs  # started and not yet settled (the settlement's own set)
        self.waiting: deque[tuple[Job, bytes]] = deque()  # delivered while every slot is busy
        self.idle = asyncio.Event()  # set while nothing is held: shutdown waits for it
        self.idle.set()
        self._settled_since_look = 0  # settlements since the credit was last looked at
        # Bound by the consumer once the pipeline, the pull link and maintenance exist (they need us first).
        self._run: Callable[[Job, bytes], Awaitable[None]]
        self._pull: Callable[[], Awaitable[None]]
        self._before_blocking: Callable[[], Awaitable[None]] | None = None

    def bind(self, run: Callable[[Job, bytes], Awaitable[None]], pull: Callable[[], Awaitable[None]],
             before_blocking: Callable[[], Awaitable[None]] | None) -> None:
        """``run`` one input (the pipeline's), ``pull`` more, and (paced) what to do before a blocking call."""
        self._run, self._pull, self._before_blocking = run, pull, before_blocking

    def start(self, job: Job, data: bytes) -> None:
        """Take a slot and start a worker on this input (the consumer checked ``credits.may_start()``)."""
        self._credits.running += 1
        self._jobs.add(job)  # kept alive from now on, though the task may start later
        job.task = asyncio.create_task(self._work(job, data))

    async def _work(self, job: Job, data: bytes) -> None:
        """A worker: this input, then those waiting for a slot, until none is left.

        Going straight on to the next input (rather than a task per input) starts its handler as
        soon as this one's output is sent: when many handlers finish together (their I/O was issued
        together), each slot turns over without waiting for the whole wave to be sent.
        """
        task = job.task
        credits, waiting = self._credits, self.waiting
        try:
            while True:
                job.task = task
                self._jobs.add(job)
                if self._before_blocking is not None:  # paced: a sync handler on the loop (credits.py)
                    await self._before_blocking()
                await self._run(job, data)
                if credits.want(len(self._jobs), len(waiting)):
                    await self._pull()
                if not waiting:
                    break
                job, data = waiting.popleft()
        finally:
            credits.running -= 1
        if credits.want(len(self._jobs), len(waiting)):
            await self._pull()

    def freed(self) -> bool:
        """An input was settled: its slot may start a waiting input; True if the freed credit is worth a pull.

        Credit is asked for in chunks, so a look every ``chunk`` settlements finds each one as soon
        as it is free (a look at every settlement costs more than the rest of this).
        """
        waiting, jobs, credits = self.waiting, self._jobs, self._credits
        if waiting and credits.may_start():
            self.start(*waiting.popleft())
        if not jobs:
            self.idle.set()
        self._settled_since_look += 1
        if self._settled_since_look >= credits.chunk or not jobs:
            self._settled_since_look = 0
            return credits.want(len(jobs), len(waiting)) > 0
        return False

    def take_waiting(self) -> list[Job]:
        """Shutdown, out of grace: the inputs that never got a slot, no longer waiting for one."""
        never_started = [job for job, _ in self.waiting]
        self.waiting.clear()
        return never_started

    def held(self) -> tuple[int, int]:
        """Inputs started and not settled, and inputs waiting for a slot."""
        return len(self._jobs), len(self.waiting)

    def waiting_jobs(self) -> list[Job]:
        return [job for job, _ in self.waiting]

    def inflight(self) -> int:
        return len(self._jobs) + len(self.waiting)
