"""A consumer leader change in a cluster: pull requests die with the old leader, so the node asks again.

Unit tests on a stand-in connection (no server): what the consumer writes when JetStream announces
a new leader, and when a reconnect finds the consumer leaderless. ``tests/test_fault_table.py``
kills a real cluster's leader.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from kre_helpers import STREAM, node_env
from standin import StandIn, parse_writes

from kre_runner.config import Settings
from kre_runner.context import Context
from kre_runner.handler import load_user_code
from kre_runner.node.consumer import Consumer

PULL = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.v1-greeter"
ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{STREAM}.v1-greeter"


async def _consumer(nc: StandIn) -> Consumer:
    s = Settings.from_env(node_env("nats://127.0.0.1:4222", "fuzzed.py"))
    log = logging.getLogger("kre_runner.leader")
    consumer = Consumer(s, load_user_code(s.base_path, s.handler_path), nc, Context(base_path=s.base_path, logger=log),
                        log)
    await consumer.attach()
    await consumer.link.watch_leader()
    consumer.link.pulling = True
    return consumer


def _pulls(nc: StandIn) -> int:
    nc.take()
    return sum(1 for pub in parse_writes(nc.written) if pub.subject == PULL)


async def test_a_new_consumer_leader_renews_the_pull_requests_at_once():
    nc = StandIn()
    consumer = await _consumer(nc)
    await consumer.link.pull()
    assert _pulls(nc) == 1
    await consumer.link.pull()
    assert _pulls(nc) == 0  # the credit is out: nothing more to ask for
    sid = next(sid for sid, sub in nc._subs.items() if sub.subject == ADVISORY)
    advisory = b'{"type":"io.nats.jetstream.advisory.v1.consumer_leader_elected","leader":"n2"}'
    await nc._ps.parse(b"MSG %s %d %d\r\n%s\r\n" % (ADVISORY.encode(), sid, len(advisory), advisory))
    assert _pulls(nc) == 1  # the old request died with the old leader: asked again


async def test_after_a_reconnect_the_node_pulls_once_the_consumer_has_a_leader(monkeypatch):
    nc = StandIn()
    consumer = await _consumer(nc)
    answers = [TimeoutError("no leader"), SimpleNamespace(cluster=SimpleNamespace(leader=None)),
               SimpleNamespace(cluster=SimpleNamespace(leader="n3"))]

    class JetStream:
        async def consumer_info(self, stream, name):
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    monkeypatch.setattr(nc, "jetstream", lambda **_: JetStream())
    monkeypatch.setattr("kre_runner.node.pulling._LEADERLESS_POLL", 0.01)
    await consumer.on_reconnect()
    await asyncio.sleep(0)
    assert _pulls(nc) == 0  # not into the void while the consumer is leaderless
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not answers:
            break
    await asyncio.sleep(0.01)
    assert answers == [] and _pulls(nc) == 1
