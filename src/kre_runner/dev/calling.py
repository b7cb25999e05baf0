"""Calling a workflow as the KRE entrypoint does: an envelope to the first node, the answer on the entrypoint subject.

Used by ``kre-runner call``, the demo and the testing plugin. The answer is received on a core-NATS
subscription, so calling never creates a consumer nor takes a message from the real entrypoint's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message
from nats.aio.client import Client

from ..nats.streams import ENTRYPOINT_NODE
from ..node.envelope import KreNatsMessage, decode, encode, now_iso

__all__ = ["CallError", "call_workflow", "request_envelope"]


class CallError(RuntimeError):
    """The request could not be sent, or no answer came in time; the message says what to check."""


def request_envelope(payload: Message, tracking_id: str | None = None, reply: str | None = None) -> KreNatsMessage:
    """What the entrypoint publishes: a tracking id, a reply id, one ``entrypoint`` tracking entry, ``Any(payload)``."""
    tracking_id = tracking_id or str(uuid.uuid4())
    envelope = KreNatsMessage(tracking_id=tracking_id, reply=reply or tracking_id)
    entry = envelope.tracking.add(node_name=ENTRYPOINT_NODE, start=now_iso())
    entry.end = now_iso()
    if isinstance(payload, AnyProto):
        envelope.payload.CopyFrom(payload)
    else:
        envelope.payload.Pack(payload)
    return envelope


async def call_workflow(nc: Client, input_subject: str, entrypoint_subject: str, requests: Sequence[Message],
                        timeout: float = 10.0, tracking_ids: Sequence[str] | None = None) -> list[KreNatsMessage]:
    """Send ``requests`` to ``input_subject`` and return their answers (in order), each matched by tracking id.

    An answer may be an error envelope (``error`` set); the caller decides what that means.
    ``tracking_ids`` (one per request, else new UUIDs) lets the caller show them before the answers come.
    """
    waiting: dict[str, asyncio.Future[KreNatsMessage]] = {}
    loop = asyncio.get_running_loop()

    async def on_answer(msg: nats.aio.msg.Msg) -> None:
        try:
            envelope = decode(msg.data)
        except ValueError:
            return  # not an envelope: not ours
        future = waiting.get(envelope.tracking_id)
        if future is not None and not future.done():
            future.set_result(envelope)

    sub = await nc.subscribe(entrypoint_subject, cb=on_answer)
    try:
        js = nc.jetstream()
        envelopes = []
        for i, request in enumerate(requests):
            envelope = request_envelope(request, tracking_ids[i] if tracking_ids else None)
            waiting[envelope.tracking_id] = loop.create_future()
            envelopes.append(envelope)
        await nc.flush()  # the subscription is in place before the first request can be answered
        for envelope in envelopes:
            try:
                await js.publish(input_subject, encode(envelope, nc.max_payload), timeout=timeout)
            except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
                raise CallError(f"no stream captures {input_subject}: is the workflow running "
                                f"(kre-runner up), or create the stream (kre-runner stream create)") from None
            except nats.errors.TimeoutError:
                raise CallError(f"JetStream did not confirm the request on {input_subject} within {timeout:g}s") \
                    from None
            except nats.js.errors.APIError as exc:
                raise CallError(f"JetStream refused the request on {input_subject}: {exc}") from None
        try:
            return list(await asyncio.wait_for(asyncio.gather(*waiting.values()), timeout))
        except asyncio.TimeoutError:
            missing = [t for t, f in waiting.items() if not f.done()]
            shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
            raise CallError(f"{len(missing)} of {len(waiting)} request(s) got no answer on {entrypoint_subject} "
                            f"within {timeout:g}s (are the nodes running? a node whose handler returns None answers "
                            f"nothing; kre-runner trace shows where a request is): tracking id {shown}") from None
    finally:
        await sub.unsubscribe()
