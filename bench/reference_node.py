"""The reference: the node's job written directly on nats-py, as tightly as we know how.

Job per message: decode the envelope, unpack ``Any(Request)``, trivial handler, pack the
``Response``, append a tracking entry, publish to the output, and ack the input only once the
output's PubAck says it is stored.

Design (the fastest found on this machine):
* continuous pull: pull requests are sent ahead to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``
  with the reply set to one inbox subscription whose callback does the work; credit (requested +
  delivered-but-unacked) never exceeds ``--max-inflight``;
* outputs are plain ``nc.publish(subject, data, reply=prefix + counter)``; one wildcard
  subscription ``prefix.*`` receives every PubAck and acks the matching input (``+ACK``).
It does not set ``Nats-Msg-Id``, write metrics, or handle redeliveries, timeouts or shutdown
grace: that is what kre-runner adds, and what the comparison prices.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import nats
from greeter_pb2 import Request, Response
from nats.aio.client import Client
from nats.aio.msg import Msg

from kre_runner.node.envelope import KreNatsMessage, TrackingClock

_ACK = b"+ACK"
_NAK = b"-NAK"


def handler(request: Request) -> Response:
    return Response(greeting="Hello, " + request.name + "!")


class ReferenceNode:
    """Credit-bounded continuous pull → handle → publish → ack after PubAck."""

    def __init__(self, nc: Client, stream: str, consumer: str, output: str, node: str, max_inflight: int) -> None:
        self._nc = nc
        self._output = output
        self._node = node
        self._max = max_inflight
        self._batch = max(1, max_inflight // 4)
        self._pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._counter = 0
        self._requested = 0  # asked for, not yet delivered
        self._busy = 0  # delivered, not yet acked
        self._waiting: dict[str, str] = {}  # PubAck token -> the input's ack subject
        self._clock = TrackingClock()

    async def start(self) -> None:
        await self._nc.subscribe(self._prefix + "*", cb=self._on_puback, pending_msgs_limit=-1,
                                 pending_bytes_limit=-1)
        await self._nc.subscribe(self._inbox, cb=self._on_input, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await self._pull()

    async def _pull(self) -> None:
        want = self._max - self._busy - self._requested
        if want >= self._batch:
            self._requested += want
            await self._nc.publish(self._pull_subject, b'{"batch":%d,"expires":30000000000}' % want,
                                   reply=self._inbox)

    async def _on_input(self, msg: Msg) -> None:
        if not msg.reply:  # a status: the request expired or was cut short; take back its credit
            pending = (msg.headers or {}).get("Nats-Pending-Messages")
            self._requested = max(0, self._requested - int(pending)) if pending else 0
            await self._pull()
            return
        self._requested -= 1
        self._busy += 1
        envelope = KreNatsMessage()
        envelope.ParseFromString(msg.data)
        now = self._clock.now
        start = now()[1]
        request = Request()
        envelope.payload.Unpack(request)
        envelope.payload.Pack(handler(request))
        entry = envelope.tracking.add()
        entry.node_name = self._node
        entry.start = start
        entry.end = now()[1]
        self._counter += 1
        token = str(self._counter)
        self._waiting[token] = msg.reply
        await self._nc.publish(self._output, envelope.SerializeToString(), reply=self._prefix + token)

    async def _on_puback(self, msg: Msg) -> None:
        ack_subject = self._waiting.pop(msg.subject[self._cut:], None)
        if ack_subject is None:
            return
        await self._nc.publish(ack_subject, _NAK if not msg.data or b'"error"' in msg.data else _ACK)
        self._busy -= 1
        await self._pull()


async def serve(args: argparse.Namespace) -> None:
    nc = await nats.connect(args.url, skip_subject_validation=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node = ReferenceNode(nc, args.stream, args.consumer, args.output, args.node, args.max_inflight)
    await node.start()
    await stop.wait()
    await nc.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description="raw nats-py reference node")
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--consumer", required=True, help="durable pull consumer (created by the caller)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--node", default="node")
    parser.add_argument("--max-inflight", type=int, default=256)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
