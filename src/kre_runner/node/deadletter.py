"""Dead letters: inputs that failed on every delivery, kept until someone acts on them.

When an input runs out of deliveries (``KRT_MAX_DELIVER``; see settlement.py), the node publishes
a copy of it, as delivered, to ``{KRT_DEAD_LETTER_STREAM}.{node}`` with headers saying where it
came from and why it failed; once the copy is stored, an error envelope for its ``tracking_id`` to
the entrypoint; once both are stored the input is terminated. When the dead-letter stream refuses
the copy (full, missing), the node holds the input, unacked and kept alive, and publishes the copy
again until it is stored; /readyz fails meanwhile, saying why. The dead-letter stream has *limits* retention (not
the workflow stream's interest retention, under which a subject nobody consumes keeps nothing), so
the copies stay until an operator lists, replays or purges them with ``kre-runner dead-letter``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from ..config import Settings
from .envelope import EnvelopeError
from .outcome import Outcomes
from .publisher import PubAckPublisher
from .settlement import DEAD_LETTER_COPY, Job, parse_ack_subject

__all__ = ["HEADERS", "DeadLetters", "ensure_dead_letter_stream"]

# Headers of a dead letter: what an operator needs to find the input's origin and the failure.
HEADERS = ("Kre-Subject", "Kre-Stream", "Kre-Sequence", "Kre-Deliveries", "Kre-Node", "Kre-Error", "Kre-Time")


class DeadLetters:
    """Sends a node's dead letters (settlement.py calls :meth:`send` with the job's reference held)."""

    def __init__(self, settings: Settings, publisher: PubAckPublisher, outcomes: Outcomes) -> None:
        self._s = settings
        self._publisher = publisher
        self._outcomes = outcomes

    async def send(self, job: Job, reason: str) -> None:
        """Publish the copy (``job.dead_letter`` is DEAD_LETTER_COPY) or else the error envelope, holding one
        reference of ``job`` until stored. Settlement sends the envelope only once the copy is stored."""
        stream, seq, delivered = parse_ack_subject(job.ack_subject)
        if job.dead_letter != DEAD_LETTER_COPY:
            await self._tell(job, reason, delivered)
            return
        headers = {
            "Kre-Subject": self._s.input_subject,
            "Kre-Stream": stream,
            "Kre-Sequence": str(seq),
            "Kre-Deliveries": str(delivered),
            "Kre-Node": self._s.node_name,
            "Kre-Error": reason.replace("\r", " ").replace("\n", " ")[:2000],
            "Kre-Time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        job.refs += 1
        await self._publisher.publish(self._s.dead_letter_subject, job.data, f"{job.msg_id}:dead-letter", job, headers)

    async def _tell(self, job: Job, reason: str, delivered: int) -> None:
        """The error envelope for the entrypoint: the input is in the dead letters now."""
        envelope = job.envelope
        if envelope is None:
            try:
                envelope = self._outcomes.decode(job.data)
            except EnvelopeError:
                envelope = self._outcomes.envelope_type()
        error = self._outcomes.error(job, envelope, f"dead-lettered after {delivered} deliveries: {reason}",
                                     self._outcomes.now())
        if error is not None:
            job.refs += 1
            await self._publisher.publish(error[0], error[1], job.msg_id, job)


async def ensure_dead_letter_stream(js: JetStreamContext, settings: Settings, logger: logging.Logger) -> None:
    """Create the dead-letter stream when it is missing (a warning, not a failure, if that is not allowed)."""
    name = settings.dead_letter_stream
    try:
        await js.stream_info(name)
        return
    except NotFoundError:
        pass
    try:
        await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], retention=RetentionPolicy.LIMITS,
                                         storage=StorageType.FILE))
        logger.info("created dead-letter stream %s (subjects %s.>)", name, name)
    except Exception as exc:
        logger.warning("dead-letter stream %s is missing and cannot be created (%s): an input that runs out of "
                       "deliveries will be held by the node, unacked, and its copy retried until the stream exists "
                       "(/readyz says so meanwhile); create it, or set KRT_DEAD_LETTER_STREAM to one that exists",
                       name, exc)
