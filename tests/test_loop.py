"""The consume → handle → publish → ack loop against a real nats-server."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
import time
from datetime import datetime

import pytest
from kre_helpers import (
    STREAM,
    Collector,
    Request,
    greeting,
    node_env,
    request_envelope,
    running_node,
    wait_consumer,
    wait_settled,
)

from kre_runner.errors import SetupError, StartupError
from kre_runner.handler import HandlerLoadError
from kre_runner.node.consumer import Consumer
from kre_runner.node.envelope import KreNatsMessage

pytestmark = pytest.mark.integration

IN = f"{STREAM}.greeter"
OUT = f"{STREAM}.out"
ENTRY = f"{STREAM}.entrypoint"


async def test_round_trip_like_the_original(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "greet.py"), js):
        sent = request_envelope("Ada", tracking_id="t-1", reply="req-1")
        await js.publish(IN, sent.SerializeToString())
        [result] = await out.take(1)
        await wait_settled(js, "v1-greeter")

    assert result.tracking_id == "t-1"
    assert result.reply == "req-1"
    assert result.error == ""
    assert greeting(result).startswith("Hello, Ada! init=1")
    assert [t.node_name for t in result.tracking] == ["entrypoint", "greeter"]
    entry = result.tracking[1]
    start, end = datetime.fromisoformat(entry.start), datetime.fromisoformat(entry.end)
    assert start.tzinfo is None and start <= end
    assert result.tracking[0] == sent.tracking[0]


async def test_a_node_that_crashes_during_a_test_fails_the_test(nats_server, js, workflow_stream, monkeypatch):
    # running_node stands for a node in a pod: a crash there must not pass unnoticed in a test.
    crash = asyncio.Event()
    run = Consumer.run

    async def run_until_crash(self, stop):
        running = asyncio.ensure_future(run(self, stop))
        await crash.wait()
        stop.set()
        await running
        raise RuntimeError("the node crashed")

    monkeypatch.setattr(Consumer, "run", run_until_crash)
    with pytest.raises(RuntimeError, match="the node crashed"):
        async with running_node(node_env(nats_server.url, "greet.py"), js) as node:
            crash.set()
            await asyncio.wait_for(asyncio.wait({node}), 30)  # the node is gone before the test ends


async def test_init_runs_once_before_the_first_message(nats_server, js, workflow_stream, caplog):
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "greet.py")
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(env, js):
            pass  # creates the durable consumer, as a first deployment would
    # The start-up log says which fast paths are on, and that the new consumer skips older messages.
    assert "fast paths on (direct MSG dispatch, direct PUB writes)" in caplog.text
    assert ("created durable pull consumer v1-greeter on stream demo-v1-wf for demo-v1-wf.greeter; it starts at new "
            "messages (KRT_DELIVER_POLICY=new: messages already in the stream are not processed)") in caplog.text
    # A backlog waits when the node (re)starts: every message must still see init's result.
    for i in range(50):
        await js.publish(IN, request_envelope(f"n{i}").SerializeToString())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(env, js):
            results = await out.take(50)
    assert ("reusing durable pull consumer v1-greeter on stream demo-v1-wf for demo-v1-wf.greeter: it resumes after "
            "the last acked message (50 waiting, 0 unacked)") in caplog.text
    assert len(results) == 50
    assert all("init=1 " in greeting(r) for r in results), {greeting(r) for r in results}


async def test_async_handler_runs_messages_concurrently_within_the_bound(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "greet_async.py", KRT_MAX_INFLIGHT="8")
    async with running_node(env, js):
        for i in range(40):
            await js.publish(IN, request_envelope(f"a{i}").SerializeToString())
        results = await out.take(40)
        await wait_settled(js, "v1-greeter")
    assert sorted(greeting(r) for r in results) == sorted(f"Hi, a{i}!" for i in range(40))
    import sys

    state = next(m.STATE for name, m in sys.modules.items() if name.startswith("_kre_user_greet_async"))
    assert 1 < state["peak"] <= 8


async def test_messages_waiting_for_a_slot_are_kept_alive_past_the_ack_wait(nats_server, js, workflow_stream,
                                                                             monkeypatch):
    """Async handlers keep messages delivered ahead; one that waits longer than the ack wait for its
    slot must not be redelivered (and so handled twice)."""
    out = await Collector(js, OUT).start()
    monkeypatch.setenv("SLOW_SECONDS", "2.0")  # the handler runs in this process
    env = node_env(nats_server.url, "slow.py", KRT_MAX_INFLIGHT="1", KRT_ACK_WAIT="1.5")
    async with running_node(env, js):
        # Once w0's call has shown that the handler waits, w2 is delivered ahead and waits 2 s for w1's slot.
        for i in range(3):
            await js.publish(IN, request_envelope(f"w{i}").SerializeToString())
        results = await out.take(3, timeout=20)
        await wait_settled(js, "v1-greeter")
        info = await js.consumer_info(STREAM, "v1-greeter")
    assert sorted(greeting(r).split(" pid=")[0] for r in results) == ["slow w0", "slow w1", "slow w2"]
    import sys

    calls = next(m.CALLS for name, m in sys.modules.items() if re.fullmatch(r"_kre_user_slow_[0-9a-f]{12}", name))
    assert calls == ["w0", "w1", "w2"]  # a redelivery would have run w2 twice
    assert info.num_ack_pending == 0
    assert await out.nothing_more()


async def test_what_init_loaded_is_left_out_of_garbage_collection(nats_server, js, workflow_stream):
    """A full GC pass re-scans every object: with a large model loaded in init it would stall messages."""
    import gc

    gc.unfreeze()
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "greet_async.py"), js):
        await js.publish(IN, request_envelope("gc").SerializeToString())
        await out.take(1)
        frozen = gc.get_freeze_count()
    gc.unfreeze()
    assert frozen > 10_000  # the libraries' objects and init's, at least


async def test_handler_error_is_reported_with_tracking_and_input_acked(nats_server, js, workflow_stream):
    errors = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "outcomes.py"), js):
        await js.publish(IN, request_envelope("boom-1", tracking_id="t-err", reply="r-err").SerializeToString())
        await js.publish(IN, request_envelope("after").SerializeToString())
        [error] = await errors.take(1)
        [ok] = await out.take(1)
        await wait_settled(js, "v1-greeter")
    assert error.error == "error in 'greeter': cannot greet boom-1"
    assert (error.tracking_id, error.reply) == ("t-err", "r-err")
    assert [t.node_name for t in error.tracking] == ["entrypoint", "greeter"]
    assert greeting(ok) == "Hello, after!"
    assert await errors.nothing_more()


async def test_errors_go_to_the_output_without_an_entrypoint_subject(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "outcomes.py", KRT_NATS_ENTRYPOINT_SUBJECT="")
    async with running_node(env, js):
        await js.publish(IN, request_envelope("boom-2").SerializeToString())
        [error] = await out.take(1)
    assert "cannot greet boom-2" in error.error


async def test_compressed_input_and_output_above_the_limit(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "outcomes.py"), js):
        await js.publish(IN, gzip.compress(request_envelope("zipped").SerializeToString()))
        await js.publish(IN, request_envelope("big").SerializeToString())
        results = await out.take(2)
        await wait_settled(js, "v1-greeter")
    by_name = {r.reply: r for r in results}
    assert greeting(by_name["reply-zipped"]) == "Hello, zipped!"
    # The big output could only be stored gzip-compressed under the 1 MiB max_payload.
    sizes = sorted(len(raw) for raw in out.raw)
    assert sizes[-1] < 1024 * 1024 and max(out.raw, key=len)[:2] == b"\x1f\x8b"
    assert greeting(by_name["reply-big"]) == "big " * 600_000


async def test_output_too_large_even_compressed_becomes_an_error(nats_server, js, workflow_stream):
    errors = await Collector(js, ENTRY).start()
    async with running_node(node_env(nats_server.url, "outcomes.py"), js):
        await js.publish(IN, request_envelope("huge-random").SerializeToString())
        [error] = await errors.take(1)
        await wait_settled(js, "v1-greeter")
    assert "over the" in error.error and "limit" in error.error


async def test_garbage_inputs_get_error_envelopes_and_never_stop_the_node(nats_server, js, workflow_stream):
    errors = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "outcomes.py"), js):
        await js.publish(IN, request_envelope("first").SerializeToString())
        bad = await js.publish(IN, b"\xff\xfe this is not protobuf")
        await js.publish(IN, b"\x1f\x8b\x08 truncated gzip")
        await js.publish(IN, request_envelope("second").SerializeToString())
        good = await out.take(2)
        bad_reports = await errors.take(2)
        await wait_settled(js, "v1-greeter")
    assert sorted(greeting(g) for g in good) == ["Hello, first!", "Hello, second!"]
    assert len(bad_reports) == 2
    assert any(f"seq {bad.seq}" in r.error for r in bad_reports)
    assert all(r.error.startswith("error in 'greeter': invalid input message") for r in bad_reports)


async def test_none_filters_and_any_passes_through(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "outcomes.py"), js):
        await js.publish(IN, request_envelope("skip-me").SerializeToString())
        await js.publish(IN, request_envelope("pass-me").SerializeToString())
        [passed] = await out.take(1)
        await wait_settled(js, "v1-greeter")
        assert await out.nothing_more()
    request = Request()
    assert passed.payload.Unpack(request) and request.name == "pass-me"


async def test_a_non_protobuf_result_is_an_error(nats_server, js, workflow_stream):
    errors = await Collector(js, ENTRY).start()
    async with running_node(node_env(nats_server.url, "outcomes.py"), js):
        await js.publish(IN, request_envelope("wrong").SerializeToString())
        [error] = await errors.take(1)
    assert "handler returned dict" in error.error


@pytest.mark.parametrize("handler", ["early.py", "early_async.py"])
async def test_early_reply_then_the_workflow_goes_on_replied(nats_server, js, workflow_stream, handler):
    replies = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, handler), js):
        await js.publish(IN, request_envelope("Bo", tracking_id="t-e", reply="r-e").SerializeToString())
        [early] = await replies.take(1)
        [late] = await out.take(1)
        await wait_settled(js, "v1-greeter")
    assert greeting(early) == "early Bo" and (early.tracking_id, early.reply) == ("t-e", "r-e")
    assert greeting(late) == "late Bo" and late.replied


async def test_second_early_reply_is_an_error(nats_server, js, workflow_stream):
    replies = await Collector(js, ENTRY).start()
    async with running_node(node_env(nats_server.url, "early.py"), js):
        await js.publish(IN, request_envelope("twice").SerializeToString())
        got = await replies.take(2)
        await wait_settled(js, "v1-greeter")
    [early] = [g for g in got if not g.error]
    [error] = [g for g in got if g.error]
    assert greeting(early) == "early twice"
    assert error.error == "error in 'greeter': an early reply was already sent for this request"


async def test_last_node_does_not_publish_a_replied_message_but_acks_it(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "greet.py", KRT_IS_LAST_NODE="true"), js):
        replied = request_envelope("already")
        replied.replied = True
        await js.publish(IN, replied.SerializeToString())
        await js.publish(IN, request_envelope("fresh").SerializeToString())
        [only] = await out.take(1)
        await wait_settled(js, "v1-greeter")
        assert await out.nothing_more()
    assert greeting(only).startswith("Hello, fresh!")


async def test_failed_output_publish_is_retried_not_acked(nats_server, js, workflow_stream):
    # The output subject has no stream yet: every publish gets "no responders" and the input waits.
    env = node_env(nats_server.url, "outcomes.py", KRT_NATS_OUTPUT="later.out")
    async with running_node(env, js):
        await js.publish(IN, request_envelope("patient").SerializeToString())
        # Retried long before the default 30 s ack wait (10 s: a third of it, so the redelivery is the nak's).
        info = await wait_consumer(js, "v1-greeter", lambda info: info.num_redelivered >= 1, timeout=10)
        assert info.num_ack_pending == 1
        await js.add_stream(name="later", subjects=["later.out"])
        await wait_settled(js, "v1-greeter", timeout=15)
    stored = await js.get_last_msg("later", "later.out")
    result = KreNatsMessage()
    result.ParseFromString(stored.data)
    assert greeting(result) == "Hello, patient!"
    assert stored.headers["Nats-Msg-Id"].startswith("greeter:demo-v1-wf:")


async def test_threaded_sync_handlers_with_early_reply(nats_server, js, workflow_stream):
    replies = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "threaded.py", KRT_HANDLER_THREADS="4", KRT_MAX_INFLIGHT="16")
    async with running_node(env, js):
        for i in range(20):
            await js.publish(IN, request_envelope(f"t{i}").SerializeToString())
        await js.publish(IN, request_envelope("early-x").SerializeToString())
        results = await out.take(21)
        [early] = await replies.take(1)
        await wait_settled(js, "v1-greeter")
    assert len(results) == 21
    assert all(greeting(r).startswith("kre-handler") for r in results)
    assert greeting(early) == "early early-x"
    assert len({greeting(r).split()[0] for r in results}) > 1  # more than one worker thread was used


async def test_server_restart_loses_nothing(nats_server, js, workflow_stream, nc):
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "greet.py"), js):
        for i in range(100):
            await js.publish(IN, request_envelope(f"before-{i}", tracking_id=f"b{i}").SerializeToString())
        first = await out.take(100)
        reconnects = nc.stats["reconnects"]
        nats_server.stop()
        await asyncio.sleep(0.5)  # down for a while
        nats_server.start()
        deadline = time.monotonic() + 20
        # This test's client reconnects (the node's, meanwhile).
        while not (nc.stats["reconnects"] > reconnects and nc.is_connected):
            assert time.monotonic() < deadline, "the test's client did not reconnect"
            await asyncio.sleep(0.05)
        for i in range(100):
            await js.publish(IN, request_envelope(f"after-{i}", tracking_id=f"a{i}").SerializeToString())
        second = await out.take(100, timeout=20)
    ids = [r.tracking_id for r in first + second]
    assert sorted(ids) == sorted([f"b{i}" for i in range(100)] + [f"a{i}" for i in range(100)])


async def test_start_fails_clearly_without_the_stream(nats_server, js):
    with pytest.raises(SetupError, match="stream 'demo-v1-wf' does not exist"):
        async with running_node(node_env(nats_server.url, "greet.py"), js):
            pass


async def test_start_fails_when_init_raises(nats_server, js, workflow_stream, tmp_path):
    (tmp_path / "bad_init.py").write_text("def init(ctx):\n    raise RuntimeError('no model file')\n"
                                          "def handler(ctx, data):\n    return None\n")
    env = node_env(nats_server.url, "bad_init.py", KRT_BASE_PATH=str(tmp_path))
    with pytest.raises(StartupError, match="init\\(ctx\\) in .*bad_init.py failed: RuntimeError: no model file"):
        async with running_node(env, js):
            pass
    # No half-running node: nothing was fetched.
    info = await js.consumer_info(STREAM, "v1-greeter")
    assert info.num_waiting == 0 and info.delivered.consumer_seq == 0


async def test_start_fails_on_a_missing_handler_file(nats_server, js, workflow_stream):
    with pytest.raises(HandlerLoadError, match="nope.py does not exist"):
        async with running_node(node_env(nats_server.url, "nope.py"), js):
            pass


@pytest.mark.parametrize(("handler", "where", "says"), [
    ("early_late.py:handler", "thread", "from within the handler itself"),
    ("early_late.py:handler_task", "task", "after the handler returned"),
])
async def test_early_reply_outside_the_running_handler_raises_and_publishes_nothing(
        nats_server, js, workflow_stream, tmp_path, monkeypatch, handler, where, says):
    replies = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    outcomes = tmp_path / "outcomes"
    monkeypatch.setenv("KRE_TEST_OUTCOMES", str(outcomes))  # the node runs in this process
    async with running_node(node_env(nats_server.url, handler), js):
        for name in ("a", "b", "c"):
            await js.publish(IN, request_envelope(name).SerializeToString())
        assert sorted(greeting(o) for o in await out.take(3)) == ["late a", "late b", "late c"]
        await wait_settled(js, "v1-greeter")
        deadline = asyncio.get_running_loop().time() + 10
        while len(outcomes.read_text().splitlines() if outcomes.exists() else []) < 3:
            assert asyncio.get_running_loop().time() < deadline, "the replies were never attempted"
            await asyncio.sleep(0.05)
    lines = outcomes.read_text().splitlines()
    assert all(line.startswith(f"{where} RuntimeError: ") and says in line for line in lines), lines
    assert await replies.nothing_more()


@pytest.mark.parametrize("overrides", [
    {"KRT_HANDLER_PATH": "sqlite_init.py:handler"},  # the default: on the event loop
    {"KRT_HANDLER_PATH": "sqlite_init.py:handler", "KRT_HANDLER_THREADS": "1"},
    {"KRT_HANDLER_PATH": "sqlite_init.py:handler_batch", "KRT_BATCH_SIZE": "8"},
], ids=["loop", "one-thread", "batches"])
async def test_init_runs_on_the_thread_the_handlers_run_on(nats_server, js, workflow_stream, overrides):
    out = await Collector(js, OUT).start()
    async with running_node(node_env(nats_server.url, "sqlite_init.py", **overrides), js):
        for i in range(20):
            await js.publish(IN, request_envelope(f"n{i}").SerializeToString())
        got = await out.take(20)
        await wait_settled(js, "v1-greeter")
    errors = [o.error for o in got if o.error]
    assert not errors, f"{len(errors)} of 20 calls failed: {errors[0]}"
    assert sorted(int(greeting(o).split()[1]) for o in got) == list(range(1, 21))
