"""Helpers for tests: node environments, envelopes, running a node in-process or as a process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats.errors
from google.protobuf.any_pb2 import Any as AnyProto
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError

from kre_runner.config import Settings
from kre_runner.node.consumer import Consumer
from kre_runner.node.envelope import KreNatsMessage, decode
from kre_runner.run import run_node

HANDLERS = Path(__file__).parent / "handlers"
# The test handlers use the example workflow's protobufs (greeter_pb2: Request{name}, Response{greeting}).
PROTOS = Path(__file__).parents[1] / "examples" / "greeter"
sys.path.insert(0, str(PROTOS))

from greeter_pb2 import Request, Response  # noqa: E402

STREAM = "demo-v1-wf"


# Settings for tests of the data services alone (no node runs: the NATS values are never dialled).
SERVICES_BASE_ENV = {
    "KRT_WORKFLOW_NAME": "wf", "KRT_RUNTIME_ID": "demo", "KRT_VERSION_ID": "v1-id", "KRT_VERSION": "v1",
    "KRT_NODE_NAME": "node a", "KRT_NATS_SERVER": "nats://127.0.0.1:4222", "KRT_NATS_STREAM": "s",
    "KRT_NATS_INPUT": "s.in", "KRT_NATS_OUTPUT": "s.out", "KRT_HANDLER_PATH": "h.py",
}


def services_settings(**env: str) -> Settings:
    return Settings.from_env({**SERVICES_BASE_ENV, **env})


def node_env(nats_url: str, handler: str, node: str = "greeter", **overrides: str) -> dict[str, str]:
    env = {
        "KRT_WORKFLOW_NAME": "wf",
        "KRT_RUNTIME_ID": "demo",
        "KRT_VERSION_ID": "v1-id",
        "KRT_VERSION": "v1",
        "KRT_NODE_NAME": node,
        "KRT_NATS_SERVER": nats_url,
        "KRT_NATS_STREAM": STREAM,
        "KRT_NATS_INPUT": f"{STREAM}.{node}",
        "KRT_NATS_OUTPUT": f"{STREAM}.out",
        "KRT_NATS_ENTRYPOINT_SUBJECT": f"{STREAM}.entrypoint",
        "KRT_BASE_PATH": str(HANDLERS),
        "KRT_HANDLER_PATH": handler,
        "KRT_SHUTDOWN_GRACE": "10",
        "KRT_HTTP_PORT": "0",  # tests run nodes side by side; the endpoint tests give a free port
    }
    env.update(overrides)
    return env


def request_envelope(name: str, tracking_id: str | None = None, reply: str | None = None) -> KreNatsMessage:
    """What the KRE entrypoint sends: one tracking entry and ``Any(Request{name})``."""
    envelope = KreNatsMessage(tracking_id=tracking_id or str(uuid.uuid4()), reply=reply or f"reply-{name}")
    envelope.tracking.add(node_name="entrypoint", start="2026-01-01T00:00:00.000001", end="2026-01-01T00:00:00.000002")
    payload = AnyProto()
    payload.Pack(Request(name=name))
    envelope.payload.CopyFrom(payload)
    return envelope


def greeting(envelope: KreNatsMessage) -> str:
    response = Response()
    assert envelope.payload.Unpack(response), envelope.payload.type_url
    return response.greeting


class Collector:
    """A durable-free consumer on a subject, created before inputs are sent (interest retention)."""

    def __init__(self, js: JetStreamContext, subject: str) -> None:
        self._js = js
        self.subject = subject
        self._sub = None
        self.raw: list[bytes] = []

    async def start(self) -> Collector:
        # An ephemeral consumer is deleted after 5 s without pulls by default; replicas can take longer
        # than that to start on a loaded machine, and the outputs would then have no interest at all.
        self._sub = await self._js.pull_subscribe(
            self.subject,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=300),
        )
        return self

    async def take(self, count: int, timeout: float = 10.0) -> list[KreNatsMessage]:
        """Exactly ``count`` envelopes, or fewer if ``timeout`` passes first."""
        assert self._sub is not None
        got: list[KreNatsMessage] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError, nats.errors.TimeoutError):
                for msg in await self._sub.fetch(min(256, count - len(got)), timeout=0.5):
                    self.raw.append(msg.data)
                    got.append(decode(msg.data))
        return got

    async def nothing_more(self, wait: float = 0.5) -> bool:
        assert self._sub is not None
        try:
            extra = await self._sub.fetch(1, timeout=wait)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            return True
        return not extra


async def wait_ready(js: JetStreamContext, consumer: str, timeout: float = 15.0, replicas: int = 1) -> None:
    """A node is consuming once its durable consumer has pull requests waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(NotFoundError):
            info = await js.consumer_info(STREAM, consumer)
            if info.num_waiting >= replicas:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"consumer {consumer} not ready")


async def wait_consumer(js: JetStreamContext, consumer: str, condition: Callable[[ConsumerInfo], bool],
                        timeout: float = 10.0) -> ConsumerInfo:
    """Poll the consumer until ``condition(info)`` holds; the info that met it (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(STREAM, consumer)
        if condition(info):
            return info
        assert time.monotonic() < deadline, f"consumer {consumer} did not reach the expected state: {info}"
        await asyncio.sleep(0.05)


async def wait_settled(js: JetStreamContext, consumer: str, timeout: float = 10.0) -> None:
    """Until the consumer has nothing pending and nothing unacked."""
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        info = await js.consumer_info(STREAM, consumer)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"consumer {consumer} did not settle: {info}")


@contextlib.asynccontextmanager
async def running_node(env: dict[str, str], js: JetStreamContext) -> AsyncIterator[asyncio.Task[Consumer]]:
    """Run ``run_node`` in this process until the block ends (then stop it as SIGTERM would).

    The node's own exception, if it raised one, is raised at the end of the block.
    """
    settings = Settings.from_env(env)
    stop = asyncio.Event()
    logger = logging.getLogger("kre_runner.test")
    task = asyncio.create_task(run_node(settings, stop, logger))
    try:
        ready = asyncio.create_task(wait_ready(js, settings.consumer_name))
        done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()  # raises the startup error
        ready.result()
        yield task
    finally:
        stop.set()
        # What the node raised (a crash during the test, a shutdown that fails or hangs) fails the test.
        await asyncio.wait_for(task, 30)


def start_process(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``kre-runner run`` as a real process (its own interpreter, signals and exit code)."""
    full = dict(os.environ)
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROTOS), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "kre_runner", "run"], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
