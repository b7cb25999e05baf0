"""The fault table's 3.x rows: a fan-in node (three inputs, routed handlers) through kill -9 and a server restart.

The node speaks KRE 3.x (``KRT_NATS_INPUTS``): the test publishes 3.x envelopes (``request_id``,
``from_node`` = the upstream's name, OK) in turn on the entrypoint's, nodeA's and nodeB's subjects at a
steady rate; ``fault_handler_v3.py`` sends one output per input (``default_handler`` for the
entrypoint and nodeB, ``custom_handlers["nodeA"]`` for nodeA). Every send carries its own Nats-Msg-Id
(node, stream, input seq, send index), so an input redelivered after its replica was killed stores
nothing twice. The tally is by ``request_id``: outputs, error envelopes, lost, duplicated, and
misrouted (an output whose handler is not the one its ``from_node`` names).

The stream is laid out as tests/test_v3.py's (``{S}.*`` for the inputs and the output, ``{S}.{node}.*``
for channels) because a 3.x node checks that its stream captures its output and channels; it keeps
limits retention so that it doubles as the output stream the tally reads in full. The node processes,
their supervisor, the live load and the tally's wait are faults.py's ``Workflow``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

import nats
import nats.errors
from faults import Row, Workflow
from google.protobuf.any_pb2 import Any as AnyProto
from greeter_pb2 import Request, Response
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig

from kre_runner.node.envelope import KreNatsMessageV3, decode_v3
from kre_runner.proto.kre_nats_msg_v3_pb2 import MessageType

STREAM = "faults3"
NODE = "node"
CONSUMER = f"v1-{NODE}"  # KRT_VERSION v1
OUTPUT = f"{STREAM}.{NODE}"
DEAD = f"{STREAM}-dead-letter"  # the node's default KRT_DEAD_LETTER_STREAM
UPSTREAMS = ("entrypoint", "nodeA", "nodeB")  # from_node of each input subject, in turn
INPUTS = [f"{STREAM}.{upstream}" for upstream in UPSTREAMS]
ROUTED = {"nodeA": "nodeA"}  # from_node -> the greeting's prefix (custom_handlers); the rest: "default"


def _envelope(request_id: str, upstream: str, name: str) -> bytes:
    payload = AnyProto()
    payload.Pack(Request(name=name))
    return KreNatsMessageV3(request_id=request_id, from_node=upstream, message_type=MessageType.OK,
                            payload=payload).SerializeToString()


class V3Workflow(Workflow):
    """faults.Workflow for one 3.x fan-in node: its stream, variables, inputs and tally."""

    stream, consumer, label = STREAM, CONSUMER, "the 3.x node"

    def __init__(self, urls: list[str], work_dir: Path) -> None:
        super().__init__(urls, work_dir)
        self.upstream: dict[str, str] = {}  # request id -> from_node it was sent with
        self._turn = itertools.count()

    async def open(self) -> V3Workflow:
        async def quiet(exc: Exception) -> None:  # the faults are the point: no tracebacks for them
            pass

        self.nc = await nats.connect(servers=self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                     connect_timeout=2, error_cb=quiet)
        self.js = self.nc.jetstream(timeout=5)
        await self.js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*", f"{OUTPUT}.*"],
                                              retention=RetentionPolicy.LIMITS))
        return self

    def env(self, function: str = "", **overrides: str) -> dict[str, str]:
        env = super().env(KRT_NATS_STREAM=STREAM, KRT_NATS_INPUTS=",".join(INPUTS), KRT_NATS_OUTPUT=OUTPUT,
                          KRT_HANDLER_PATH="fault_handler_v3.py", **overrides)
        del env["KRT_NATS_INPUT"], env["KRT_NATS_ENTRYPOINT_SUBJECT"]  # their presence would mean v2
        return env

    async def send(self, name: str, mark: bool = False) -> str:
        """One 3.x input, on the next upstream's subject in turn; published until stored (one Nats-Msg-Id)."""
        assert self.js is not None
        turn = next(self._turn) % len(UPSTREAMS)
        request_id = str(uuid.uuid4())
        self.upstream[request_id] = UPSTREAMS[turn]
        if mark:
            self.marked.add(request_id)
        data = _envelope(request_id, UPSTREAMS[turn], name)
        deadline = time.monotonic() + 60.0
        while True:
            try:
                ack = await self.js.publish(INPUTS[turn], data, timeout=2, headers={"Nats-Msg-Id": request_id})
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        self.sent[request_id] = ack.seq
        return request_id

    async def _outputs(self) -> list[tuple[bytes, datetime]]:
        """Every envelope on the node's output subject (the stream holds the inputs too)."""
        assert self.js is not None
        sub = await self.js.pull_subscribe(OUTPUT, stream=STREAM, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60))
        found: list[tuple[bytes, datetime]] = []
        try:
            expected = (await sub.consumer_info()).num_pending
            while len(found) < expected:
                try:
                    batch = await sub.fetch(1000, timeout=2)
                except nats.errors.TimeoutError:
                    break
                found += [(m.data, m.metadata.timestamp) for m in batch]
        finally:
            await sub.unsubscribe()
        return found

    async def _count(self, scenario: str) -> tuple[Row, list[datetime]]:
        for attempt in range(10):  # read again if the server hiccups
            try:
                stored = await self._outputs()
                break
            except (nats.errors.Error, asyncio.TimeoutError):
                if attempt == 9:
                    raise
                await asyncio.sleep(1.0)
        outputs: Counter[str] = Counter()
        errors: set[str] = set()
        misrouted: set[str] = set()
        stored_at: list[tuple[str, datetime]] = []
        for data, when in stored:
            envelope = decode_v3(data)
            if envelope.message_type == MessageType.ERROR:
                errors.add(envelope.request_id)
                continue
            outputs[envelope.request_id] += 1
            stored_at.append((envelope.request_id, when))
            response = Response()
            envelope.payload.Unpack(response)
            upstream = self.upstream.get(envelope.request_id, "")
            if response.greeting.split(" ")[0] != ROUTED.get(upstream, "default") or envelope.from_node != NODE:
                misrouted.add(envelope.request_id)
        dead = {int(headers.get("Kre-Sequence", "0")) for _, _, headers in await self._stored(DEAD)}
        seqs = {seq: rid for rid, seq in self.sent.items()}
        dead_ids = {seqs[s] for s in dead if s in seqs}
        answered = set(outputs) | errors | dead_ids
        row = Row(scenario, inputs=len(self.sent), outputs=len(set(outputs) & set(self.sent)),
                  errors=len((errors & set(self.sent)) - set(outputs) - dead_ids), dead=len(dead_ids),
                  lost=sum(1 for rid in self.sent if rid not in answered),
                  duplicated=sum(1 for n in outputs.values() if n > 1))
        row.note = f"{len(misrouted)} misrouted"
        marked = [when for rid, when in stored_at if rid in self.marked] if self.marked else None
        return row, marked if marked is not None else [when for _, when in stored_at]


# The scenarios are faults.py's (replicas_killed, server_restarted), run with V3Workflow.
WHAT = "3.x fan-in node: "
