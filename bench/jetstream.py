"""The stream and the node's consumer, reset for every measurement so each starts from the same state.

Backlog runs pre-create the node's durable consumer *paused*: the node starts, sends its pull
requests, and nothing flows until :func:`resume` — so node start-up is never part of a timing.
The node finds the consumer with the config it would have created and leaves it as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

__all__ = ["CONSUMER", "INPUT", "OUTPUT", "STREAM", "acked_inputs", "create_consumer", "reset_stream", "start_at",
           "wait_acked", "wait_ready"]

STREAM = "bench"
INPUT = f"{STREAM}.in"
OUTPUT = f"{STREAM}.out"
ENTRYPOINT = f"{STREAM}.entrypoint"
VERSION, NODE = "v1", "node"
CONSUMER = f"{VERSION}-{NODE}"  # kre-runner's durable name: {KRT_VERSION}-{KRT_NODE_NAME}


async def reset_stream(js: JetStreamContext, retention: RetentionPolicy = RetentionPolicy.LIMITS) -> None:
    """Delete and recreate the file-backed stream ``bench.*`` (drops its consumers and messages)."""
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"], retention=retention,
                                     storage=StorageType.FILE))


async def create_consumer(js: JetStreamContext, *, paused: bool) -> None:
    """The node's durable pull consumer, as kre-runner configures it (deliver all)."""
    pause_until = None
    if paused:
        pause_until = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await js.add_consumer(STREAM, ConsumerConfig(
        durable_name=CONSUMER, filter_subject=INPUT, ack_policy=AckPolicy.EXPLICIT,
        # max_deliver: KRT_MAX_DELIVER (5) + 2, as kre-runner sets it (jetstream.consumer_config).
        deliver_policy=DeliverPolicy.ALL, ack_wait=30.0, max_deliver=7, max_ack_pending=-1, max_waiting=512,
        pause_until=pause_until,
    ))


async def start_at(js: JetStreamContext, delay: float = 0.2) -> int:
    """Unpause the consumer ``delay`` seconds from now; returns that moment as ``monotonic_ns``.

    A timed unpause, not ``resume_consumer``: nats-server 2.15 does not wake waiting pull
    requests on an explicit resume (the backlog then trickles out one message per new event),
    while the pause timer's expiry does.
    """
    mono, wall = time.monotonic_ns(), datetime.now(timezone.utc)
    at = wall + timedelta(seconds=delay)
    await js.pause_consumer(STREAM, CONSUMER, at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    return mono + int(delay * 1e9)


async def acked_inputs(js: JetStreamContext) -> tuple[int, bool]:
    """(inputs acked in order, nothing pending or unacked). The ack floor's *consumer* sequence
    counts inputs; its stream sequence would also count the outputs, which share the stream."""
    info = await js.consumer_info(STREAM, CONSUMER)
    acked = info.ack_floor.consumer_seq if info.ack_floor and info.ack_floor.consumer_seq else 0
    return acked, not info.num_pending and not info.num_ack_pending


async def wait_acked(js: JetStreamContext, inputs: int, timeout: float, poll: float = 0.01) -> int:
    """``monotonic_ns`` once ``inputs`` inputs have been delivered and acked and none is pending."""
    deadline = time.monotonic() + timeout
    acked = 0
    while time.monotonic() < deadline:
        acked, idle = await acked_inputs(js)
        if acked >= inputs and idle:
            return time.monotonic_ns()
        await asyncio.sleep(poll)
    raise TimeoutError(f"inputs not all acked within {timeout:.0f}s ({acked} < {inputs})")


async def wait_ready(js: JetStreamContext, alive: Callable[[], bool], timeout: float = 30.0) -> None:
    """A node is ready once its pull requests wait on the consumer; ``alive()`` false means it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the node exited during start-up")
        try:
            if (await js.consumer_info(STREAM, CONSUMER)).num_waiting:
                return
        except NotFoundError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"node not ready within {timeout:.0f}s")
