"""Every delivered input settles exactly once, whatever fails between delivery and settlement.

One test per failure point, for each way a handler runs (inline sync, sync in threads, async), each
asserting the input's fate on a real nats-server: the consumer's ack-pending and redelivery counts,
and what reached which subject.
"""

from __future__ import annotations

import asyncio
import sys
import time

import nats
import pytest
from kre_helpers import (
    STREAM,
    Collector,
    greeting,
    node_env,
    request_envelope,
    running_node,
    wait_consumer,
    wait_settled,
)

from kre_runner.dev.embedded import EmbeddedNats, find_nats_server
from kre_runner.node.envelope import KreNatsMessage

pytestmark = pytest.mark.integration

IN = f"{STREAM}.greeter"
OUT = f"{STREAM}.out"
ENTRY = f"{STREAM}.entrypoint"
CONSUMER = "v1-greeter"

MODES = {
    "inline": ("faults.py", {}),
    "threaded": ("faults.py", {"KRT_HANDLER_THREADS": "2"}),
    "async": ("faults.py:handler_async", {}),
}


def _env(url: str, mode: str, **overrides: str) -> dict[str, str]:
    spec, extra = MODES[mode]
    # A short ack wait: an input left unsettled would be redelivered (and counted) within the test.
    return node_env(url, spec, **{"KRT_ACK_WAIT": "1", **extra, **overrides})


async def _acked_once(js) -> None:
    """The input was acked, and never redelivered."""
    await wait_settled(js, CONSUMER)
    await asyncio.sleep(1.5)  # past the ack wait: an unsettled input would show up as redelivered
    info = await js.consumer_info(STREAM, CONSUMER)
    assert (info.num_ack_pending, info.num_redelivered, info.num_pending) == (0, 0, 0)


async def _error_for(js, nats_server, mode: str, name: str) -> KreNatsMessage:
    """Send ``name``; return the one error envelope on the entrypoint subject, asserting nothing else came."""
    errors = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    async with running_node(_env(nats_server.url, mode), js):
        await js.publish(IN, request_envelope(name, tracking_id=f"t-{name}", reply="r").SerializeToString())
        [error] = await errors.take(1)
        await _acked_once(js)
        assert await errors.nothing_more() and await out.nothing_more()
    assert (error.tracking_id, error.reply) == (f"t-{name}", "r")
    assert [t.node_name for t in error.tracking] == ["entrypoint", "greeter"]
    return error


@pytest.mark.parametrize("mode", MODES)
async def test_decode_failure(nats_server, js, workflow_stream, mode):
    errors = await Collector(js, ENTRY).start()
    async with running_node(_env(nats_server.url, mode), js):
        await js.publish(IN, b"\xff\x00 not an envelope")
        [error] = await errors.take(1)
        await _acked_once(js)
    assert "invalid input message at seq 1" in error.error


@pytest.mark.parametrize("mode", MODES)
async def test_handler_raises(nats_server, js, workflow_stream, mode):
    error = await _error_for(js, nats_server, mode, "raise")
    assert error.error == "error in 'greeter': 'threshold'"


@pytest.mark.parametrize("mode", MODES)
async def test_result_that_cannot_be_serialised(nats_server, js, workflow_stream, mode):
    error = await _error_for(js, nats_server, mode, "unserialisable")
    assert "cannot be serialised: EncodeError" in error.error


@pytest.mark.parametrize("mode", MODES)
async def test_error_envelope_too_large_whole_is_cut_down(nats_server, js, workflow_stream, mode):
    error = await _error_for(js, nats_server, mode, "raise-huge")
    assert error.error.endswith("… (3000000 characters)")
    assert len(error.error) < 10_000


@pytest.mark.parametrize("mode", MODES)
async def test_output_too_large_even_compressed(nats_server, js, workflow_stream, mode):
    error = await _error_for(js, nats_server, mode, "too-large")
    assert "bytes compressed, over the" in error.error


@pytest.mark.parametrize("mode", MODES)
async def test_a_failed_early_reply_does_not_suppress_the_answer_of_the_last_node(nats_server, js, workflow_stream,
                                                                                  mode):
    replies = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    async with running_node(_env(nats_server.url, mode, KRT_IS_LAST_NODE="true"), js):
        await js.publish(IN, request_envelope("early-too-large").SerializeToString())
        [answer] = await out.take(1)
        await _acked_once(js)
        assert await replies.nothing_more()
    assert greeting(answer) == "answered after EnvelopeError"
    assert not answer.replied


@pytest.mark.parametrize("mode", MODES)
async def test_early_exit_goes_to_the_entrypoint_not_the_next_node(nats_server, js, workflow_stream, mode):
    entry = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    async with running_node(_env(nats_server.url, mode), js):
        await js.publish(IN, request_envelope("exit", tracking_id="t-x", reply="r-x").SerializeToString())
        await js.publish(IN, request_envelope("stays").SerializeToString())
        [exited] = await entry.take(1)
        [stayed] = await out.take(1)
        await _acked_once(js)
        assert await entry.nothing_more() and await out.nothing_more()
    assert exited.early_exit and greeting(exited) == "left early"
    assert (exited.tracking_id, exited.reply, exited.error) == ("t-x", "r-x", "")
    assert [t.node_name for t in exited.tracking] == ["entrypoint", "greeter"]
    assert not stayed.early_exit and greeting(stayed) == "ok stays"


@pytest.mark.parametrize("mode", MODES)
async def test_an_input_carrying_an_error_is_passed_on_without_calling_the_handler(nats_server, js, workflow_stream,
                                                                                   mode):
    entry = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    failed = request_envelope("never-handled", tracking_id="t-p", reply="r-p")
    failed.error = "error in 'upstream': model missing"
    async with running_node(_env(nats_server.url, mode), js):
        await js.publish(IN, failed.SerializeToString())
        [passed] = await entry.take(1)
        await _acked_once(js)
        assert await out.nothing_more()
    assert passed.error == "error in 'upstream': model missing"
    assert (passed.tracking_id, passed.reply, passed.payload) == ("t-p", "r-p", failed.payload)
    assert [t.node_name for t in passed.tracking] == ["entrypoint", "greeter"]
    assert "never-handled" not in _calls()


def _calls() -> list[str]:
    return next(m.CALLS for name, m in sys.modules.items() if name.startswith("_kre_user_faults"))


@pytest.mark.parametrize("mode", MODES)
async def test_failed_publish_is_nakked_and_retried_until_stored(nats_server, js, workflow_stream, mode):
    # The output subject has no stream yet: every publish gets "no responders" and the input waits.
    env = _env(nats_server.url, mode, KRT_NATS_OUTPUT="later.out", KRT_ACK_WAIT="30")
    async with running_node(env, js):
        await js.publish(IN, request_envelope("patient").SerializeToString())
        # Nakked: retried long before the 30 s ack wait (10 s: a third of it, so the redelivery is the nak's).
        info = await wait_consumer(js, CONSUMER, lambda info: info.num_redelivered >= 1, timeout=10)
        assert info.num_ack_pending == 1
        await js.add_stream(name="later", subjects=["later.out"])
        await wait_settled(js, CONSUMER, timeout=15)
    stored = await js.get_last_msg("later", "later.out")
    result = KreNatsMessage()
    result.ParseFromString(stored.data)
    assert greeting(result) == "ok patient"
    assert stored.headers["Nats-Msg-Id"] == "greeter:demo-v1-wf:1"


@pytest.mark.parametrize("mode", MODES)
async def test_pub_ack_timeout_is_nakked_not_kept_alive(nats_server, js, nc, workflow_stream, mode):
    # A plain subscriber on an output subject no stream captures: the publish "succeeds" but no PubAck
    # ever comes. The input must be retried once the publish timeout passes, long before the ack wait.
    seen: list[str] = []
    retried = asyncio.Event()

    async def listen(msg: nats.aio.msg.Msg) -> None:
        seen.append((msg.headers or {}).get("Nats-Msg-Id", ""))
        if len(seen) >= 2:
            retried.set()

    await nc.subscribe("nowhere.out", cb=listen)
    env = _env(nats_server.url, mode, KRT_NATS_OUTPUT="nowhere.out", KRT_PUBLISH_TIMEOUT="1", KRT_ACK_WAIT="30")
    async with running_node(env, js):
        await js.publish(IN, request_envelope("unanswered").SerializeToString())
        # Retried after the 1 s publish timeout; 10 s is a third of the ack wait, so the retry is the nak's.
        await asyncio.wait_for(retried.wait(), 10)
        info = await js.consumer_info(STREAM, CONSUMER)
    assert len(seen) >= 2 and set(seen) == {"greeter:demo-v1-wf:1"}  # retried, same Nats-Msg-Id
    # Redelivered, never acked (a later retry, one publish timeout after the second, may be counted too).
    assert info.num_redelivered >= 1 and info.ack_floor.stream_seq == 0


class _NatsDenyingAcks(EmbeddedNats):
    """A server whose user ``node`` may not publish acks: every ack, nak and keep-alive it sends is lost."""

    def _command(self) -> list[str]:
        conf = f"{self.dir}/deny-acks.conf"
        with open(conf, "w") as f:
            f.write('authorization { users = [\n'
                    '  {user: admin, password: admin}\n'
                    '  {user: node, password: node, permissions: {publish: {deny: ["$JS.ACK.>"]}}}\n'
                    ']}\n')
        return [find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.dir, "-c", conf]


@pytest.mark.parametrize("mode", MODES)
async def test_a_lost_ack_neither_reruns_the_handler_nor_duplicates_the_output(mode):
    with _NatsDenyingAcks() as server:
        admin = await nats.connect(f"nats://admin:admin@127.0.0.1:{server.port}")
        try:
            js = admin.jetstream()
            await js.add_stream(name=STREAM, subjects=[f"{STREAM}.*"])
            env = _env(f"nats://node:node@127.0.0.1:{server.port}", mode)
            async with running_node(env, js):
                await js.publish(IN, request_envelope("acked-in-vain").SerializeToString())
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    info = await js.consumer_info(STREAM, CONSUMER)
                    if info.num_redelivered and info.delivered.consumer_seq >= 3:
                        break
                    await asyncio.sleep(0.2)
            stream = await js.stream_info(STREAM)
        finally:
            await admin.close()
    assert info.delivered.consumer_seq >= 3  # delivered again and again: its acks never arrived
    assert stream.state.messages == 2  # the input and one output
    # The node remembers what it acked: a redelivery is acked again without running the handler (a server
    # that lost recent ack state would otherwise get a second output once it forgot the Nats-Msg-Id).
    assert _calls().count("acked-in-vain") == 1


@pytest.mark.parametrize("mode", ["threaded", "async"])
async def test_shutdown_grace_running_out_hands_inputs_back_at_once(nats_server, js, workflow_stream, monkeypatch,
                                                                    mode):
    monkeypatch.setenv("SLOW_SECONDS", "5")
    spec = "slow.py" if mode == "async" else "faults.py"
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, spec, KRT_SHUTDOWN_GRACE="0.5", KRT_ACK_WAIT="30", KRT_MAX_INFLIGHT="2",
                   **MODES[mode][1])
    if mode == "threaded":
        env["KRT_HANDLER_PATH"] = "slow_sync.py"
    async with running_node(env, js):
        for i in range(4):
            await js.publish(IN, request_envelope(f"held-{i}").SerializeToString())
        # Two are delivered and running (for 5 s: KRT_MAX_INFLIGHT=2); the others wait for a slot.
        await wait_consumer(js, CONSUMER, lambda info: info.num_ack_pending >= 2)
    # The two running inputs were nakked when the grace ran out: the next node gets them at once, not
    # after the 30 s ack wait (JetStream counts them ack-pending until they are redelivered).
    async with running_node(node_env(nats_server.url, "greet.py"), js):
        results = await out.take(4, timeout=8)
        await wait_settled(js, CONSUMER)
    assert sorted(greeting(r).split("!")[0] for r in results) == [f"Hello, held-{i}" for i in range(4)]


class _NatsInDomain(EmbeddedNats):
    """A server whose JetStream domain is ``error``: every PubAck carries ``"domain":"error"``."""

    def _command(self) -> list[str]:
        conf = f"{self.dir}/domain.conf"
        with open(conf, "w") as f:
            f.write(f'jetstream {{ store_dir: "{self.dir}", domain: error }}\n')
        return [find_nats_server(), "-a", "127.0.0.1", "-p", str(self.port), "-c", conf]


# Output streams (and a JetStream domain) named so that a PubAck judged by a substring holds that substring
# on success: a stream named "error", one whose name holds it, and a domain named "error".
@pytest.mark.parametrize(("output_stream", "domain"), [("error", False), ("my-error-stream", False),
                                                       ("out", True)])
async def test_outputs_stored_in_a_stream_or_domain_named_error_are_acked(output_stream, domain):
    server = _NatsInDomain() if domain else EmbeddedNats()
    with server:
        client = await nats.connect(server.url)
        try:
            js = client.jetstream()
            await js.add_stream(name=STREAM, subjects=[f"{STREAM}.*"])
            await js.add_stream(name=output_stream, subjects=[f"{output_stream}.>"])
            env = _env(server.url, "inline", KRT_NATS_OUTPUT=f"{output_stream}.out", KRT_ACK_WAIT="30")
            async with running_node(env, js):
                for i in range(20):
                    await js.publish(IN, request_envelope(f"named-{i}").SerializeToString())
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    info = await js.consumer_info(STREAM, CONSUMER)
                    if info.ack_floor.stream_seq == 20:
                        break
                    await asyncio.sleep(0.1)
            stored = (await js.stream_info(output_stream)).state.messages
        finally:
            await client.close()
    # Every output stored once, and every input acked at its first delivery (no nak, no redelivery).
    assert (info.ack_floor.stream_seq, info.num_ack_pending, info.num_redelivered, stored) == (20, 0, 0, 20)


@pytest.mark.parametrize("mode", ["threaded", "async"])
async def test_inputs_interrupted_at_shutdown_are_not_counted_as_publish_failures(nats_server, js, workflow_stream,
                                                                                 monkeypatch, mode):
    monkeypatch.setenv("SLOW_SECONDS", "5")
    env = node_env(nats_server.url, "slow.py" if mode == "async" else "slow_sync.py", KRT_SHUTDOWN_GRACE="0.5",
                   KRT_ACK_WAIT="30", KRT_MAX_INFLIGHT="2", **MODES[mode][1])
    async with running_node(env, js) as node:
        for i in range(2):
            await js.publish(IN, request_envelope(f"cut-{i}").SerializeToString())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (await js.consumer_info(STREAM, CONSUMER)).num_ack_pending == 2:
                break  # both delivered, their handlers running
            await asyncio.sleep(0.05)
    metrics = (await node).metrics
    assert metrics.publish_failures == 0  # nothing was published, so nothing failed to be
    assert (metrics.retried, metrics.interrupted) == (2, 2)
