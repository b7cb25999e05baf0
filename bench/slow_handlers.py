"""The fault table's slow-handler rows: no handler speed up to ¾ of the ack wait calls a handler twice.

A sync handler on the event loop (the default) holds the loop for its whole call, so inputs delivered
behind it can neither start nor be kept alive meanwhile: every one asked for too many waits past its
ack wait, is delivered again, and reaches the handler a second time (the output is deduplicated by
its Nats-Msg-Id; the handler's side effects are not). The grid: calls of 1 ms, 50 ms, 120 ms, ½ and ¾ of
the ack wait, each speed a backlog published at once, on the four paths (on the loop, a thread,
async, batches), one node process per path, all four at once. The speeds follow one another on the
same node, so each backlog meets a node that paced itself on the previous speed. Each call is
written to a file (paced_handler.py): a second line for an input is a second call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
from google.protobuf.any_pb2 import Any as AnyProto
from greeter_pb2 import Request, Response
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from kre_runner.node.envelope import KreNatsMessage, decode

BENCH_DIR = Path(__file__).resolve().parent
STREAM = "slow"
PATHS = {
    "loop": {"KRT_HANDLER_PATH": "paced_handler.py:handler"},
    "thread": {"KRT_HANDLER_PATH": "paced_handler.py:handler", "KRT_HANDLER_THREADS": "1"},
    "async": {"KRT_HANDLER_PATH": "paced_handler.py:handler_async"},
    "batch": {"KRT_HANDLER_PATH": "paced_handler.py:handler_batch", "KRT_BATCH_SIZE": "4"},
}


def grid(ack_wait: float, quick: bool) -> list[tuple[float, int]]:
    """(seconds a call takes, inputs in its backlog): one at a time, each backlog outlasts the ack wait
    (the 1 ms one aside: the fast path's own check)."""
    if quick:
        return [(0.001, 100), (0.05, 60), (0.12, 30), (ack_wait / 2, 4), (ack_wait * 0.75, 4)]
    return [(0.001, 240), (0.05, 240), (0.12, 240), (ack_wait / 2, 8), (ack_wait * 0.75, 8)]


@dataclass
class PathResult:
    """What became of one path's inputs, per call time."""

    inputs: dict[float, int] = field(default_factory=dict)
    outputs: dict[float, int] = field(default_factory=dict)  # distinct inputs with an output
    duplicated: dict[float, int] = field(default_factory=dict)  # inputs with more than one output
    second_calls: dict[float, int] = field(default_factory=dict)  # inputs the handler saw more than once


def _envelope(name: str) -> bytes:
    envelope = KreNatsMessage(tracking_id=str(uuid.uuid4()), reply=f"reply-{name}")
    envelope.tracking.add(node_name="entrypoint", start="2026-01-01T00:00:00.000001", end="2026-01-01T00:00:00.000002")
    payload = AnyProto()
    payload.Pack(Request(name=name))
    envelope.payload.CopyFrom(payload)
    return envelope.SerializeToString()


def _greeting(envelope: KreNatsMessage) -> str:
    response = Response()
    envelope.payload.Unpack(response)
    return response.greeting


async def _wait(what: str, check, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def _one_path(path: str, nats_url: str, js: JetStreamContext, work: Path, ack_wait: float,
                    quick: bool) -> PathResult:
    calls = work / f"{path}.calls"
    node = f"slow-{path}"
    consumer = f"v1-{node}"
    env = {
        "KRT_WORKFLOW_NAME": "slow", "KRT_RUNTIME_ID": "slow", "KRT_VERSION_ID": "v1-id", "KRT_VERSION": "v1",
        "KRT_NODE_NAME": node, "KRT_NATS_SERVER": nats_url, "KRT_NATS_STREAM": STREAM,
        "KRT_NATS_INPUT": f"{STREAM}.{path}", "KRT_NATS_OUTPUT": f"{STREAM}out.{path}",
        "KRT_NATS_ENTRYPOINT_SUBJECT": f"{STREAM}out.entrypoint", "KRT_BASE_PATH": str(BENCH_DIR),
        "KRT_HTTP_PORT": "0", "KRT_ACK_WAIT": str(ack_wait), "KRE_TEST_CALLS": str(calls),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")])),
        **PATHS[path],
    }
    outputs = await js.pull_subscribe(env["KRT_NATS_OUTPUT"], config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=600))
    with open(work / f"{path}.log", "wb") as log:  # noqa: ASYNC230 - the child process holds it
        proc = subprocess.Popen([sys.executable, "-m", "kre_runner", "run"],  # noqa: ASYNC220
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    result = PathResult()
    try:
        async def bound() -> bool:
            with contextlib.suppress(NotFoundError):
                return (await js.consumer_info(STREAM, consumer)).num_waiting > 0
            return False

        await _wait(f"{path}: node not ready", bound, 60)
        for seconds, count in grid(ack_wait, quick):
            names = [f"{seconds}:{i}" for i in range(count)]
            for name in names:
                await js.publish(env["KRT_NATS_INPUT"], _envelope(name))
            seen: collections.Counter[str] = collections.Counter()
            deadline = time.monotonic() + 3 * count * seconds + 3 * ack_wait + 30
            while len(seen) < count and time.monotonic() < deadline:
                with contextlib.suppress(asyncio.TimeoutError, nats.errors.TimeoutError):
                    for msg in await outputs.fetch(256, timeout=0.5):
                        seen[_greeting(decode(msg.data))] += 1

            async def settled() -> bool:
                info = await js.consumer_info(STREAM, consumer)
                return info.num_pending == 0 and info.num_ack_pending == 0

            await _wait(f"{path}: inputs of {seconds}s not settled", settled, 3 * count * seconds + 3 * ack_wait + 60)
            with contextlib.suppress(asyncio.TimeoutError, nats.errors.TimeoutError):  # outputs stored twice?
                for msg in await outputs.fetch(256, timeout=0.5):
                    seen[_greeting(decode(msg.data))] += 1
            called = collections.Counter(line for line in calls.read_text().split()
                                         if line.split(":")[0] == str(seconds))
            result.inputs[seconds] = count
            result.outputs[seconds] = len(set(seen) & set(names))
            result.duplicated[seconds] = sum(1 for name in names if seen[name] > 1)
            result.second_calls[seconds] = sum(1 for name in names if called[name] > 1)
    finally:
        proc.terminate()
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
    return result


async def run_grid(nats_url: str, work: Path, *, quick: bool) -> dict[str, PathResult]:
    """Every path at every speed on the server at ``nats_url``; ``work`` keeps the call files and logs."""
    ack_wait = 2.0 if quick else 4.0
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"], retention=RetentionPolicy.INTEREST))
        await js.add_stream(StreamConfig(name=f"{STREAM}out", subjects=[f"{STREAM}out.*"]))
        results = await asyncio.gather(*(_one_path(path, nats_url, js, work, ack_wait, quick) for path in PATHS))
    finally:
        await nc.close()
    return dict(zip(PATHS, results, strict=True))
