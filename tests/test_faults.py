"""Faults a node survives on a real nats-server: transient failures, poison messages, a deleted
consumer or stream, large messages, lost acks, the original runner's push consumer, drift."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

import aiohttp
import nats
import pytest
from kre_helpers import (
    STREAM,
    Collector,
    greeting,
    node_env,
    request_envelope,
    running_node,
    start_process,
    wait_ready,
    wait_settled,
)
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from kre_runner.dev.embedded import free_port
from kre_runner.errors import SetupError
from kre_runner.node.pulling import PullLink

pytestmark = pytest.mark.integration

IN = f"{STREAM}.greeter"
OUT = f"{STREAM}.out"
ENTRY = f"{STREAM}.entrypoint"
CONSUMER = "v1-greeter"
DEAD = f"{STREAM}-dead-letter"


async def _until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def _calls() -> dict[str, int]:
    return next(m.CALLS for name, m in sys.modules.items() if name.startswith("_kre_user_poison"))


async def _dead_letters(js, count: int, timeout: float = 15.0) -> list[nats.js.api.RawStreamMsg]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(NotFoundError):
            info = await js.stream_info(DEAD)
            if info.state.messages >= count:
                return [await js.get_msg(DEAD, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} dead letters after {timeout}s")


async def test_a_handler_asks_for_a_retry_and_then_succeeds(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    entry = await Collector(js, ENTRY).start()
    async with running_node(node_env(nats_server.url, "poison.py"), js):
        await js.publish(IN, request_envelope("flaky-2").SerializeToString())
        [result] = await out.take(1)
        await wait_settled(js, CONSUMER)
        assert await entry.nothing_more()
    assert greeting(result) == "ok flaky-2"
    assert _calls()["flaky-2"] == 3  # two retries, then the answer


async def test_retries_spent_the_input_is_dead_lettered_and_the_entrypoint_told(nats_server, js, workflow_stream):
    entry = await Collector(js, ENTRY).start()
    sent = request_envelope("always-retry", tracking_id="t-dl", reply="r-dl").SerializeToString()
    async with running_node(node_env(nats_server.url, "poison.py", KRT_MAX_DELIVER="3"), js):
        await js.publish(IN, sent)
        await js.publish(IN, request_envelope("fine").SerializeToString())
        [letter] = await _dead_letters(js, 1)
        [error] = await entry.take(1)
        await wait_settled(js, CONSUMER)
    assert _calls()["always-retry"] == 3
    assert letter.subject == f"{DEAD}.greeter" and letter.data == sent
    headers = letter.headers or {}
    assert {k: headers[k] for k in ("Kre-Subject", "Kre-Stream", "Kre-Sequence", "Kre-Deliveries", "Kre-Node")} == {
        "Kre-Subject": IN, "Kre-Stream": STREAM, "Kre-Sequence": "1", "Kre-Deliveries": "3", "Kre-Node": "greeter"}
    assert headers["Kre-Error"] == "the handler asked for a retry: database down"
    assert headers["Kre-Time"].endswith("Z")
    assert (error.tracking_id, error.reply) == ("t-dl", "r-dl")
    assert error.error == ("error in 'greeter': dead-lettered after 3 deliveries: "
                           "the handler asked for a retry: database down")
    with pytest.raises(NotFoundError):
        await js.get_msg(STREAM, 1)  # removed from the input (terminated, no interest left)


async def test_an_output_that_can_never_be_stored_is_dead_lettered(nats_server, js, workflow_stream):
    env = node_env(nats_server.url, "poison.py", KRT_MAX_DELIVER="2", KRT_NATS_OUTPUT="nowhere.out")
    async with running_node(env, js):
        await js.publish(IN, request_envelope("unstorable").SerializeToString())
        [letter] = await _dead_letters(js, 1)
        await wait_settled(js, CONSUMER)
    assert "no JetStream stream captures the subject" in (letter.headers or {})["Kre-Error"]
    assert (letter.headers or {})["Kre-Deliveries"] == "2"


async def test_an_input_that_kills_the_process_every_time_is_dead_lettered(nats_server, js, workflow_stream,
                                                                          tmp_path):
    calls = tmp_path / "calls"
    env = node_env(nats_server.url, "poison.py", KRT_MAX_DELIVER="2", KRT_ACK_WAIT="1", CALLS_FILE=str(calls))
    out = await Collector(js, OUT).start()
    first = start_process(env)
    await wait_ready(js, CONSUMER)
    await js.publish(IN, request_envelope("die").SerializeToString())
    await js.publish(IN, request_envelope("after").SerializeToString())
    procs = [first]
    deadline = time.monotonic() + 40
    try:
        while time.monotonic() < deadline:
            # The pod restarts, as Kubernetes would restart it.
            if procs[-1].poll() is not None:
                procs.append(start_process(env))
            with contextlib.suppress(NotFoundError):
                if (await js.stream_info(DEAD)).state.messages:
                    break
            await asyncio.sleep(0.2)
        [letter] = await _dead_letters(js, 1, timeout=1)
        [after] = await out.take(1, timeout=15)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)
    assert calls.read_text().split().count("die") == 2  # KRT_MAX_DELIVER attempts, then no more
    assert (letter.headers or {})["Kre-Error"].startswith("the handler ran 2 times (KRT_MAX_DELIVER) with no outcome")
    assert greeting(after) == "ok after"


async def _http(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}",
                                                               timeout=aiohttp.ClientTimeout(total=5)) as response:
        return response.status, await response.text()


async def _metric(port: int, name: str) -> float:
    _, text = await _http(port, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return -1.0  # not exposed


async def test_a_dead_letter_the_stream_refuses_is_held_then_stored_never_stranded(nats_server, js, workflow_stream):
    # The dead-letter stream is full and discards new messages: it refuses every copy until there is room.
    await js.add_stream(StreamConfig(name=DEAD, subjects=[f"{DEAD}.>"], max_msgs=1, discard=DiscardPolicy.NEW))
    await js.publish(f"{DEAD}.other", b"an older dead letter")
    entry = await Collector(js, ENTRY).start()
    port = free_port()
    env = node_env(nats_server.url, "poison.py", KRT_MAX_DELIVER="2", KRT_ACK_WAIT="2", KRT_HTTP_PORT=str(port))
    async with running_node(env, js):
        await js.publish(IN, request_envelope("always-retry", tracking_id="t-held").SerializeToString())
        # Refused again and again (retried from the node) while JetStream would have redelivered it after each
        # ack wait: the node holds it with keep-alives, and uses no delivery beyond KRT_MAX_DELIVER.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            info = await js.consumer_info(STREAM, CONSUMER)
            if info.delivered.consumer_seq > 2 or await _metric(port, "kre_dead_letter_failures_total") >= 4:
                break
            await asyncio.sleep(0.2)
        assert (info.delivered.consumer_seq, info.num_ack_pending) == (2, 1)
        assert await _metric(port, "kre_dead_letter_held_messages") == 1
        status, body = await _http(port, "/readyz")
        assert status == 503 and "cannot dead-letter" in body and "maximum messages exceeded" in body
        assert await entry.nothing_more()  # no error envelope claims a dead letter that is not stored
        await js.purge_stream(DEAD)  # room again
        [letter] = await _dead_letters(js, 1)
        [error] = await entry.take(1)
        await wait_settled(js, CONSUMER)
        assert await _metric(port, "kre_dead_letter_held_messages") == 0
        assert (await _http(port, "/readyz"))[0] == 200
        info = await js.consumer_info(STREAM, CONSUMER)
    assert info.delivered.consumer_seq == 2  # no further delivery was needed
    assert (letter.headers or {})["Kre-Sequence"] == "1"
    assert error.tracking_id == "t-held"
    assert error.error.startswith("error in 'greeter': dead-lettered after 2 deliveries")
    with pytest.raises(NotFoundError):
        await js.get_msg(STREAM, 1)  # terminated: gone from the workflow stream


async def test_a_deleted_consumer_is_recreated_and_consumption_resumes(nats_server, js, workflow_stream, caplog,
                                                                       monkeypatch):
    floors: list[int | None] = []  # the ack floor the node knows, after each look at its consumer
    look = PullLink.look

    async def looked(self: PullLink) -> None:
        await look(self)
        floors.append(self.ack_floor)

    monkeypatch.setattr(PullLink, "look", looked)
    out = await Collector(js, OUT).start()
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(node_env(nats_server.url, "poison.py"), js):
            for i in range(5):
                last = await js.publish(IN, request_envelope(f"before-{i}").SerializeToString())
            assert len(await out.take(5)) == 5
            # The node has looked at its consumer since all five were acked (it does every 5 s): the
            # recreated consumer starts after them.
            await _until(lambda: bool(floors) and (floors[-1] or 0) >= last.seq, timeout=10)
            await js.delete_consumer(STREAM, CONSUMER)
            started = time.monotonic()
            await wait_ready(js, CONSUMER, timeout=10)
            recovered = time.monotonic() - started
            for i in range(100):
                await js.publish(IN, request_envelope(f"after-{i}").SerializeToString())
            after = await out.take(100, timeout=15)
            assert await out.nothing_more()
    assert sorted(greeting(r) for r in after) == sorted(f"ok after-{i}" for i in range(100))
    assert "is gone (409 Consumer Deleted): recreating it" in caplog.text
    assert re.search(r"recreated durable pull consumer v1-greeter on stream demo-v1-wf, starting at stream seq \d+",
                     caplog.text)
    # "409 Consumer Deleted" on the open pull request: recreated at once (5 s: the margin for a loaded machine).
    assert recovered < 5


async def test_a_deleted_and_recreated_stream_is_picked_up(nats_server, js, workflow_stream, caplog):
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(node_env(nats_server.url, "poison.py"), js):
            await js.delete_stream(STREAM)
            await _until(lambda: "stream demo-v1-wf (KRT_NATS_STREAM) does not exist" in caplog.text)  # it notices
            await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"],
                                             retention=RetentionPolicy.INTEREST))
            await wait_ready(js, CONSUMER, timeout=10)
            out = await Collector(js, OUT).start()
            await js.publish(IN, request_envelope("reborn").SerializeToString())
            [result] = await out.take(1)
    assert greeting(result) == "ok reborn"
    assert "stream demo-v1-wf (KRT_NATS_STREAM) does not exist: waiting for it; the node is not ready" in caplog.text


async def test_a_backlog_of_large_envelopes_drains_without_a_slow_consumer(nats_server, js, workflow_stream, caplog):
    count, size = 120, 700_000  # 84 MB: over nats-server's 64 MB per-connection buffer if pulled at once
    # Each input keeps the node busy 20 ms (a model on the event loop): it does not read its socket meanwhile.
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "poison.py")
    async with running_node(env, js):
        pass  # the consumer exists: the backlog waits for the node
    for i in range(count):
        await js.publish(IN, request_envelope(f"pad:{i}:" + "x" * size, reply="r").SerializeToString())
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(env, js):
            results = await out.take(count, timeout=60)
            await wait_settled(js, CONSUMER, timeout=30)
            info = await js.consumer_info(STREAM, CONSUMER)
    assert len(results) == count and len({r.tracking_id for r in results}) == count
    assert info.num_redelivered == 0
    assert "disconnected" not in caplog.text and "Slow Consumer" not in caplog.text


async def test_the_original_runners_push_consumer_is_taken_over_without_losing_messages(nats_server, js,
                                                                                         workflow_stream, caplog):
    # The original runner's consumer, as it left it: durable push, deliver group, acks explicit, NEW.
    await js.add_consumer(STREAM, ConsumerConfig(durable_name=CONSUMER, deliver_subject="original.deliver",
                                                 deliver_group=CONSUMER, filter_subject=IN,
                                                 ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW))
    # The original runner is stopped; requests keep coming (interest retention: the push consumer keeps them).
    for i in range(10):
        await js.publish(IN, request_envelope(f"waiting-{i}").SerializeToString())
    out = await Collector(js, OUT).start()
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(node_env(nats_server.url, "poison.py"), js):
            results = await out.take(10)
            await wait_settled(js, CONSUMER)
            info = await js.consumer_info(STREAM, CONSUMER)
    assert sorted(greeting(r) for r in results) == sorted(f"ok waiting-{i}" for i in range(10))
    assert info.config.deliver_subject is None
    names = [c.name for c in await js.consumers_info(STREAM)]
    assert "v1-greeter-migrating" not in names
    assert "taking it over from seq 1 without a gap" in caplog.text


async def test_a_push_consumer_is_refused_when_migration_is_off(nats_server, js, workflow_stream):
    await js.add_consumer(STREAM, ConsumerConfig(durable_name=CONSUMER, deliver_subject="original.deliver",
                                                 filter_subject=IN, ack_policy=AckPolicy.EXPLICIT))
    env = node_env(nats_server.url, "poison.py", KRT_MIGRATE_PUSH_CONSUMER="false")
    with pytest.raises(SetupError, match="is a push consumer .* KRT_MIGRATE_PUSH_CONSUMER=false"):
        async with running_node(env, js):
            pass


async def test_drift_updatable_fields_are_updated_and_logged(nats_server, js, workflow_stream, caplog):
    await js.add_consumer(STREAM, ConsumerConfig(durable_name=CONSUMER, filter_subject=IN, ack_wait=7,
                                                 ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW,
                                                 max_deliver=-1))
    env = node_env(nats_server.url, "poison.py", KRT_DELIVER_POLICY="all", KRT_ACK_WAIT="12", KRT_MAX_DELIVER="4")
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(env, js):
            info = await js.consumer_info(STREAM, CONSUMER)
    assert (info.config.ack_wait, info.config.max_deliver, info.config.deliver_policy) == (12, 6, DeliverPolicy.NEW)
    assert "updated consumer v1-greeter: ack_wait 7.0 -> 12.0 (KRT_ACK_WAIT)" in caplog.text
    assert "updated consumer v1-greeter: max_deliver -1 -> 6 (KRT_MAX_DELIVER + 2)" in caplog.text
    assert "KRT_DELIVER_POLICY=all does not apply: consumer v1-greeter exists" in caplog.text


async def test_drift_in_a_fixed_field_stops_the_start_in_one_line(nats_server, js, workflow_stream):
    await js.add_consumer(STREAM, ConsumerConfig(durable_name=CONSUMER, filter_subject=IN,
                                                 ack_policy=AckPolicy.ALL))
    with pytest.raises(SetupError, match=r"ack_policy is 'all', the node needs 'explicit'\): delete it .*"
                                         r"nats consumer rm demo-v1-wf v1-greeter"):
        async with running_node(node_env(nats_server.url, "poison.py"), js):
            pass


async def test_a_stream_that_does_not_capture_the_input_stops_the_start(nats_server, js):
    await js.add_stream(StreamConfig(name=STREAM, subjects=["elsewhere.*"]))
    with pytest.raises(SetupError, match=r"does not capture KRT_NATS_INPUT=demo-v1-wf.greeter \(its subjects: "
                                         r"elsewhere\.\*\)"):
        async with running_node(node_env(nats_server.url, "poison.py"), js):
            pass


async def test_publishes_waiting_for_a_pub_ack_are_resent_at_once_after_a_reconnect(nats_server, js, nc,
                                                                                      workflow_stream, caplog):
    # A listener that never answers stands where the output stream should be: the node's outputs are
    # sent, and wait for PubAcks that cannot come. Then the stream appears and the connection drops.
    swallowed: list[bytes] = []
    all_sent = asyncio.Event()

    async def swallow(msg: nats.aio.msg.Msg) -> None:
        swallowed.append(msg.data)
        if len(swallowed) == 50:
            all_sent.set()

    sub = await nc.subscribe("later.out", cb=swallow)
    env = node_env(nats_server.url, "poison.py", KRT_NATS_OUTPUT="later.out", KRT_PUBLISH_TIMEOUT="60")
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(env, js):
            for i in range(50):
                await js.publish(IN, request_envelope(f"r{i}").SerializeToString())
            await asyncio.wait_for(all_sent.wait(), 10)
            await sub.unsubscribe()
            await js.add_stream(StreamConfig(name="later", subjects=["later.out"]))
            reconnects = nc.stats["reconnects"]
            nats_server.stop()
            nats_server.start()
            # This test's client reconnects (the node's, meanwhile).
            await _until(lambda: nc.stats["reconnects"] > reconnects and nc.is_connected)
            # Far sooner than the 60 s publish timeout and the 30 s ack wait:
            await wait_settled(js, CONSUMER, timeout=15)
    assert len(swallowed) == 50
    assert (await js.stream_info("later")).state.messages == 50
    assert "reconnected: published again the 50 outputs waiting for their PubAck" in caplog.text


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kre_runner", "dead-letter", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


async def test_dead_letter_tool_lists_shows_replays_and_purges(nats_server, js, workflow_stream):
    out = await Collector(js, OUT).start()
    cli_env = {"KRT_NATS_SERVER": nats_server.url, "KRT_NATS_STREAM": STREAM}
    async with running_node(node_env(nats_server.url, "poison.py", KRT_MAX_DELIVER="1"), js):
        await js.publish(IN, request_envelope("flaky-1", tracking_id="t-replay").SerializeToString())
        await js.publish(IN, request_envelope("always-retry").SerializeToString())
        await _dead_letters(js, 2)

        listed = await asyncio.to_thread(_cli, "list", env=cli_env)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[-1] == f"2 dead letter(s) in {DEAD}"
        assert "greeter  demo-v1-wf.greeter seq 1  (1 deliveries): the handler asked for a retry: GPU busy" in lines[0]

        shown = await asyncio.to_thread(_cli, "show", "1", env=cli_env)
        assert shown.returncode == 0 and json.loads(shown.stdout)["tracking_id"] == "t-replay"

        replayed = await asyncio.to_thread(_cli, "replay", "1", env=cli_env)
        assert replayed.returncode == 0 and replayed.stdout.strip() == f"replayed 1 to {IN}"
        [result] = await out.take(1)  # the second call of flaky-1 succeeds
        assert result.tracking_id == "t-replay" and greeting(result) == "ok flaky-1"

        purged = await asyncio.to_thread(_cli, "purge", "--all", env=cli_env)
        assert purged.returncode == 0 and purged.stdout.strip() == "purged 2"
        assert (await js.stream_info(DEAD)).state.messages == 0

    usage = await asyncio.to_thread(_cli, "replay", env=cli_env)
    assert usage.returncode == 2 and "replay needs dead-letter sequence numbers or --all" in usage.stderr
    unknown = await asyncio.to_thread(_cli, "show", "99", env=cli_env)
    assert unknown.returncode == 1 and f"no dead letter 99 in {DEAD}" in unknown.stderr
