"""``kre-runner demo``: the example workflow on an embedded JetStream server, end to end.

It plays the KRE entrypoint: creates the workflow stream as the K8s manager would, starts each
node as a real ``kre-runner run`` process with the ``KRT_*`` environment of a pod, sends
requests, matches the replies by tracking id, and prints what came back and how fast.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nats
from google.protobuf.any_pb2 import Any as AnyProto
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from .embedded import EmbeddedNats
from .envelope import KreNatsMessage, decode, now_iso

__all__ = ["run_demo"]

RUNTIME, VERSION, WORKFLOW = "demo", "v1", "greeter"
STREAM = f"{RUNTIME}-{VERSION}-{WORKFLOW}"
ENTRYPOINT = f"{STREAM}.entrypoint"


def _examples_dir(given: str | None) -> Path:
    candidates = [Path(given)] if given else [Path.cwd() / "examples", Path(__file__).resolve().parents[2] / "examples"]
    for candidate in candidates:
        if (candidate / "greeter" / "greeter.py").is_file():
            return candidate.resolve()
    raise FileNotFoundError("examples/greeter not found: run the demo from the repository or pass --examples")


def _node_env(nats_url: str, examples: Path, node: str, handler: str, output: str, last: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "KRT_WORKFLOW_NAME": WORKFLOW, "KRT_RUNTIME_ID": RUNTIME, "KRT_VERSION_ID": f"{VERSION}-id",
        "KRT_VERSION": VERSION, "KRT_NODE_NAME": node, "KRT_NATS_SERVER": nats_url,
        "KRT_NATS_STREAM": STREAM, "KRT_NATS_INPUT": f"{STREAM}.{node}", "KRT_NATS_OUTPUT": output,
        "KRT_NATS_ENTRYPOINT_SUBJECT": ENTRYPOINT, "KRT_BASE_PATH": str(examples / "greeter"),
        "KRT_HANDLER_PATH": handler, "KRT_IS_LAST_NODE": "true" if last else "false",
        "KRT_SHUTDOWN_GRACE": "5",
    })
    return env


async def run_demo(requests: int = 500, examples_dir: str | None = None) -> int:
    sys.path.insert(0, str(_examples_dir(examples_dir) / "greeter"))
    from greeter_pb2 import Request, Response  # the example's own protobufs

    examples = _examples_dir(examples_dir)
    print(f"kre-runner demo: {requests} requests through greeter -> decorator on an embedded nats-server")
    with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"], retention=RetentionPolicy.INTEREST))
        replies = await js.pull_subscribe(ENTRYPOINT, "entrypoint", config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        nodes = [
            ("greeter", "greeter.py", f"{STREAM}.decorator", False),
            ("decorator", "decorator.py", ENTRYPOINT, True),
        ]
        procs = [
            subprocess.Popen([sys.executable, "-m", "kre_runner", "run"],  # noqa: ASYNC220  # starts, never waits
                             env=_node_env(server.url, examples, *node))
            for node in nodes
        ]
        try:
            await _wait_ready(js, [f"{VERSION}-{name}" for name, *_ in nodes], procs)
            sent: dict[str, str] = {}
            started = time.perf_counter()
            for i in range(requests):
                tracking_id = str(uuid.uuid4())
                sent[tracking_id] = f"user-{i}"
                envelope = KreNatsMessage(tracking_id=tracking_id, reply=f"request-{i}")
                entry = envelope.tracking.add(node_name="entrypoint", start=now_iso())
                entry.end = now_iso()
                payload = AnyProto()
                payload.Pack(Request(name=f"user-{i}"))
                envelope.payload.CopyFrom(payload)
                await js.publish(f"{STREAM}.greeter", envelope.SerializeToString())
            received: list[KreNatsMessage] = []
            deadline = time.monotonic() + 30
            while len(received) < requests and time.monotonic() < deadline:
                try:
                    batch = await replies.fetch(min(256, requests - len(received)), timeout=1)
                except nats.errors.TimeoutError:
                    continue
                received.extend(decode(m.data) for m in batch)
            elapsed = time.perf_counter() - started
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(15)
            await nc.close()

    print("\nsample results:")
    for envelope in received[:5]:
        response = Response()
        envelope.payload.Unpack(response)
        path = " -> ".join(t.node_name for t in envelope.tracking)
        print(f"  {envelope.reply:>12}  {response.greeting!r:40}  via {path}")
    errors = [e for e in received if e.error]
    matched = sum(1 for e in received if e.tracking_id in sent)
    print(f"\n{len(received)}/{requests} replies ({matched} matched by tracking id, {len(errors)} errors) "
          f"in {elapsed:.2f}s: {len(received) / elapsed:,.0f} requests/s end to end (publish + 2 nodes)")
    return 0 if len(received) == requests and not errors else 1


async def _wait_ready(js: nats.js.JetStreamContext, consumers: list[str],
                      procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """A node is ready once its durable consumer has pull requests waiting."""
    deadline = time.monotonic() + timeout
    pending = list(consumers)
    while pending:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a node exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nodes not ready: {pending}")
        try:
            info = await js.consumer_info(STREAM, pending[0])
            if info.num_waiting:
                pending.pop(0)
                continue
        except nats.js.errors.NotFoundError:
            pass
        await asyncio.sleep(0.1)
