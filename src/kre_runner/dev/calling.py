"""Calling a workflow as the KRE entrypoint does: an envelope to the first node, the answer on the entrypoint subject.

Used by ``kre-runner call``, the demo and the testing plugin. The answer is received on a core-NATS
subscription, so calling never creates a consumer nor takes a message from the real entrypoint's.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message
from nats.aio.client import Client
from nats.js import JetStreamContext

from ..nats.streams import ENTRYPOINT_NODE
from ..node.envelope import KreNatsMessage, KreNatsMessageV3, decode, encode, now_iso
from ..proto.kre_nats_msg_v3_pb2 import MessageType

__all__ = ["CallError", "CallV3", "call_workflow", "call_workflow_v3", "request_envelope", "request_envelope_v3"]


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
        envelopes = []
        for i, request in enumerate(requests):
            envelope = request_envelope(request, tracking_ids[i] if tracking_ids else None)
            waiting[envelope.tracking_id] = loop.create_future()
            envelopes.append(envelope)
        return await _publish_and_wait(
            nc, input_subject, envelopes, waiting, timeout, entrypoint_subject, "tracking id",
            "are the nodes running? a node whose handler returns None answers nothing; kre-runner trace shows "
            "where a request is")
    finally:
        await sub.unsubscribe()


def request_envelope_v3(payload: Message, request_id: str | None = None) -> KreNatsMessageV3:
    """What the 3.x entrypoint publishes: ``request_id``, ``from_node = "entrypoint"``, ``OK``, ``Any(payload)``."""
    envelope = KreNatsMessageV3(request_id=request_id or str(uuid.uuid4()), from_node=ENTRYPOINT_NODE,
                                message_type=MessageType.OK)
    if isinstance(payload, AnyProto):
        envelope.payload.CopyFrom(payload)
    else:
        envelope.payload.Pack(payload)
    return envelope


@dataclass
class CallV3:
    """A 3.x call's result: the first exitpoint envelope per request (in order), and, when asked, every envelope
    the nodes published for those requests as ``(subject, envelope)`` in arrival order."""

    answers: list[KreNatsMessageV3]
    seen: list[tuple[str, KreNatsMessageV3]] = field(default_factory=list)


async def call_workflow_v3(nc: Client, stream: str, requests: Sequence[Message], timeout: float = 10.0,
                           request_ids: Sequence[str] | None = None, every: bool = False,
                           settle: float = 0.5) -> CallV3:
    """Publish ``requests`` on ``{stream}.entrypoint`` as the 3.x entrypoint does; wait for each one's first
    envelope on ``{stream}.exitpoint`` (matched by ``request_id``).

    ``every``: also collect every envelope on ``{stream}.>`` for these requests, until ``settle`` seconds pass
    without a new one after the last answer (branches that do not lead to the exitpoint finish meanwhile).
    """
    from ..node.envelope import decode_v3

    entry, answer_subject = f"{stream}.{ENTRYPOINT_NODE}", f"{stream}.exitpoint"
    waiting: dict[str, asyncio.Future[KreNatsMessageV3]] = {}
    seen: list[tuple[str, KreNatsMessageV3]] = []
    last_seen = [0.0]
    loop = asyncio.get_running_loop()

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        if msg.subject == entry:
            return  # our own requests
        try:
            envelope = decode_v3(msg.data)
        except ValueError:
            return  # not an envelope: not ours
        if envelope.request_id not in waiting:
            return
        if every:
            seen.append((msg.subject, envelope))
            last_seen[0] = loop.time()
        future = waiting[envelope.request_id]
        if msg.subject == answer_subject and not future.done():
            future.set_result(envelope)

    sub = await nc.subscribe(f"{stream}.>" if every else answer_subject, cb=on_message)
    try:
        envelopes = []
        for i, request in enumerate(requests):
            envelope = request_envelope_v3(request, request_ids[i] if request_ids else None)
            waiting[envelope.request_id] = loop.create_future()
            envelopes.append(envelope)
        answers = await _publish_and_wait(
            nc, entry, envelopes, waiting, timeout, answer_subject, "request id",
            "are the nodes running? does the exitpoint node send_output for every request?")
        if every:
            quiet = loop.time() - last_seen[0]
            while quiet < settle:  # each wait ends when the last envelope is `settle` old
                await asyncio.sleep(settle - quiet)
                quiet = loop.time() - last_seen[0]
        return CallV3(answers, seen)
    finally:
        await sub.unsubscribe()


async def _publish_and_wait(nc: Client, subject: str, envelopes: Sequence[Any], waiting: dict[str, Any],
                            timeout: float, answers_on: str, id_name: str, hint: str) -> list[Any]:
    """Publish ``envelopes`` to ``subject`` (the answers' subscription is in place first) and return their
    answers, in order, as ``waiting``'s futures resolve; a request with none in ``timeout``: one CallError."""
    await nc.flush()  # the subscription is in place before the first request can be answered
    js = nc.jetstream()
    for envelope in envelopes:
        await _publish(js, subject, encode(envelope, nc.max_payload), timeout)
    try:
        return list(await asyncio.wait_for(asyncio.gather(*waiting.values()), timeout))
    except asyncio.TimeoutError:
        missing = [key for key, future in waiting.items() if not future.done()]
        shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
        raise CallError(f"{len(missing)} of {len(waiting)} request(s) got no answer on {answers_on} within "
                        f"{timeout:g}s ({hint}): {id_name} {shown}") from None


async def _publish(js: JetStreamContext, subject: str, data: bytes, timeout: float) -> None:
    try:
        await js.publish(subject, data, timeout=timeout)
    except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
        raise CallError(f"no stream captures {subject}: is the workflow running "
                        f"(kre-runner up), or create the stream (kre-runner stream create)") from None
    except nats.errors.TimeoutError:
        raise CallError(f"JetStream did not confirm the request on {subject} within {timeout:g}s") from None
    except nats.js.errors.APIError as exc:
        raise CallError(f"JetStream refused the request on {subject}: {exc}") from None
