"""Input envelopes as the KRE entrypoint writes them, stamped with the producer's clock.

The send time rides in the envelope's ``reply`` field (the entrypoint's request id, which every
node copies through), so the collector reads it back from the output without any help from the
node. ``time.monotonic_ns`` is one clock for every process on Linux.
"""

from __future__ import annotations

import time
import uuid

from google.protobuf.any_pb2 import Any as AnyProto
from greeter_pb2 import Request

from kre_runner.node.envelope import KreNatsMessage, now_iso

__all__ = ["make_request", "sent_ns"]

_PAYLOAD = AnyProto()
_PAYLOAD.Pack(Request(name="bench-user"))


def make_request() -> bytes:
    """One serialized ``KreNatsMessage{tracking_id, reply=<send time>, tracking[entrypoint], payload}``."""
    envelope = KreNatsMessage(tracking_id=str(uuid.uuid4()), reply=str(time.monotonic_ns()))
    entry = envelope.tracking.add()
    entry.node_name = "entrypoint"
    entry.start = entry.end = now_iso()
    envelope.payload.CopyFrom(_PAYLOAD)
    return envelope.SerializeToString()


def sent_ns(data: bytes) -> int:
    """The producer's send time carried by an output envelope."""
    envelope = KreNatsMessage()
    envelope.ParseFromString(data)
    return int(envelope.reply)
