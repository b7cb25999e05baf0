"""Batch handlers on a real nats-server: the list-return contract, and every input settled on its own.

Each test asserts what reached which subject, and the input's fate on the consumer (ack-pending,
redeliveries), as tests/test_settlement.py does for the per-message paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import numpy as np
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
from kre_runner.node.envelope import iso_to_unix, now_iso

pytestmark = pytest.mark.integration

IN = f"{STREAM}.greeter"
OUT = f"{STREAM}.out"
ENTRY = f"{STREAM}.entrypoint"
CONSUMER = "v1-greeter"

EXAMPLE = Path(__file__).parents[1] / "examples" / "classifier"
MODES = {"sync": "batch.py", "async": "batch.py:classify_async"}


def _env(url: str, mode: str, **overrides: str) -> dict[str, str]:
    # A long wait: inputs published together form one batch. A short ack wait: an input left
    # unsettled would be redelivered (and counted) within the test.
    return node_env(url, MODES[mode], **{"KRT_BATCH_WAIT_MS": "1000", "KRT_ACK_WAIT": "1", **overrides})


# Timing bounds: what the design allows, plus this much scheduling delay on a shared, loaded machine.
_MARGIN = 0.5  # seconds


def _handler_module():
    return next(m for name, m in sys.modules.items() if name.startswith("_kre_user_batch"))


def _calls() -> list[tuple[float, list[str]]]:
    return _handler_module().CALLS


@contextlib.contextmanager
def _model_busy() -> Iterator[None]:
    """Every batch call (sync handler) waits until the block ends: the model stays busy meanwhile."""
    gate = _handler_module().GATE
    gate.clear()
    try:
        yield
    finally:
        gate.set()


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def _until_held(js, ack_pending: int, pending: int, timeout: float = 10.0) -> None:
    """Until the consumer shows these counts (delivered and unacked, still on the server)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(STREAM, CONSUMER)
        if (info.num_ack_pending, info.num_pending) == (ack_pending, pending):
            return
        assert info.num_ack_pending <= ack_pending, info  # never more held than the bound
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.02)


async def _publish(js, *names: str) -> None:
    for name in names:
        await js.publish(IN, request_envelope(name, tracking_id=f"t-{name}", reply=f"r-{name}").SerializeToString())


async def _acked_once(js) -> None:
    await wait_settled(js, CONSUMER)
    await asyncio.sleep(1.5)  # past the ack wait: an unsettled input would show up as redelivered
    info = await js.consumer_info(STREAM, CONSUMER)
    assert (info.num_ack_pending, info.num_redelivered, info.num_pending) == (0, 0, 0)


@pytest.mark.parametrize("mode", MODES)
async def test_each_item_of_the_list_becomes_its_inputs_outcome(nats_server, js, workflow_stream, mode):
    names = ["ok-a", "none-b", "any-c", "exc-d", "garbage-e", "early-f", "tracking-g"]
    out = await Collector(js, OUT).start()
    errors = await Collector(js, ENTRY).start()
    async with running_node(_env(nats_server.url, mode, KRT_BATCH_SIZE=str(len(names))), js):
        await _publish(js, *names)
        outputs = {o.tracking_id: o for o in await out.take(4)}
        failed = {e.tracking_id: e for e in await errors.take(2)}
        await _acked_once(js)
        assert await out.nothing_more() and await errors.nothing_more()
        assert [batch for _, batch in _calls()] == [names]  # one call for the whole batch
    assert sorted(outputs) == ["t-any-c", "t-early-f", "t-ok-a", "t-tracking-g"]
    assert greeting(outputs["t-ok-a"]) == "ok ok-a"
    assert greeting(outputs["t-any-c"]) == "packed any-c"  # a google.protobuf.Any is forwarded unchanged
    assert greeting(outputs["t-early-f"]) == "ctx.early_reply acts on one message: it is not available in a " \
                                             "batch handler"
    assert greeting(outputs["t-tracking-g"]) == ",".join(f"t-{name}" for name in names)
    assert failed["t-exc-d"].error == "error in 'greeter': bad exc-d"
    assert "handler returned str; expected a protobuf message" in failed["t-garbage-e"].error
    for envelope in [*outputs.values(), *failed.values()]:
        assert envelope.reply == "r-" + envelope.tracking_id[2:]
        assert [t.node_name for t in envelope.tracking] == ["entrypoint", "greeter"]
    # Every output's tracking entry spans the same call: the batch's.
    assert len({(o.tracking[-1].start, o.tracking[-1].end) for o in outputs.values()}) == 1


@pytest.mark.parametrize(("name", "reason"), [
    ("raise", "error in 'greeter': the model crashed"),
    ("short", "error in 'greeter': batch handler returned 2 results for 3 inputs"),
    ("not-a-list", "error in 'greeter': batch handler returned dict; expected a list with one result per input (3)"),
])
async def test_a_failed_call_or_a_bad_list_fails_every_input_of_the_batch(nats_server, js, workflow_stream, name,
                                                                          reason):
    out = await Collector(js, OUT).start()
    errors = await Collector(js, ENTRY).start()
    async with running_node(_env(nats_server.url, "sync", KRT_BATCH_SIZE="3"), js):
        await _publish(js, "ok-1", name, "ok-2")
        failed = await errors.take(3)
        await _acked_once(js)
        assert await out.nothing_more()
    assert sorted(e.tracking_id for e in failed) == sorted(["t-ok-1", f"t-{name}", "t-ok-2"])
    assert {e.error for e in failed} == {reason}


@pytest.mark.parametrize("mode", MODES)
async def test_invalid_and_error_inputs_never_reach_the_batch_handler(nats_server, js, workflow_stream, mode):
    entry = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    failed = request_envelope("upstream-failed", tracking_id="t-p", reply="r-p")
    failed.error = "error in 'upstream': model missing"
    async with running_node(_env(nats_server.url, mode, KRT_BATCH_SIZE="2"), js):
        await js.publish(IN, failed.SerializeToString())
        await js.publish(IN, b"\xff\x00 not an envelope")
        await _publish(js, "ok-1", "ok-2")
        errors = {e.tracking_id: e for e in await entry.take(2)}
        [o1, o2] = await out.take(2)
        await _acked_once(js)
        assert [batch for _, batch in _calls()] == [["ok-1", "ok-2"]]
    assert errors["t-p"].error == "error in 'upstream': model missing"  # passed on unchanged
    assert [t.node_name for t in errors["t-p"].tracking] == ["entrypoint", "greeter"]
    assert "invalid input message at seq" in errors[""].error
    assert sorted(greeting(o) for o in (o1, o2)) == ["ok ok-1", "ok ok-2"]


def _threads() -> list[str]:
    return next(m.THREADS for name, m in sys.modules.items() if name.startswith("_kre_user_batch"))


@pytest.mark.parametrize(("mode", "threads", "runs_in"), [
    ("sync", "0", "MainThread"),  # on the event loop, as a plain sync handler runs
    ("sync", "1", "kre-handler_0"),  # in KRT_HANDLER_THREADS threads, as a plain one would
    ("async", "0", "MainThread"),
])
async def test_batch_size_1_takes_the_per_message_path_with_the_same_contract(nats_server, js, workflow_stream, mode,
                                                                               threads, runs_in):
    names = ["ok-a", "none-b", "any-c", "exc-d", "garbage-e", "early-f", "tracking-g", "retry-h", "raise", "short",
             "not-a-list"]
    out = await Collector(js, OUT).start()
    errors = await Collector(js, ENTRY).start()
    env = _env(nats_server.url, mode, KRT_BATCH_SIZE="1", KRT_HANDLER_THREADS=threads)
    async with running_node(env, js):
        await _publish(js, *names)
        outputs = {o.tracking_id: o for o in await out.take(5)}
        failed = {e.tracking_id: e for e in await errors.take(5)}
        await _acked_once(js)
        assert await out.nothing_more() and await errors.nothing_more()
        calls = [batch for _, batch in _calls()]
        ran_in = set(_threads())
    assert sorted(calls) == sorted([[name] for name in names] + [["retry-h"]])  # one input a call; retried once
    assert ran_in == {runs_in}
    assert greeting(outputs["t-ok-a"]) == "ok ok-a"
    assert greeting(outputs["t-any-c"]) == "packed any-c"
    assert greeting(outputs["t-early-f"]) == "ctx.early_reply acts on one message: it is not available in a " \
                                             "batch handler"
    assert greeting(outputs["t-tracking-g"]) == "t-tracking-g"
    assert greeting(outputs["t-retry-h"]) == "retried retry-h"
    assert failed["t-exc-d"].error == "error in 'greeter': bad exc-d"
    assert "handler returned str; expected a protobuf message" in failed["t-garbage-e"].error
    assert failed["t-raise"].error == "error in 'greeter': the model crashed"
    assert failed["t-short"].error == "error in 'greeter': batch handler returned 0 results for 1 inputs"
    assert failed["t-not-a-list"].error == ("error in 'greeter': batch handler returned dict; expected a list with "
                                            "one result per input (1)")
    for envelope in [*outputs.values(), *failed.values()]:
        assert envelope.reply == "r-" + envelope.tracking_id[2:]
        assert [t.node_name for t in envelope.tracking] == ["entrypoint", "greeter"]


async def test_the_last_node_does_not_publish_an_already_answered_request(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    answered = request_envelope("ok-answered")
    answered.replied = True
    async with running_node(_env(nats_server.url, "sync", KRT_BATCH_SIZE="2", KRT_IS_LAST_NODE="true"), js):
        await js.publish(IN, answered.SerializeToString())
        await _publish(js, "ok-open")
        [result] = await out.take(1)
        await _acked_once(js)
        assert await out.nothing_more()
    assert greeting(result) == "ok ok-open"


async def test_each_input_is_acked_after_its_own_output_is_stored(nats_server, js, workflow_stream):
    # The output subject has no stream yet: publishes fail and those inputs are nakked and retried,
    # while the batch's filtered inputs (None: nothing to store) are acked at once.
    env = _env(nats_server.url, "sync", KRT_BATCH_SIZE="4", KRT_NATS_OUTPUT="later.out", KRT_ACK_WAIT="30")
    async with running_node(env, js):
        await _publish(js, "ok-1", "none-2", "ok-3", "none-4")
        # The two outputs: retried (long before the 30 s ack wait: 10 s is a third of it), not acked.
        info = await wait_consumer(js, CONSUMER, lambda info: info.num_redelivered >= 2, timeout=10)
        assert info.num_ack_pending == 2
        await js.add_stream(name="later", subjects=["later.out"])
        await wait_settled(js, CONSUMER, timeout=15)
    stream = await js.stream_info("later")
    assert stream.state.messages == 2
    ids = {(await js.get_msg("later", seq)).headers["Nats-Msg-Id"] for seq in (1, 2)}
    assert ids == {"greeter:demo-v1-wf:1", "greeter:demo-v1-wf:3"}  # each output its own input's id


class _NatsDenyingAcks(EmbeddedNats):
    """A server whose user ``node`` may not publish acks: every ack it sends is lost."""

    def _command(self) -> list[str]:
        conf = f"{self.dir}/deny-acks.conf"
        with open(conf, "w") as f:
            f.write('authorization { users = [\n'
                    '  {user: admin, password: admin}\n'
                    '  {user: node, password: node, permissions: {publish: {deny: ["$JS.ACK.>"]}}}\n'
                    ']}\n')
        return [find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.dir, "-c", conf]


async def test_redelivered_inputs_in_new_batches_do_not_duplicate_their_outputs():
    with _NatsDenyingAcks() as server:
        admin = await nats.connect(f"nats://admin:admin@127.0.0.1:{server.port}")
        try:
            js = admin.jetstream()
            await js.add_stream(name=STREAM, subjects=[f"{STREAM}.*"])
            env = _env(f"nats://node:node@127.0.0.1:{server.port}", "sync", KRT_BATCH_SIZE="3",
                       KRT_BATCH_WAIT_MS="50")
            async with running_node(env, js):
                await _publish(js, "ok-1", "ok-2", "ok-3")
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    info = await js.consumer_info(STREAM, CONSUMER)
                    if info.delivered.consumer_seq >= 9:  # each input delivered three times
                        break
                    await asyncio.sleep(0.2)
                calls = len(_calls())
            stream = await js.stream_info(STREAM)
        finally:
            await admin.close()
    assert info.delivered.consumer_seq >= 9  # delivered again and again: the acks never arrive
    # Inputs this node acked before are acked again, not put in new batches (settlement.acked_before).
    assert calls == 1
    assert stream.state.messages == 6  # three inputs and one output each


async def test_sigterm_finishes_the_running_batch_and_hands_back_the_collected_one(nats_server, js, workflow_stream,
                                                                                   monkeypatch):
    held = 1.5  # how long the first batch's call still runs after SIGTERM
    out = await Collector(js, OUT).start()
    env = _env(nats_server.url, "sync", KRT_BATCH_SIZE="2", KRT_ACK_WAIT="30")
    async with running_node(env, js):
        gate = _handler_module().GATE
        gate.clear()
        await _publish(js, "ok-1", "ok-2", "ok-3", "ok-4")
        # The first batch runs (held); the second is full and waits for the runner.
        await _until(lambda: [batch for _, batch in _calls()] == [["ok-1", "ok-2"]])
        await _until_held(js, ack_pending=4, pending=0)
        asyncio.get_running_loop().call_later(held, gate.set)
        started = time.monotonic()
    stopped_in = time.monotonic() - started
    calls = [batch for _, batch in _calls()]
    first = await out.take(2, timeout=2)
    info = await js.consumer_info(STREAM, CONSUMER)
    assert calls == [["ok-1", "ok-2"]]  # the second batch never started
    assert sorted(greeting(o) for o in first) == ["ok ok-1", "ok ok-2"]  # the running batch finished, stored
    # Its held call, then the node's own shutdown (3 s margin: flush and close on a loaded machine); not a
    # second batch, nor the shutdown grace (10 s), nor the ack wait (30 s).
    assert stopped_in < held + 3.0
    assert info.ack_floor.consumer_seq == 2 and info.num_ack_pending == 2  # 1, 2 acked; 3, 4 handed back
    # ... once its subscription was closed: handed back before, JetStream redelivers them at once to the
    # stopping node's open pull request, and one that arrives after the unsubscribe waits out the ack wait.
    assert info.delivered.consumer_seq == 4
    monkeypatch.setenv("BATCH_SECONDS", "0")
    # Handed back, not left to the 30 s ack wait: the next node gets them at once.
    async with running_node(node_env(nats_server.url, "greet.py"), js):
        rest = await out.take(2, timeout=8)
        await wait_settled(js, CONSUMER)
    assert sorted(greeting(r).split("!")[0] for r in rest) == ["Hello, ok-3", "Hello, ok-4"]
    assert await out.nothing_more()


def _waited(envelope) -> float:
    """Seconds from the input's publish (its entrypoint entry's end) to the batch call's start."""
    return iso_to_unix(envelope.tracking[-1].start) - iso_to_unix(envelope.tracking[0].end)


async def _timed(js, name: str) -> bytes:
    envelope = request_envelope(name)
    envelope.tracking[0].end = now_iso()
    return envelope.SerializeToString()


async def test_a_lone_input_waits_at_most_the_linger_and_a_full_batch_not_at_all(nats_server, js, workflow_stream):
    linger = 1.0  # longer than twice _MARGIN: "waited for the linger" and "did not" stay apart under load
    out = await Collector(js, OUT).start()
    env = _env(nats_server.url, "sync", KRT_BATCH_SIZE="3", KRT_BATCH_WAIT_MS=str(int(linger * 1000)))
    async with running_node(env, js):
        await js.publish(IN, await _timed(js, "ok-lone"))
        [lone] = await out.take(1)
        for i in range(3):
            await js.publish(IN, await _timed(js, f"ok-full-{i}"))
        full = await out.take(3)
        await wait_settled(js, CONSUMER)
        assert [len(batch) for _, batch in _calls()] == [1, 3]
    # The linger runs from the delivery, after the publish's timestamp: never less (10 ms for the
    # timer's and the wall clock's granularity), and at most the linger plus scheduling delay.
    assert linger - 0.01 <= _waited(lone) <= linger + _MARGIN
    assert max(_waited(o) for o in full) < linger - _MARGIN  # full before the linger ran out: started at once


async def test_the_classifier_example_serves_batches_and_fails_a_bad_input_alone(nats_server, js, workflow_stream):
    sys.path.insert(0, str(EXAMPLE))
    from classifier_pb2 import Features, Prediction
    from google.protobuf.any_pb2 import Any as AnyProto

    def features(values: list[float], tracking_id: str) -> bytes:
        envelope = request_envelope("unused", tracking_id=tracking_id)
        payload = AnyProto()
        payload.Pack(Features(values=values))
        envelope.payload.CopyFrom(payload)
        return envelope.SerializeToString()

    vectors = {f"t-{i}": [((i * 7 + j) % 13 - 6) / 3 for j in range(512)] for i in range(3)}
    out = await Collector(js, OUT).start()
    errors = await Collector(js, ENTRY).start()
    env = node_env(nats_server.url, "classifier.py", KRT_BASE_PATH=str(EXAMPLE), KRT_BATCH_SIZE="4",
                   KRT_BATCH_WAIT_MS="1000", CLASSIFIER_BACKEND="numpy")
    async with running_node(env, js):
        for tracking_id, values in vectors.items():
            await js.publish(IN, features(values, tracking_id))
        await js.publish(IN, features([1.0, 2.0], "t-short"))
        predictions = {o.tracking_id: o for o in await out.take(3)}
        [error] = await errors.take(1)
        await wait_settled(js, CONSUMER)
    assert error.tracking_id == "t-short" and error.error == "error in 'greeter': expected 512 features, got 2"
    import model  # the example's own: the same weights, one input at a time

    reference = model.NumpyMLP()
    for tracking_id, values in vectors.items():
        prediction = Prediction()
        assert predictions[tracking_id].payload.Unpack(prediction)
        labels, scores = reference.predict(np.asarray([values], dtype=np.float32))
        assert prediction.label == labels[0] and prediction.score == pytest.approx(scores[0], rel=1e-4)


async def test_while_the_model_is_busy_the_next_batch_keeps_filling_past_its_wait(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    async with running_node(_env(nats_server.url, "sync", KRT_BATCH_SIZE="4", KRT_BATCH_WAIT_MS="50"), js):
        with _model_busy():
            await _publish(js, "ok-1")
            await _until(lambda: [batch for _, batch in _calls()] == [["ok-1"]])  # the model is busy with it
            for name in ("ok-2", "ok-3", "ok-4"):
                await _publish(js, name)
                await asyncio.sleep(0.12)  # this input's 50 ms wait runs out while the model is busy
            await _until_held(js, ack_pending=4, pending=0)
        await out.take(4)
        await wait_settled(js, CONSUMER)
        assert [batch for _, batch in _calls()] == [["ok-1"], ["ok-2", "ok-3", "ok-4"]]


async def test_max_inflight_bounds_the_inputs_held_for_batches(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    env = _env(nats_server.url, "sync", KRT_BATCH_SIZE="2", KRT_MAX_INFLIGHT="4", KRT_ACK_WAIT="30")
    async with running_node(env, js):
        with _model_busy():
            await _publish(js, *(f"ok-{i}" for i in range(10)))
            # The first batch runs (held busy), a second is collected: 4 held, 6 left on the server...
            await _until_held(js, ack_pending=4, pending=6)
            assert await out.nothing_more(0.3)  # ...and nothing is published yet
            assert (await js.consumer_info(STREAM, CONSUMER)).num_ack_pending == 4  # and no more are taken
        assert len(await out.take(10, timeout=15)) == 10
        await wait_settled(js, CONSUMER)


async def test_a_batch_handler_on_the_last_node_observes_the_workflow_duration(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    env = _env(nats_server.url, "sync", KRT_BATCH_SIZE="3", KRT_BATCH_WAIT_MS="200", KRT_IS_LAST_NODE="true")
    async with running_node(env, js) as node:
        await _publish(js, "ok-w1", "ok-w2", "ok-w3", "ok-w4")
        assert len(await out.take(4)) == 4
        await wait_settled(js, CONSUMER)
    workflow = (await node).metrics.workflow_seconds
    assert workflow.count == 4  # one per output, as the per-message paths observe it
    assert workflow.sum > 0
