"""KRE 3.x nodes against a real nats-server: routing, sends, channels, dedup, errors, fan-in (issue 18)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import nats.errors
import pytest
from google.protobuf.any_pb2 import Any as AnyProto
from kre_helpers import STREAM, Request, Response, node_env, running_node, wait_settled
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig

from kre_runner.errors import SetupError
from kre_runner.node.envelope import KreNatsMessageV3, decode_v3
from kre_runner.proto.kre_nats_msg_v3_pb2 import MessageType

pytestmark = pytest.mark.integration

NODE = "node3"
CONSUMER = f"v1-{NODE}"
ENTRY, A, B = f"{STREAM}.entrypoint", f"{STREAM}.nodeA", f"{STREAM}.nodeB"
OUT = f"{STREAM}.{NODE}"


@pytest.fixture
async def v3_stream(js: JetStreamContext) -> str:
    """As the 3.x manager lays it out: ``{stream}.*`` and ``{stream}.*.*`` (channels), interest retention."""
    await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*", f"{STREAM}.*.*"],
                                     retention=RetentionPolicy.INTEREST, duplicate_window=120))
    return STREAM


def v3_env(nats_url: str, handler: str = "v3_node.py", inputs: tuple[str, ...] = (ENTRY, A, B),
           **overrides: str) -> dict[str, str]:
    env = node_env(nats_url, handler, node=NODE, KRT_NATS_OUTPUT=OUT, **overrides)
    for name in ("KRT_NATS_INPUT", "KRT_NATS_ENTRYPOINT_SUBJECT"):
        del env[name]
    env["KRT_NATS_INPUTS"] = ",".join(inputs)
    return env


def envelope(name: str = "", *, from_node: str = "entrypoint", request_id: str | None = None,
             message_type: int = MessageType.OK, error: str = "") -> bytes:
    """What an upstream 3.x node (or the entrypoint) publishes."""
    msg = KreNatsMessageV3(request_id=request_id or str(uuid.uuid4()), from_node=from_node,
                           message_type=message_type, error=error)
    if name:
        payload = AnyProto()
        payload.Pack(Request(name=name))
        msg.payload.CopyFrom(payload)
    return msg.SerializeToString()


class Outputs:
    """Every envelope on the node's output subject and its channels, with its subject and Nats-Msg-Id."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.got: list[tuple[str, KreNatsMessageV3, str]] = []

    async def start(self) -> Outputs:
        self._subs = [await self._js.pull_subscribe(subject, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=300))
            for subject in (OUT, f"{OUT}.*")]
        return self

    async def take(self, count: int, timeout: float = 10.0) -> list[tuple[str, KreNatsMessageV3, str]]:
        deadline = time.monotonic() + timeout
        while len(self.got) < count and time.monotonic() < deadline:
            for sub in self._subs:
                with contextlib.suppress(asyncio.TimeoutError, nats.errors.TimeoutError):
                    for msg in await sub.fetch(64, timeout=0.2):
                        self.got.append((msg.subject, decode_v3(msg.data), (msg.headers or {}).get("Nats-Msg-Id", "")))
        return self.got

    async def settle(self, count: int) -> list[tuple[str, KreNatsMessageV3, str]]:
        """Exactly ``count`` outputs: waits for them, then a while more to catch any extra."""
        await self.take(count)
        await self.take(count + 1, timeout=0.6)
        assert len(self.got) == count, [(s, text(e) or e.error) for s, e, _ in self.got]
        return self.got


def text(env: KreNatsMessageV3) -> str:
    if not env.payload.type_url:
        return ""
    response = Response()
    assert env.payload.Unpack(response), env.payload.type_url
    return response.greeting


async def test_fan_in_routing_by_from_node_through_one_consumer(nats_server, js, v3_stream):
    outputs = await Outputs(js).start()
    async with running_node(v3_env(nats_server.url), js):
        await js.publish(ENTRY, envelope("Ada", request_id="r-1"))
        await js.publish(A, envelope("Bob", from_node="nodeA", request_id="r-2"))
        await js.publish(B, envelope("Cy", from_node="nodeB", request_id="r-3"))
        got = await outputs.settle(3)
        await wait_settled(js, CONSUMER)
        consumers = [c.name for c in await js.consumers_info(STREAM) if c.config.durable_name]
        info = await js.consumer_info(STREAM, CONSUMER)
    by_request = {env.request_id: (subject, env) for subject, env, _ in got}
    assert text(by_request["r-1"][1]) == "Hello, Ada! request r-1"  # default_handler; init's ctx.set seen
    assert text(by_request["r-2"][1]) == "from nodeA: Bob"  # custom_handlers["nodeA"] (async)
    assert text(by_request["r-3"][1]) == "from nodeB: Cy"  # custom_handlers["nodeB"] (sync, not awaited)
    for subject, env in by_request.values():
        assert subject == OUT and env.from_node == NODE and env.message_type == MessageType.OK
    # One durable pull consumer over the three inputs, named as v2's.
    assert consumers == [CONSUMER]
    assert sorted(info.config.filter_subjects or []) == sorted([ENTRY, A, B])
    assert not info.config.deliver_subject


async def test_every_input_reaches_a_handler_error_and_early_ones_too(nats_server, js, v3_stream):
    outputs = await Outputs(js).start()
    async with running_node(v3_env(nats_server.url), js):
        await js.publish(ENTRY, envelope(request_id="e-1", message_type=MessageType.ERROR, error="upstream broke"))
        await js.publish(B, envelope(from_node="nodeB", request_id="e-2", message_type=MessageType.ERROR,
                                     error="B broke"))
        await js.publish(ENTRY, envelope("x", request_id="e-3", message_type=MessageType.EARLY_REPLY))
        got = await outputs.settle(3)
        await wait_settled(js, CONSUMER)
    texts = {env.request_id: text(env) for _, env, _ in got}
    assert texts == {"e-1": "saw an error input e-1", "e-2": "nodeB failed upstream", "e-3": "saw an early reply"}


async def test_zero_one_and_many_sends_with_channels_each_with_its_own_msg_id(nats_server, js, v3_stream):
    outputs = await Outputs(js).start()
    async with running_node(v3_env(nats_server.url), js):
        await js.publish(ENTRY, envelope("zero", request_id="z"))
        await js.publish(ENTRY, envelope("many:3", request_id="m"))
        ack = await js.publish(ENTRY, envelope("channels", request_id="c"))
        got = await outputs.settle(6)
        await wait_settled(js, CONSUMER)
    many = [(s, text(e), i) for s, e, i in got if e.request_id == "m"]
    assert [t for _, t, _ in many] == ["part 0", "part 1", "part 2"]
    assert len({i for _, _, i in many}) == 3
    channels = {text(e): (s, e.message_type, i) for s, e, i in got if e.request_id == "c"}
    assert channels == {
        "to the left": (f"{OUT}.left", MessageType.OK, f"{NODE}:{STREAM}:{ack.seq}:0"),
        "early": (f"{OUT}.right", MessageType.EARLY_REPLY, f"{NODE}:{STREAM}:{ack.seq}:1"),
        "main": (OUT, MessageType.OK, f"{NODE}:{STREAM}:{ack.seq}:2"),
    }
    assert not [e for _, e, _ in got if e.request_id == "z"]


async def test_a_redelivered_input_does_not_duplicate_what_its_first_attempt_stored(nats_server, js, v3_stream):
    outputs = await Outputs(js).start()
    async with running_node(v3_env(nats_server.url), js):
        await js.publish(ENTRY, envelope("retry-once:1", request_id="d"))
        await wait_settled(js, CONSUMER)
        info = await js.consumer_info(STREAM, CONSUMER)
        got = await outputs.settle(2)  # two sends per attempt, two attempts: the stream kept two
    assert sorted(text(e) for _, e, _ in got) == ["first", "second"]
    assert info.delivered.consumer_seq == 2 and info.delivered.stream_seq == 1  # one input, handled twice


async def test_handler_error_envelope_and_sends_after_return(nats_server, js, v3_stream, caplog):
    outputs = await Outputs(js).start()
    caplog.set_level(logging.WARNING)
    async with running_node(v3_env(nats_server.url), js):
        await js.publish(ENTRY, envelope("boom", request_id="b"))
        await js.publish(A, envelope("boom", from_node="nodeA", request_id="b2"))  # handle_a: no raise
        await js.publish(ENTRY, envelope("return", request_id="ret"))
        await js.publish(ENTRY, envelope("return", request_id="ret2"))
        await js.publish(ENTRY, envelope("late", request_id="l"))
        await outputs.take(2)
        await js.publish(ENTRY, envelope("report-late", request_id="rl"))
        got = await outputs.settle(3)
        await wait_settled(js, CONSUMER)
    by_request = {env.request_id: (subject, env) for subject, env, _ in got}
    subject, error = by_request["b"]
    assert subject == OUT
    assert error.message_type == MessageType.ERROR and error.from_node == NODE and not error.payload.type_url
    assert error.error == f"Error in node '{NODE}' executing handler for node 'entrypoint': boom"
    assert text(by_request["b2"][1]) == "from nodeA: boom"
    late = text(by_request["rl"][1])
    assert late.startswith("late: ctx.send_output was called after the handler returned"), late
    assert "ret" not in by_request and "ret2" not in by_request and "l" not in by_request
    warnings = [r.getMessage() for r in caplog.records if "a return value is ignored" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not per input


async def test_sync_handlers_on_the_loop(nats_server, js, v3_stream):
    outputs = await Outputs(js).start()
    async with running_node(v3_env(nats_server.url, "v3_sync.py", inputs=(ENTRY,)), js) as task:
        await js.publish(ENTRY, envelope("Ada", request_id="s"))
        await js.publish(ENTRY, envelope("boom", request_id="s2"))
        await js.publish(ENTRY, envelope("half", request_id="s3"))
        got = await outputs.settle(5)
        await wait_settled(js, CONSUMER)
        info = await js.consumer_info(STREAM, CONSUMER)
    assert info.config.filter_subject == ENTRY  # one input: filter_subject, which any server takes
    assert sorted((s, text(e) or e.error) for s, e, _ in got if e.request_id != "s3") == [
        (OUT, "Error in node 'node3' executing handler for node 'entrypoint': sync boom"),
        (OUT, "sync Ada"), (f"{OUT}.copy", "sync Ada again")]
    # In the stream's order: what it sent before it raised, then its error envelope (each with its own id).
    (sent, sent_id), (error, error_id) = [(text(e) or e.error, msg_id) for s, e, msg_id in got if e.request_id == "s3"]
    assert sent == "sync half"
    assert error == "Error in node 'node3' executing handler for node 'entrypoint': sync half boom"
    assert sent_id == f"{error_id}:0"  # the input's id with the send's index; the error envelope the input's own
    assert task.done()


async def test_start_up_refuses_a_stream_without_the_inputs_or_channels(nats_server, js):
    await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"], retention=RetentionPolicy.INTEREST))
    with pytest.raises(SetupError, match=r"does not capture channels \(demo-v1-wf.node3.\*\)"):
        async with running_node(v3_env(nats_server.url), js):
            pass


async def test_the_originals_push_consumers_are_taken_over_without_a_gap(nats_server, js, v3_stream):
    # The 3.x original: a durable push consumer per input, named {subject with . -> -}-{node}, deliver group.
    names = []
    for subject in (ENTRY, A):
        name = f"{subject.replace('.', '-')}-{NODE}"
        names.append(name)
        await js.add_consumer(STREAM, ConsumerConfig(durable_name=name, deliver_subject=f"push.{name}",
                                                     deliver_group=name, filter_subject=subject,
                                                     ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW))
    outputs = await Outputs(js).start()
    # Published while the original held them (nobody acked): interest retention keeps them for its consumers.
    await js.publish(ENTRY, envelope("Ada", request_id="t-1"))
    await js.publish(A, envelope("Bob", from_node="nodeA", request_id="t-2"))
    async with running_node(v3_env(nats_server.url, inputs=(ENTRY, A)), js):
        got = await outputs.settle(2)
        await wait_settled(js, CONSUMER)
        durable = sorted(c.name for c in await js.consumers_info(STREAM) if c.config.durable_name)
    assert sorted(text(e) for _, e, _ in got) == ["Hello, Ada! request t-1", "from nodeA: Bob"]
    assert durable == [CONSUMER]  # the push consumers are gone, ours remains


async def test_check_says_the_generation_and_checks_every_input_and_the_channels(nats_server, js, v3_stream):
    from kre_runner.dev.check import run_checks

    lines = [finding.line() for finding in await run_checks(v3_env(nats_server.url))]
    assert "✔ generation: KRE 3.x: KRT_NATS_INPUTS is set (and KRT_NATS_INPUT is not), as the 3.x manager sets it" \
        in lines
    assert all(line.startswith("✔") for line in lines), lines
    for subject in (ENTRY, A, B):
        assert f"✔ KRT_NATS_INPUTS={subject} is captured by stream {STREAM}" in lines
    assert f"✔ KRT_NATS_OUTPUT's channels={OUT}.* is captured by stream {STREAM}" in lines
    assert any(line.startswith("✔ handler:") and "async handler" in line for line in lines)
