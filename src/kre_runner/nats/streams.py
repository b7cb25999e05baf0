"""The workflow stream as the KRE K8s manager lays it out, for ``up``, ``stream create``, ``check`` and tests.

The manager names a workflow's stream ``{runtime}-{version}-{workflow}``, gives it the subjects
``{stream}.*`` with interest retention (a message no consumer wants is removed at once), gives each
node the input ``{stream}.{node}`` and the entrypoint ``{stream}.entrypoint``.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError

__all__ = ["ENTRYPOINT_NODE", "StreamLayout", "ensure_key_value", "ensure_object_store", "ensure_stream",
           "stream_name", "subject_in"]

ENTRYPOINT_NODE = "entrypoint"


def stream_name(runtime: str, version: str, workflow: str) -> str:
    return f"{runtime}-{version}-{workflow}"


@dataclass(frozen=True)
class StreamLayout:
    """Names the manager derives from a stream name."""

    stream: str

    @property
    def subjects(self) -> list[str]:
        return [f"{self.stream}.*"]

    @property
    def entrypoint(self) -> str:
        return f"{self.stream}.{ENTRYPOINT_NODE}"

    def node_subject(self, node: str) -> str:
        return f"{self.stream}.{node}"


async def ensure_stream(js: JetStreamContext, stream: str, subjects: list[str] | None = None) -> bool:
    """Create ``stream`` as the manager does unless it exists; True when it was created.

    ``subjects`` default to ``{stream}.*`` (v2); the 3.x manager adds ``{stream}.{node}.*`` for channels.
    An existing stream is left as it is (its messages and consumers are someone's work).
    """
    try:
        await js.stream_info(stream)
        return False
    except NotFoundError:
        pass
    layout = StreamLayout(stream)
    await js.add_stream(StreamConfig(name=stream, subjects=subjects or layout.subjects,
                                     retention=RetentionPolicy.INTEREST))
    return True


async def ensure_key_value(js: JetStreamContext, bucket: str) -> bool:
    """Create the key-value bucket unless it exists (its values are someone's); True when it was created."""
    try:
        await js.key_value(bucket)
        return False
    except BucketNotFoundError:
        pass
    await js.create_key_value(KeyValueConfig(bucket=bucket, storage=StorageType.FILE))
    return True


async def ensure_object_store(js: JetStreamContext, bucket: str) -> bool:
    """Create the object store bucket (file storage, as the manager does) unless it exists; True when created."""
    try:
        await js.object_store(bucket)
        return False
    except NotFoundError:  # BucketNotFoundError, or NotFoundError from nats-py's stream lookup
        pass
    await js.create_object_store(bucket, ObjectStoreConfig(bucket=bucket, storage=StorageType.FILE))
    return True


def subject_in(subject: str, patterns: list[str]) -> bool:
    """Whether a stream with subject ``patterns`` (``*`` and ``>`` wildcards) captures ``subject``."""
    tokens = subject.split(".")
    for pattern in patterns:
        parts = pattern.split(".")
        for i, part in enumerate(parts):
            if part == ">":
                if len(tokens) > i:
                    return True
                break
            if i >= len(tokens) or (part != "*" and part != tokens[i]):
                break
        else:
            if len(parts) == len(tokens):
                return True
    return False
