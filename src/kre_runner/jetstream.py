"""JetStream set-up at start: the stream captures the node's subjects, the durable consumer exists.

Everything that can go wrong here stops the start with one line (:class:`SetupError`) that says
what is wrong and how to fix it, never a traceback: a server without JetStream, an unknown
stream, a stream that does not capture ``KRT_NATS_INPUT``, a push consumer left by the original
runner, a JetStream API error.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, StreamInfo
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from .config import Settings

__all__ = ["SetupError", "prepare", "subject_in"]


class SetupError(RuntimeError):
    """The stream or consumer this node needs is missing or incompatible."""


async def prepare(nc: Client, settings: Settings, logger: logging.Logger) -> int:
    """Check the stream, create or reuse the durable consumer; return the largest message the node may publish."""
    js = nc.jetstream()
    try:
        stream = await _stream_info(js, settings)
        limit = await _publish_limit(nc, js, stream, settings, logger)
        await _ensure_consumer(js, settings, logger)
    except SetupError:
        raise
    except ServiceUnavailableError:
        raise SetupError("JetStream is not enabled on the NATS server (KRT_NATS_SERVER): start nats-server "
                         "with -js (or jetstream {} in its configuration)") from None
    except (NoStreamResponseError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise SetupError("no answer from the JetStream API: is JetStream enabled, and may this user publish "
                         "to $JS.API.>? (check the server's permissions for the node's credentials)") from None
    except APIError as exc:
        raise SetupError(f"JetStream refused the set-up of stream {settings.stream!r} / consumer "
                         f"{settings.consumer_name!r}: {exc.description or exc} (code {exc.err_code})") from None
    return limit


async def _stream_info(js: JetStreamContext, s: Settings) -> StreamInfo:
    try:
        stream = await js.stream_info(s.stream)
    except NotFoundError:
        raise SetupError(f"stream {s.stream!r} does not exist (KRT_NATS_STREAM): create it, "
                         f"e.g. subjects [{s.stream}.*], before starting the node") from None
    subjects = stream.config.subjects or []
    if not subject_in(s.input_subject, subjects):
        raise SetupError(f"stream {s.stream!r} (KRT_NATS_STREAM) does not capture KRT_NATS_INPUT={s.input_subject} "
                         f"(its subjects: {', '.join(subjects) or 'none'}): fix either variable, or add the "
                         f"subject to the stream")
    return stream


async def _publish_limit(nc: Client, js: JetStreamContext, stream: StreamInfo, s: Settings,
                         logger: logging.Logger) -> int:
    """min(server max_payload, the output stream's max_msg_size when set)."""
    limits = [nc.max_payload]
    out_stream: StreamInfo | None = stream
    if not subject_in(s.output_subject, stream.config.subjects or []):
        try:
            out_stream = await js.stream_info(await js.find_stream_name_by_subject(s.output_subject))
        except NotFoundError:
            out_stream = None
            logger.warning("no stream captures KRT_NATS_OUTPUT=%s: outputs will fail until one does",
                           s.output_subject)
    if out_stream is not None and out_stream.config.max_msg_size and out_stream.config.max_msg_size > 0:
        limits.append(out_stream.config.max_msg_size)
    return min(limits)


async def _ensure_consumer(js: JetStreamContext, s: Settings, logger: logging.Logger) -> ConsumerInfo:
    config = ConsumerConfig(
        durable_name=s.consumer_name,
        filter_subject=s.input_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL if s.deliver_policy == "all" else DeliverPolicy.NEW,
        ack_wait=s.ack_wait,
        max_deliver=-1,
        # Each replica bounds itself with KRT_MAX_INFLIGHT; the consumer must not cap the sum.
        max_ack_pending=-1,
        max_waiting=512,
    )
    try:
        existing: ConsumerInfo | None = await js.consumer_info(s.stream, s.consumer_name)
    except NotFoundError:
        existing = None
    if existing is not None and existing.config.deliver_subject:
        raise SetupError(
            f"consumer {s.consumer_name!r} on stream {s.stream!r} is a push consumer (left by the original "
            f"runner?); kre-runner uses a pull consumer of that name. Delete it once its messages are "
            f"processed: nats consumer rm {s.stream} {s.consumer_name}"
        )
    if existing is None:
        info = await js.add_consumer(s.stream, config)
        if s.deliver_policy == "new":
            where = "at new messages (KRT_DELIVER_POLICY=new: messages already in the stream are not processed)"
        else:
            where = "at the first message in the stream (KRT_DELIVER_POLICY=all)"
        logger.info("created durable pull consumer %s on stream %s for %s; it starts %s",
                    s.consumer_name, s.stream, s.input_subject, where)
        return info
    if existing.config.ack_wait != s.ack_wait or existing.config.filter_subject != s.input_subject:
        info = await js.update_consumer(s.stream, config)
    else:
        info = existing
    logger.info("reusing durable pull consumer %s on stream %s for %s: it resumes after the last acked "
                "message (%d waiting, %d unacked)", s.consumer_name, s.stream, s.input_subject,
                existing.num_pending or 0, existing.num_ack_pending or 0)
    return info


def subject_in(subject: str, patterns: list[str]) -> bool:
    """Whether ``subject`` matches one of the stream subject ``patterns`` (``*`` and ``>`` wildcards)."""
    parts = subject.split(".")
    for pattern in patterns:
        pat = pattern.split(".")
        for i, token in enumerate(pat):
            if token == ">":
                if len(parts) > i:
                    return True
                break
            if i >= len(parts) or (token != "*" and token != parts[i]):
                break
        else:
            if len(pat) == len(parts):
                return True
    return False
