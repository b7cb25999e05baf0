"""JetStream set-up: the stream captures the node's subjects, the durable consumer exists and fits.

At start (:func:`prepare`), everything that can go wrong stops the start with one line
(:class:`SetupError`) that says what is wrong and how to fix it, never a traceback: a server
without JetStream, an unknown stream, a stream that does not capture ``KRT_NATS_INPUT``, a
consumer whose fixed settings differ, a JetStream API error. Settings that can be updated are,
with one log line per change. The original runner's push consumer of the same name is taken over
without a moment in which the input has no consumer (:func:`_take_over_push_consumer`).

While running, :func:`recreate` brings back a consumer deleted under the node (an operator's
mistake, a redeployed stream).
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, RetentionPolicy, StreamInfo
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ..config import Settings
from ..errors import SetupError
from ..nats.streams import subject_in
from .settlement import DEAD_LETTER_DELIVERIES, nak_delay

__all__ = ["SetupError", "consumer_config", "prepare", "recreate"]

# Deliveries beyond KRT_MAX_DELIVER on the consumer (see settlement.py).
_DEAD_LETTER_DELIVERIES = DEAD_LETTER_DELIVERIES


async def prepare(nc: Client, settings: Settings, logger: logging.Logger) -> int:
    """Check the stream, create or reuse the durable consumer; return the largest message the node may publish."""
    from .deadletter import ensure_dead_letter_stream  # deadletter.py builds on the modules that build on this one

    js = nc.jetstream(timeout=settings.js_request_timeout)
    try:
        _check_server_version(nc, settings)
        stream = await _stream_info(js, settings)
        limit = await _publish_limit(nc, js, stream, settings, logger)
        await _ensure_consumer(js, settings, logger)
        await ensure_dead_letter_stream(js, settings, logger)
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
    if s.generation == "v3":
        # The 3.x manager's stream captures every input, the output and its channels ({output}.{channel}).
        missing = [subject for subject in s.input_subjects if not subject_in(subject, subjects)]
        uncaptured = [name for name, subject in (("KRT_NATS_OUTPUT", s.output_subject),
                                                 ("channels", f"{s.output_subject}.*"))
                      if not subject_in(subject, subjects)]
        if missing or uncaptured:
            what = "; ".join(
                ([f"KRT_NATS_INPUTS subject(s) {', '.join(missing)}"] if missing else [])
                + [f"{name} ({s.output_subject if name == 'KRT_NATS_OUTPUT' else s.output_subject + '.*'})"
                   for name in uncaptured])
            raise SetupError(f"stream {s.stream!r} (KRT_NATS_STREAM) does not capture {what} (its subjects: "
                             f"{', '.join(subjects) or 'none'}): fix the variables, or add the subjects to the stream "
                             f"(as the 3.x manager does: {s.stream}.* and {s.stream}.*.*)")
        return stream
    if not subject_in(s.input_subject, subjects):
        raise SetupError(f"stream {s.stream!r} (KRT_NATS_STREAM) does not capture KRT_NATS_INPUT={s.input_subject} "
                         f"(its subjects: {', '.join(subjects) or 'none'}): fix either variable, or add the "
                         f"subject to the stream")
    return stream


# A consumer over several subjects (filter_subjects) needs this nats-server.
MIN_SERVER_FOR_INPUTS = (2, 10, 0)


def _check_server_version(nc: Client, s: Settings) -> None:
    """Several inputs share one consumer through ``filter_subjects``: refuse, in one line, a server without it."""
    if len(s.input_subjects) < 2:
        return
    version = str(nc._server_info.get("version", ""))  # the INFO the server sent on connect
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split("-")[0].split(".")[:3])
    if version and parts < MIN_SERVER_FOR_INPUTS:
        raise SetupError(f"nats-server {version} cannot give one consumer several subjects (KRT_NATS_INPUTS has "
                         f"{len(s.input_subjects)}): it needs nats-server 2.10.0 or later (filter_subjects); upgrade "
                         f"the server")


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
    if out_stream is not None:
        # Outputs are deduplicated by Nats-Msg-Id only inside the stream's duplicate window; an input's
        # output may be published again until its last handler run: (max deliver - 1) ack waits and nak delays.
        horizon = s.ack_wait * (s.max_deliver - 1) + sum(nak_delay(d) for d in range(1, s.max_deliver))
        window = out_stream.config.duplicate_window or 120.0
        if window < horizon:
            # A warning where even two ack waits (a crash, then a second delivery) outlast the window;
            # the full horizon (every delivery timing out) is worth an INFO line on every start.
            level = logging.WARNING if window < 2 * s.ack_wait else logging.INFO
            logger.log(level, "the duplicate window of stream %s (%gs) is shorter than an input's redelivery "
                       "horizon (up to %gs: KRT_ACK_WAIT × (KRT_MAX_DELIVER - 1) + nak delays): an output published "
                       "again after that is stored twice; widen the stream's duplicate_window or lower KRT_ACK_WAIT",
                       out_stream.config.name, window, horizon)
    return min(limits)


def consumer_config(s: Settings, *, start_seq: int | None = None) -> ConsumerConfig:
    """The durable pull consumer every replica shares; ``start_seq``: where a new one starts instead of the policy."""
    if start_seq is not None:
        deliver, opt_start = DeliverPolicy.BY_START_SEQUENCE, start_seq
    else:
        deliver, opt_start = (DeliverPolicy.ALL if s.deliver_policy == "all" else DeliverPolicy.NEW), None
    several = len(s.input_subjects) > 1  # one input: filter_subject, which any server takes
    return ConsumerConfig(
        durable_name=s.consumer_name,
        filter_subject=None if several else s.input_subjects[0],
        filter_subjects=list(s.input_subjects) if several else None,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=deliver,
        opt_start_seq=opt_start,
        ack_wait=s.ack_wait,
        max_deliver=s.max_deliver + _DEAD_LETTER_DELIVERIES,
        # Each replica bounds itself with KRT_MAX_INFLIGHT; the consumer must not cap the sum (unless
        # KRT_NATS_MAX_ACK_PENDING says so).
        max_ack_pending=s.max_ack_pending,
        max_waiting=512,
    )


async def _ensure_consumer(js: JetStreamContext, s: Settings, logger: logging.Logger) -> ConsumerInfo:
    config = consumer_config(s)
    existing = await _consumer_info(js, s.stream, s.consumer_name)
    if s.generation == "v3":
        existing = await _take_over_v3_push_consumers(js, s, existing, logger) or existing
    if existing is None:
        # A take-over from the original's push consumer interrupted between its steps: finish it.
        holder = await _consumer_info(js, s.stream, _migrating_name(s))
        if holder is not None:
            return await _finish_take_over(js, s, holder, logger)
    if existing is not None and existing.config.deliver_subject:
        if not s.migrate_push_consumer:
            raise SetupError(
                f"consumer {s.consumer_name!r} on stream {s.stream!r} is a push consumer (left by the original "
                f"runner?) and KRT_MIGRATE_PUSH_CONSUMER=false: delete it once its messages are processed "
                f"(nats consumer rm {s.stream} {s.consumer_name}), or set KRT_MIGRATE_PUSH_CONSUMER=true to take it "
                f"over without a gap")
        return await _take_over_push_consumer(js, s, existing, logger)
    if existing is None:
        info = await js.add_consumer(s.stream, config)
        if s.deliver_policy == "new":
            where = "at new messages (KRT_DELIVER_POLICY=new: messages already in the stream are not processed)"
        else:
            where = "at the first message in the stream (KRT_DELIVER_POLICY=all)"
        logger.info("created durable pull consumer %s on stream %s for %s; it starts %s",
                    s.consumer_name, s.stream, s.input_subject, where)
        return info
    info = await _reconcile(js, s, existing, logger)
    logger.info("reusing durable pull consumer %s on stream %s for %s: it resumes after the last acked "
                "message (%d waiting, %d unacked)", s.consumer_name, s.stream, s.input_subject,
                existing.num_pending or 0, existing.num_ack_pending or 0)
    return info


async def _reconcile(js: JetStreamContext, s: Settings, existing: ConsumerInfo, logger: logging.Logger) -> ConsumerInfo:
    """Compare every field the node sets: update what JetStream lets us, refuse what it does not."""
    want, have = consumer_config(s), existing.config
    fixed = {"ack_policy": (have.ack_policy, want.ack_policy)}
    differ = {name: pair for name, pair in fixed.items() if _norm(pair[0]) != _norm(pair[1])}
    if differ:
        what = ", ".join(f"{name} is {_norm(old)!r}, the node needs {_norm(new)!r}"
                         for name, (old, new) in differ.items())
        raise SetupError(f"consumer {s.consumer_name!r} on stream {s.stream!r} cannot be used as it is ({what}): "
                         f"delete it once its messages are processed (nats consumer rm {s.stream} {s.consumer_name}) "
                         f"and start the node again")
    updatable = {
        "filter_subject": (_filters(have), _filters(want), "KRT_NATS_INPUTS" if s.generation == "v3"
                           else "KRT_NATS_INPUT"),
        "ack_wait": (have.ack_wait, want.ack_wait, "KRT_ACK_WAIT"),
        "max_deliver": (have.max_deliver, want.max_deliver, f"KRT_MAX_DELIVER + {_DEAD_LETTER_DELIVERIES}"),
        "max_ack_pending": (have.max_ack_pending, want.max_ack_pending,
                            "KRT_NATS_MAX_ACK_PENDING; -1: unbounded, replicas bound themselves"),
    }
    changes = {name: triple for name, triple in updatable.items() if _norm(triple[0]) != _norm(triple[1])}
    if want.max_waiting != have.max_waiting:
        logger.info("consumer %s keeps max_waiting=%s (the node asks for %s; JetStream cannot change it)",
                    s.consumer_name, have.max_waiting, want.max_waiting)
    if s.deliver_policy == "all" and _norm(have.deliver_policy) == "new":
        logger.info("KRT_DELIVER_POLICY=all does not apply: consumer %s exists and resumes where it was",
                    s.consumer_name)
    if not changes:
        return existing
    # Keep what JetStream fixed at creation (deliver policy, start, max_waiting); change the rest.
    want.deliver_policy, want.opt_start_seq = have.deliver_policy, have.opt_start_seq
    want.opt_start_time, want.max_waiting = have.opt_start_time, have.max_waiting
    info = await js.add_consumer(s.stream, want)  # an existing durable: JetStream updates it
    for name, (old, new, why) in changes.items():
        logger.info("updated consumer %s: %s %s -> %s (%s)", s.consumer_name, name, old, new, why)
    return info


def _filters(config: ConsumerConfig) -> tuple[str, ...]:
    """A consumer's subjects, whether in ``filter_subject`` or ``filter_subjects``."""
    return tuple(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


def _norm(value: object) -> object:
    return getattr(value, "value", value)


def _migrating_name(s: Settings) -> str:
    return f"{s.consumer_name}-migrating"


async def _take_over_push_consumer(js: JetStreamContext, s: Settings, push: ConsumerInfo,
                                   logger: logging.Logger) -> ConsumerInfo:
    """Replace the original's push consumer by ours without a moment in which the input has no consumer.

    Under interest retention, a message no consumer wants is removed at once: deleting the push
    consumer first would drop every message it had not acked yet. So a stand-in pull consumer that
    starts right after the push consumer's ack floor holds those messages while the push consumer is
    deleted and ours is created at the same point; then the stand-in goes.
    """
    start = (push.ack_floor.stream_seq if push.ack_floor else 0) + 1
    holder = ConsumerConfig(durable_name=_migrating_name(s), filter_subject=s.input_subject,
                            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=start, inactive_threshold=None)
    logger.warning("consumer %s on stream %s is the original runner's push consumer (ack floor: stream seq %d): "
                   "taking it over from seq %d without a gap (KRT_MIGRATE_PUSH_CONSUMER=true)",
                   s.consumer_name, s.stream, start - 1, start)
    holder_info = await js.add_consumer(s.stream, holder)
    await js.delete_consumer(s.stream, s.consumer_name)
    logger.info("deleted push consumer %s (stand-in %s holds the messages from seq %d)", s.consumer_name,
                holder.durable_name, start)
    return await _finish_take_over(js, s, holder_info, logger)


def original_v3_consumer_names(s: Settings) -> list[str]:
    """The kre-py 3.x runner's push consumers, one per input: ``{subject with . -> -}-{node}``."""
    return [f"{subject.replace('.', '-')}-{s.node_name}" for subject in s.input_subjects]


async def _take_over_v3_push_consumers(js: JetStreamContext, s: Settings, existing: ConsumerInfo | None,
                                       logger: logging.Logger) -> ConsumerInfo | None:
    """Replace the 3.x original's push consumers (one per input) by the node's one pull consumer, without a gap.

    Their names differ from ours, so ours is created first, from the lowest of their ack floors, and
    theirs are deleted after: under interest retention a message is kept while any consumer still
    wants it. Messages some push consumer had acked past that floor were removed by the stream when
    every consumer had acked them; what is left is handled, outputs deduplicated by ``Nats-Msg-Id``.
    """
    found = [info for name in original_v3_consumer_names(s)
             if (info := await _consumer_info(js, s.stream, name)) is not None and info.config.deliver_subject]
    if not found:
        return None
    names = ", ".join(info.name for info in found)
    if not s.migrate_push_consumer:
        raise SetupError(f"the original 3.x runner's push consumer(s) {names} on stream {s.stream!r} exist and "
                         f"KRT_MIGRATE_PUSH_CONSUMER=false: delete them once their messages are processed (nats "
                         f"consumer rm {s.stream} NAME), or set KRT_MIGRATE_PUSH_CONSUMER=true to take them over "
                         f"without a gap")
    info = existing
    if existing is None:
        start = min((c.ack_floor.stream_seq if c.ack_floor else 0) for c in found) + 1
        logger.warning("the original 3.x runner's push consumer(s) %s on stream %s: taking them over from seq %d "
                       "without a gap (KRT_MIGRATE_PUSH_CONSUMER=true)", names, s.stream, start)
        info = await js.add_consumer(s.stream, consumer_config(s, start_seq=start))
    for consumer in found:  # ours exists now (or did: an interrupted take-over): theirs can go
        await js.delete_consumer(s.stream, consumer.name)
    logger.info("created durable pull consumer %s on stream %s and deleted push consumer(s) %s: take-over done",
                s.consumer_name, s.stream, names)
    return info


async def _finish_take_over(js: JetStreamContext, s: Settings, holder: ConsumerInfo,
                            logger: logging.Logger) -> ConsumerInfo:
    start = holder.config.opt_start_seq or 1
    info = await js.add_consumer(s.stream, consumer_config(s, start_seq=start))
    await js.delete_consumer(s.stream, holder.name)
    logger.info("created durable pull consumer %s on stream %s from seq %d and removed the stand-in: take-over "
                "done (to roll back, see the README's migration section)", s.consumer_name, s.stream, start)
    return info


async def recreate(js: JetStreamContext, s: Settings, logger: logging.Logger, start_seq: int | None) -> bool:
    """Bring back a consumer deleted under the node; False while its stream is missing (try again later).

    It starts after the last ack floor the node saw (``start_seq``) when the stream is the same, else
    at the stream's first message: a stream deleted and created again holds only new messages.
    """
    try:
        stream = await js.stream_info(s.stream)
    except NotFoundError:
        return False
    if start_seq is not None and start_seq > stream.state.last_seq + 1:
        start_seq = None  # not the stream we knew (created again, or purged): take all it has
    config = consumer_config(s, start_seq=start_seq)
    if start_seq is None:
        config.deliver_policy = DeliverPolicy.ALL
    if stream.config.retention == RetentionPolicy.INTEREST and start_seq is not None:
        logger.info("stream %s has interest retention: messages published while consumer %s was missing are gone",
                    s.stream, s.consumer_name)
    try:
        await js.add_consumer(s.stream, config)
    except APIError as exc:
        if await _consumer_info(js, s.stream, s.consumer_name) is None:
            raise
        logger.info("consumer %s was recreated by another replica (%s)", s.consumer_name, exc.description or exc)
        return True
    logger.warning("recreated durable pull consumer %s on stream %s, starting at %s", s.consumer_name, s.stream,
                   f"stream seq {start_seq}" if start_seq is not None else "its first message")
    return True


async def _consumer_info(js: JetStreamContext, stream: str, name: str) -> ConsumerInfo | None:
    try:
        return await js.consumer_info(stream, name)
    except NotFoundError:
        return None
