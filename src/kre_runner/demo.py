"""``kre-runner demo``: the example workflow on an embedded JetStream server, end to end.

It plays the KRE entrypoint: creates the workflow stream as the K8s manager would, starts each
node as a real ``kre-runner run`` process with the ``KRT_*`` environment of a pod, sends
requests, matches the replies by tracking id, and prints what came back and how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import nats
from google.protobuf.any_pb2 import Any as AnyProto
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from .config import redact_url
from .dispatch import Dispatcher
from .embedded import EmbeddedMongo, EmbeddedNats, EmbeddedVictoriaMetrics
from .envelope import KreNatsMessage, decode, now_iso
from .publisher import PubAckPublisher, Wire

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
        "KRT_SHUTDOWN_GRACE": "5", "KRT_HTTP_PORT": "0",  # three nodes on one host: no probes needed
    })
    return env


def _start_services(stack: contextlib.ExitStack) -> dict[str, str]:
    """MongoDB and a time-series DB for the services node: the user's, else local ones, else none."""
    env: dict[str, str] = {}
    if os.environ.get("KRT_MONGO_URI"):
        env["KRT_MONGO_URI"] = os.environ["KRT_MONGO_URI"]
        print(f"  ctx.db, ctx.prediction: MongoDB at {redact_url(env['KRT_MONGO_URI'])} (KRT_MONGO_URI)")
    else:
        try:
            env["KRT_MONGO_URI"] = stack.enter_context(EmbeddedMongo()).uri
            print(f"  ctx.db, ctx.prediction: nx-27017 (MongoDB wire protocol) at {env['KRT_MONGO_URI']}")
        except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
            print(f"  ctx.db, ctx.prediction: SKIPPED ({exc}; or set KRT_MONGO_URI)")
    if os.environ.get("KRT_INFLUX_URI"):
        for name in ("KRT_INFLUX_URI", "KRT_INFLUX_TOKEN", "KRT_INFLUX_ORG", "KRT_INFLUX_BUCKET"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        print(f"  ctx.measurement: InfluxDB at {redact_url(env['KRT_INFLUX_URI'])} (KRT_INFLUX_URI)")
    else:
        try:
            env["KRT_INFLUX_URI"] = stack.enter_context(EmbeddedVictoriaMetrics()).url
            print(f"  ctx.measurement: VictoriaMetrics (InfluxDB line protocol) at {env['KRT_INFLUX_URI']}")
        except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
            print(f"  ctx.measurement: SKIPPED ({exc}; or set KRT_INFLUX_URI)")
    env["KRT_INFLUX_FLUSH_INTERVAL"] = "0.2"
    return env


async def _report_services(services_env: dict[str, str]) -> None:
    """Read back what the services node stored, from the databases themselves."""
    if "KRT_MONGO_URI" in services_env:
        from motor.motor_asyncio import AsyncIOMotorClient

        client = AsyncIOMotorClient(services_env["KRT_MONGO_URI"], serverSelectionTimeoutMS=3000)
        try:
            db = client[f"{RUNTIME}-data"]
            visits = await db["visits"].count_documents({})
            predictions = await db["classificationMetrics"].count_documents({})
            print(f"  MongoDB {RUNTIME}-data: {visits} documents in visits, {predictions} in classificationMetrics")
        except Exception as exc:
            print(f"  MongoDB: could not read back ({type(exc).__name__}: {exc})")
        finally:
            client.close()
    url = services_env.get("KRT_INFLUX_URI")
    if url and "KRT_INFLUX_TOKEN" not in services_env:  # our VictoriaMetrics: its export API counts points
        await asyncio.sleep(1.0)
        with contextlib.suppress(Exception):
            urllib.request.urlopen(f"{url}/internal/force_flush", timeout=5).read()  # noqa: ASYNC210
        await asyncio.sleep(1.0)
        counts = {}
        for metric in ("visits_count", "node_elapsed_time_elapsed_ms", "workflow_elapsed_time_elapsed_ms"):
            query = urllib.parse.urlencode({"match[]": metric})
            try:
                body = urllib.request.urlopen(f"{url}/api/v1/export?{query}", timeout=5).read()  # noqa: ASYNC210
                counts[metric] = sum(len(json.loads(line)["values"]) for line in body.splitlines() if line)
            except Exception as exc:
                counts[metric] = f"unreadable ({exc})"
        print("  time series: " + ", ".join(f"{v} points of {k}" for k, v in counts.items()))


async def run_demo(requests: int = 500, examples_dir: str | None = None, services: bool = True) -> int:
    sys.path.insert(0, str(_examples_dir(examples_dir) / "greeter"))
    from greeter_pb2 import Request, Response  # the example's own protobufs

    examples = _examples_dir(examples_dir)
    path = "services -> greeter -> decorator" if services else "greeter -> decorator"
    print(f"kre-runner demo: {requests} requests through {path} on an embedded nats-server")
    with contextlib.ExitStack() as stack:
        services_env = _start_services(stack) if services else None
        return await _run_workflow(requests, examples, services_env, Request, Response)


async def _run_workflow(requests: int, examples: Path, services_env: dict[str, str] | None, Request: Any,
                        Response: Any) -> int:
    with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"], retention=RetentionPolicy.INTEREST))
        replies = await js.pull_subscribe(ENTRYPOINT, "entrypoint", config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        nodes = [
            ("services", "../services/services.py", f"{STREAM}.greeter", False),
            ("greeter", "greeter.py", f"{STREAM}.decorator", False),
            ("decorator", "decorator.py", ENTRYPOINT, True),
        ][0 if services_env is not None else 1:]
        first_subject = f"{STREAM}.{nodes[0][0]}"
        procs = [
            subprocess.Popen([sys.executable, "-m", "kre_runner", "run"],  # noqa: ASYNC220  # starts, never waits
                             env={**_node_env(server.url, examples, *node), **(services_env or {})})
            for node in nodes
        ]
        try:
            await _wait_ready(js, [f"{VERSION}-{name}" for name, *_ in nodes], procs)
            sent: dict[str, str] = {}
            started = time.perf_counter()
            envelopes = []
            for i in range(requests):
                tracking_id = str(uuid.uuid4())
                sent[tracking_id] = f"user-{i}"
                envelope = KreNatsMessage(tracking_id=tracking_id, reply=f"request-{i}")
                entry = envelope.tracking.add(node_name="entrypoint", start=now_iso())
                entry.end = now_iso()
                payload = AnyProto()
                payload.Pack(Request(name=f"user-{i % 50}"))  # names repeat: the services node counts visits
                envelope.payload.CopyFrom(payload)
                envelopes.append(envelope.SerializeToString())
            await asyncio.wait_for(_publish_all(nc, first_subject, envelopes), 120)
            received: list[KreNatsMessage] = []
            deadline = time.monotonic() + 60
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
    if services_env is not None:
        print("\nwhat the services node stored:")
        await _report_services(services_env)
    print(f"\n{len(received)}/{requests} replies ({matched} matched by tracking id, {len(errors)} errors) "
          f"in {elapsed:.2f}s: {len(received) / elapsed:,.0f} requests/s end to end (publish + {len(nodes)} nodes)")
    if services_env is not None:
        print("(the services node awaits MongoDB three times per request; `kre-runner demo --no-services "
              "--requests 20000` shows the runner's own pace)")
    return 0 if len(received) == requests and not errors else 1


async def _publish_all(nc: nats.aio.client.Client, subject: str, envelopes: list[bytes]) -> None:
    """The entrypoint's side: JetStream publishes with up to 512 PubAcks outstanding (the runner's publisher)."""
    window = asyncio.Semaphore(512)
    failures: list[str] = []

    async def stored(_: object, error: str | None) -> None:
        if error is not None:
            failures.append(error)
        window.release()

    publisher = PubAckPublisher(nc, Dispatcher(nc), Wire(nc), 10.0, stored)
    await publisher.start()
    for i, data in enumerate(envelopes):
        await window.acquire()
        await publisher.publish(subject, data, f"demo-{i}", None)
    for _ in range(512):
        await window.acquire()
    await publisher.close()
    if failures:
        raise RuntimeError(f"{len(failures)} requests were not stored: {failures[0]}")


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
