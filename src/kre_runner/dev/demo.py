"""``kre-runner demo``: ``up`` on the example workflow (``examples/workflow.yaml``), then many requests.

It plays the KRE entrypoint: ``up`` creates the workflow stream as the K8s manager would and starts
each node as a real ``kre-runner run`` process with the ``KRT_*`` environment of a pod; the demo
then sends requests, matches the replies by tracking id, and prints what came back and how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import nats

from ..node.envelope import KreNatsMessage, decode, encode
from .calling import request_envelope
from .messages import find_message_type
from .up import LocalWorkflow, start_local_services
from .workflow import Workflow, load_workflow

__all__ = ["examples_dir", "run_demo"]

REPO_HINT = "run it from a clone of kre-runner (the examples are not in the wheel), or pass --examples DIR"


def examples_dir(given: str | None) -> Path:
    """The directory holding the example ``workflow.yaml``: ``--examples``, ./examples, or the repository's."""
    candidates = [Path(given)] if given else [Path.cwd() / "examples", Path(__file__).resolve().parents[2] / "examples"]
    for candidate in candidates:
        if (candidate / "workflow.yaml").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"{candidates[0] / 'workflow.yaml'} not found: {REPO_HINT}")


async def _report_services(services_env: dict[str, str], runtime: str) -> None:
    """Read back what the services node stored, from the databases themselves."""
    if "KRT_MONGO_URI" in services_env:
        from motor.motor_asyncio import AsyncIOMotorClient

        client = AsyncIOMotorClient(services_env["KRT_MONGO_URI"], serverSelectionTimeoutMS=3000)
        try:
            db = client[f"{runtime}-data"]
            visits = await db["visits"].count_documents({})
            predictions = await db["classificationMetrics"].count_documents({})
            print(f"  MongoDB {runtime}-data: {visits} documents in visits, {predictions} in classificationMetrics")
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


async def run_demo(requests: int = 500, examples: str | None = None, services: bool = True) -> int:
    try:
        workflow = load_workflow(examples_dir(examples) / "workflow.yaml")
    except FileNotFoundError as exc:
        print(f"kre-runner demo: {exc}", file=sys.stderr)
        return 2
    if not services:
        workflow = dataclasses.replace(workflow, nodes=tuple(n for n in workflow.nodes if n.name != "services"))
    directories = [d for node in workflow.nodes for d in node.directories]
    request_type = find_message_type("Request", directories)  # the example's own protobufs
    response_type = find_message_type("Response", directories)
    path = " -> ".join(n.name for n in workflow.nodes)
    print(f"kre-runner demo: {requests} requests through {path} ({workflow.path}) on an embedded nats-server")
    with contextlib.ExitStack() as stack:
        services_env = start_local_services(stack, lambda text: print(f"  {text}")) if services else None
        return await _run_workflow(workflow, requests, services_env, request_type, response_type)


async def _run_workflow(workflow: Workflow, requests: int, services_env: dict[str, str] | None, Request: Any,
                        Response: Any) -> int:
    async with LocalWorkflow(workflow, extra_env=services_env) as local:
        endpoint = await local.wait_ready(60)
        nc = await nats.connect(endpoint.nats_url)
        received: list[KreNatsMessage] = []
        done = asyncio.Event()

        async def on_reply(msg: Any) -> None:
            received.append(decode(msg.data))
            if len(received) >= requests:
                done.set()

        sub = await nc.subscribe(endpoint.entrypoint_subject, cb=on_reply)
        try:
            sent: dict[str, str] = {}
            envelopes = []
            for i in range(requests):
                # names repeat: the services node counts visits
                envelope = request_envelope(Request(name=f"user-{i % 50}"), reply=f"request-{i}")
                sent[envelope.tracking_id] = envelope.reply
                envelopes.append(encode(envelope, nc.max_payload))
            started = time.perf_counter()
            await asyncio.wait_for(_publish_all(nc, endpoint.input_subject, envelopes), 120)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 60)
            elapsed = time.perf_counter() - started
        finally:
            await sub.unsubscribe()
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
        await _report_services(services_env, workflow.runtime)
    print(f"\n{len(received)}/{requests} replies ({matched} matched by tracking id, {len(errors)} errors) "
          f"in {elapsed:.2f}s: {len(received) / elapsed:,.0f} requests/s end to end "
          f"(publish + {len(workflow.nodes)} nodes)")
    if services_env is not None:
        print("(the services node awaits MongoDB three times per request; `kre-runner demo --no-services "
              "--requests 20000` shows the runner's own pace)")
    return 0 if len(received) == requests and not errors else 1


async def _publish_all(nc: nats.aio.client.Client, subject: str, envelopes: list[bytes]) -> None:
    """The entrypoint's side: JetStream publishes with up to 256 PubAcks outstanding."""
    js = nc.jetstream()
    window = asyncio.Semaphore(256)
    failures: list[str] = []

    async def publish(data: bytes) -> None:
        try:
            await js.publish(subject, data, timeout=10)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            window.release()

    tasks = []
    for data in envelopes:
        await window.acquire()
        tasks.append(asyncio.create_task(publish(data)))
    await asyncio.gather(*tasks)
    if failures:
        raise RuntimeError(f"{len(failures)} requests were not stored: {failures[0]}")
