"""kre-runner 3.x nodes beside an independent implementation of the 3.x contract (issues 18 and 19).

The other implementation is ``tests/v3_reference/node.py``, written only from the reference document.
One kre-py 3.4.1 handler module (``tests/handlers/v3_interop.py``) runs under both, in one workflow on
a real nats-server laid out as the 3.x manager does it (stream ``{stream}.*`` plus ``{stream}.{node}.*``
for channels, three KV buckets per node, an object store): entrypoint (the test) → ``first`` →
``mid`` (fan-in: the entrypoint and ``first.left``) → ``exitpoint``, with the implementations
alternating, both ways round. Values and objects cross between implementations in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest
from kre_helpers import HANDLERS, PROTOS, STREAM, Request, Response
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StreamConfig,
)
from nats.js.errors import NotFoundError
from v3_reference import wire

pytestmark = pytest.mark.integration

REFERENCE_NODE = Path(__file__).parent / "v3_reference" / "node.py"
NODES = ("first", "mid", "exitpoint")
INPUTS = {"first": [f"{STREAM}.entrypoint"], "mid": [f"{STREAM}.entrypoint", f"{STREAM}.first.left"],
          "exitpoint": [f"{STREAM}.mid"]}
PROJECT_KV, WORKFLOW_KV = "key-store_demo_v1", "key-store_demo_v1_wf"
OBJECTS = "object-store_demo_v1_wf"
REQUESTS = 20


def node_kv(node: str) -> str:
    return f"key-store_demo_v1_wf_{node[0].upper()}{node[1:]}"  # spelled as the end-to-end set-up does


@pytest.fixture
async def v3_workflow(js: JetStreamContext) -> str:
    """The stream, buckets and object store the 3.x manager makes (the runners make none of them)."""
    await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"] + [f"{STREAM}.{n}.*" for n in NODES],
                                     retention=RetentionPolicy.INTEREST))
    for bucket in (PROJECT_KV, WORKFLOW_KV, *map(node_kv, NODES)):
        await js.create_key_value(KeyValueConfig(bucket=bucket))
    await js.create_object_store(OBJECTS, ObjectStoreConfig())
    return STREAM


def env_for(node: str, impl: str, nats_url: str) -> dict[str, str]:
    return {
        "KRT_WORKFLOW_NAME": "wf", "KRT_RUNTIME_ID": "demo", "KRT_VERSION_ID": "v1-id", "KRT_VERSION": "v1",
        "KRT_NODE_NAME": node, "KRT_NATS_SERVER": nats_url, "KRT_NATS_STREAM": STREAM,
        "KRT_NATS_INPUTS": ",".join(INPUTS[node]), "KRT_NATS_OUTPUT": f"{STREAM}.{node}",
        "KRT_NATS_KEY_VALUE_STORE_PROJECT": PROJECT_KV, "KRT_NATS_KEY_VALUE_STORE_WORKFLOW": WORKFLOW_KV,
        "KRT_NATS_KEY_VALUE_STORE_NODE": node_kv(node), "KRT_NATS_OBJECT_STORE": OBJECTS,
        "KRT_BASE_PATH": str(HANDLERS), "KRT_HANDLER_PATH": "v3_interop.py",
        "KRT_SHUTDOWN_GRACE": "10", "KRT_HTTP_PORT": "0", "INTEROP_IMPL": impl,
    }


class Processes:
    """The workflow's node processes, each with its output in a file (shown when a test fails)."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, node: str, impl: str, nats_url: str) -> None:
        env = {**os.environ, **env_for(node, impl, nats_url)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROTOS), os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "kre_runner", "run"] if impl == "kre-runner" \
            else [sys.executable, str(REFERENCE_NODE)]
        log = self._tmp / f"{node}-{impl}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.running.append((f"{node} ({impl})", proc, log))

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{log.read_text()[-3000:]}" for name, _, log in self.running)

    def stop(self) -> None:
        for _, proc, _ in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    except BaseException:
        procs.stop()
        print(procs.logs())
        raise
    procs.stop()


async def wait_consuming(js: JetStreamContext, procs: Processes, layout: dict[str, str], timeout: float = 30.0) -> None:
    """Each node consumes: kre-runner's pull consumer has a pull waiting, the reference's push consumers are bound."""
    deadline = time.monotonic() + timeout
    for node, impl in layout.items():
        names = [f"v1-{node}"] if impl == "kre-runner" else [f"{s.replace('.', '-')}-{node}" for s in INPUTS[node]]
        for name in names:
            while True:
                dead = [n for n, p, _ in procs.running if p.poll() is not None]
                assert not dead, f"{dead} exited:\n{procs.logs()}"
                with contextlib.suppress(NotFoundError):
                    info = await js.consumer_info(STREAM, name)
                    if (info.num_waiting if impl == "kre-runner" else info.push_bound):
                        break
                assert time.monotonic() < deadline, f"{node} ({impl}) is not consuming {name}:\n{procs.logs()}"
                await asyncio.sleep(0.1)


class Seen:
    """Every envelope on some subjects, decoded with the reference's own wire module."""

    def __init__(self, js: JetStreamContext, subjects: list[str]) -> None:
        self._js, self._subjects = js, subjects
        self.got: list[tuple[str, object]] = []

    async def start(self) -> Seen:
        self._subs = [await self._js.pull_subscribe(subject, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=300))
            for subject in self._subjects]
        return self

    async def settle(self, count: int, timeout: float = 30.0) -> list[tuple[str, object]]:
        """Exactly ``count`` envelopes: waits for them, then a while more to catch any extra."""
        deadline = time.monotonic() + timeout
        extra_until = None
        while time.monotonic() < (extra_until or deadline):
            for sub in self._subs:
                with contextlib.suppress(asyncio.TimeoutError, nats.errors.TimeoutError):
                    for msg in await sub.fetch(64, timeout=0.2):
                        self.got.append((msg.subject, wire.decode(msg.data)))
            if len(self.got) >= count and extra_until is None:
                extra_until = time.monotonic() + 1.0
        return self.got


def entry(name: str, request_id: str) -> bytes:
    """What the 3.x entrypoint publishes."""
    message = wire.KreNatsMessage(request_id=request_id, from_node="entrypoint", message_type=wire.OK)
    message.payload.Pack(Request(name=name))
    return message.SerializeToString()


def greeting(message) -> str:
    response = Response()
    assert message.payload.Unpack(response), message.payload.type_url
    return response.greeting


@pytest.mark.parametrize("layout", [
    {"first": "reference", "mid": "kre-runner", "exitpoint": "reference"},
    {"first": "kre-runner", "mid": "reference", "exitpoint": "kre-runner"},
], ids=["reference-kre-reference", "kre-reference-kre"])
async def test_a_mixed_workflow_shares_configuration_objects_channels_and_envelopes(
        nats_server, js, v3_workflow, tmp_path, layout):
    first, mid, exit_ = layout["first"], layout["mid"], layout["exitpoint"]
    seen = await Seen(js, [f"{STREAM}.first.left", f"{STREAM}.mid", f"{STREAM}.exitpoint"]).start()
    with processes(tmp_path) as procs:
        for node, impl in layout.items():
            procs.start(node, impl, nats_server.url)
        await wait_consuming(js, procs, layout)
        run = uuid.uuid4().hex[:6]
        names = {f"{run}-{i}": f"name{i}" for i in range(REQUESTS)} | {f"{run}-boom": "boom"}
        for request_id, name in names.items():
            await js.publish(f"{STREAM}.entrypoint", entry(name, request_id))
        # Per request: first.left 1; mid 2 (direct, via first); exitpoint 2.
        got = await seen.settle(5 * len(names))
        logs = procs.logs()
    summary = sorted((s, m.request_id, m.message_type, m.error or m.payload.value) for s, m in got)
    assert len(got) == 5 * len(names), "\n".join(map(str, summary)) + logs

    by_subject: dict[str, list] = {}
    for subject, message in got:
        by_subject.setdefault(subject, []).append(message)
    # Channels: first's sends reach first.left, as first.
    left = by_subject[f"{STREAM}.first.left"]
    assert sorted(m.request_id for m in left) == sorted(names)
    assert {(m.from_node, m.message_type) for m in left} == {("first", wire.OK)}

    # mid: two per request, as mid, one an error envelope for "boom" (the handler raised on mid).
    mids = {}
    for m in by_subject[f"{STREAM}.mid"]:
        assert m.from_node == "mid", m
        text = m.error if m.message_type == wire.ERROR else greeting(m)
        mids.setdefault(m.request_id, []).append((m.message_type, text))
    for request_id, name in names.items():
        via = (wire.OK, f"mid via first {name}: value from {first}; object of {name} from {first}")
        direct = (wire.ERROR, "Error in node 'mid' executing handler for node 'entrypoint': boom on purpose") \
            if name == "boom" else (wire.OK, f"mid direct {name}")
        assert sorted(mids[request_id]) == sorted([via, direct]), (request_id, mids[request_id])

    # exitpoint: two per request, nothing lost or duplicated; objects saved by mid read back by exit.
    exits = {}
    for m in by_subject[f"{STREAM}.exitpoint"]:
        assert (m.from_node, m.message_type) == ("exitpoint", wire.OK), m
        exits.setdefault(m.request_id, []).append(greeting(m))
    tail = f" | back: saved by mid on {mid} | exit on {exit_}"
    for request_id, name in names.items():
        direct = "exit saw an error" if name == "boom" else f"mid direct {name}{tail}"
        via = f"mid via first {name}: value from {first}; object of {name} from {first}{tail}"
        assert sorted(exits[request_id]) == sorted([direct, via]), (request_id, exits[request_id])

    # Every input acked by both implementations (the reference's ack wait is 22 hours: an unacked one stays).
    for info in await js.consumers_info(STREAM):
        if info.config.durable_name:
            assert info.num_ack_pending == 0 and info.num_pending == 0, info
