"""natsfast.py against a real nats-server: probed on, in order, harmless to the rest, and its fallback."""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import version

import nats
import pytest
from kre_helpers import STREAM, Collector, greeting, node_env, request_envelope, running_node, wait_settled

import kre_runner.run
from kre_runner.nats.connection import connect
from kre_runner.nats.fast import Dispatcher, FastPath, Wire, check, describe, probe

pytestmark = pytest.mark.integration


async def test_the_pinned_nats_py_takes_both_fast_paths(nc):
    # If a nats-py upgrade changes the internals, the node still works (public API) but loses its
    # fast paths: this is the test that says so.
    path = await probe(nc)
    assert path == FastPath(receive=True, send=True, reason="")
    assert check(nc) == path
    assert Dispatcher(nc).direct
    assert describe(path) == f"nats-py {version('nats-py')}: fast paths on (direct MSG dispatch, direct PUB writes)"


async def test_the_check_looks_at_types_and_signatures_not_just_names(nc, monkeypatch):
    monkeypatch.setattr(nc, "_flush_pending", lambda force_flush=False: None)  # there, but not a coroutine
    monkeypatch.setattr(nc, "_pending", ())  # there, but not a list
    path = check(nc)  # (the probe starts with it, and tries no path it turned off)
    assert path.receive and not path.send
    assert "Client._pending is not a list" in path.reason
    assert "Client._flush_pending(force_flush=...) is not a coroutine function" in path.reason
    assert "fast paths off (send), using the public API" in describe(path) and ">=2.16,<2.17" in describe(path)


async def test_without_the_send_path_publishes_go_through_the_public_api(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        got: list[tuple[str, bytes, dict[str, str] | None]] = []

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            got.append((msg.reply, msg.data, msg.headers))

        await nc.subscribe("out", cb=on_msg)
        for wire in (Wire(nc, FastPath(receive=True, send=False)), Wire(nc)):
            await wire.publish("out", b"plain", reply="r")
            await wire.publish("out", b"with id", msg_id="n:s:1")
        await nc.flush()
        await asyncio.sleep(0.1)
        expected = [("r", b"plain", None), ("", b"with id", {"Nats-Msg-Id": "n:s:1"})]
        assert got == expected * 2  # the same bytes on the wire either way
    finally:
        await nc.close()


async def test_routes_get_every_message_in_order_with_headers_and_other_subscriptions_still_work(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        dispatcher = Dispatcher(nc)
        got: list[tuple[str, str, bytes, dict[str, str] | None]] = []

        async def route(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            got.append((subject, reply, data, headers))

        await dispatcher.subscribe("direct.*", route)
        plain: list[bytes] = []

        async def on_plain(msg: nats.aio.msg.Msg) -> None:
            plain.append(msg.data)

        await nc.subscribe("plain", cb=on_plain)
        for i in range(500):
            await nc.publish(f"direct.{i % 3}", b"%d" % i, reply="r" if i == 0 else "")
        await nc.publish("direct.h", b"with headers", headers={"Nats-Msg-Id": "x1"})
        await nc.publish("plain", b"p")
        await nc.flush()
        await asyncio.sleep(0.1)

        assert [int(data) for _, _, data, _ in got[:500]] == list(range(500))
        assert got[0][:2] == ("direct.0", "r") and got[1][1] == ""
        assert got[500][0] == "direct.h" and got[500][3] == {"Nats-Msg-Id": "x1"}
        assert plain == [b"p"]
    finally:
        await nc.close()


async def test_a_failing_route_is_logged_and_the_connection_keeps_reading(nats_server, caplog):
    nc = await nats.connect(nats_server.url)
    try:
        dispatcher = Dispatcher(nc)
        got: list[bytes] = []

        async def route(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            if data == b"boom":
                raise RuntimeError("route bug")
            got.append(data)

        await dispatcher.subscribe("direct", route)
        for data in (b"1", b"boom", b"2"):
            await nc.publish("direct", data)
        await nc.flush()
        await asyncio.sleep(0.1)
        assert got == [b"1", b"2"]
        assert "route bug" in caplog.text
        # The read loop is alive: a request/reply round trip still works.
        await nc.flush(timeout=2)
        assert nc.is_connected
    finally:
        await nc.close()


async def test_a_msg_arriving_after_unsubscribe_is_dropped(nats_server):
    """A MSG can be on its way when our UNSUB goes out: it must not reach the route any more."""
    nc = await nats.connect(nats_server.url)
    try:
        dispatcher = Dispatcher(nc)
        got: list[bytes] = []

        async def route(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            got.append(data)

        sub = await dispatcher.subscribe("direct", route)
        sid = sub._id
        await nc._ps.parse(b"MSG direct %d 6\r\nbefore\r\n" % sid)  # as the server's bytes reach the parser
        await sub.unsubscribe()
        await nc._ps.parse(b"MSG direct %d 5\r\nafter\r\n" % sid)  # sent by the server before it saw UNSUB
        assert got == [b"before"]
    finally:
        await nc.close()


async def test_after_unsubscribe_a_route_gets_nothing(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        dispatcher = Dispatcher(nc)
        got: list[bytes] = []

        async def route(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            got.append(data)

        sub = await dispatcher.subscribe("direct", route)
        await nc.publish("direct", b"before")
        await nc.flush()  # (the server may deliver a message published just before the UNSUB after its PONG)
        await sub.drain()
        await nc.publish("direct", b"after")
        await nc.flush()
        await asyncio.sleep(0.1)
        assert got == [b"before"]
    finally:
        await nc.close()


async def test_without_the_expected_internals_routes_are_plain_callbacks(nats_server):
    """A nats-py whose parser hook looks different: the node must still get its messages."""
    nc = await nats.connect(nats_server.url)
    try:
        original = nc._process_msg

        async def changed(sid, subject, reply, data, headers, extra=None):  # another signature
            await original(sid, subject, reply, data, headers)

        nc._process_msg = changed
        dispatcher = Dispatcher(nc)
        assert not dispatcher.direct
        got: list[tuple[str, str, bytes]] = []

        async def route(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
            got.append((subject, reply, data))

        await dispatcher.subscribe("fallback", route)
        await nc.publish("fallback", b"x", reply="r")
        await nc.flush()
        await asyncio.sleep(0.1)
        assert got == [("fallback", "r", b"x")]
    finally:
        await nc.close()


# ---------------------------------------------------------------- a nats-py whose internals change meaning
#
# Each stand-in below keeps every name, type and signature the fast paths use (the name checks all
# pass) and changes what one internal means, the way a nats-py release could; nats-py's public API
# keeps working on top of each. The probe must find out by sending and receiving, and the node must
# then run on the public API.


def _replace_flusher(nc, flusher) -> None:
    nc._flusher_task.cancel()
    nc._flusher_task = asyncio.get_running_loop().create_task(flusher())


def flusher_drains_another_buffer(nc) -> None:
    """The flusher and ``_send_command`` use ``_outbox``; ``_pending`` stays a list nobody sends."""
    nc._outbox = []

    async def send_command(cmd: bytes, priority: bool = False) -> None:
        nc._outbox.insert(0, cmd) if priority else nc._outbox.append(cmd)
        nc._pending_data_size += len(cmd)
        if nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size:
            await nc._flush_pending(force_flush=True)

    async def flusher() -> None:
        while True:
            future = await nc._flush_queue.get()
            try:
                if nc._outbox:
                    nc._transport.writelines(nc._outbox)
                    nc._outbox, nc._pending_data_size = [], 0
                    await nc._transport.drain()
            finally:
                if not future.done():
                    future.set_result(None)

    nc._send_command = send_command
    _replace_flusher(nc, flusher)


def flusher_counts_commands(nc) -> None:
    """The write path: the flusher writes the commands ``_send_command`` queued, not ``_pending`` (the fast
    path's own appends there are never written)."""
    queued: list[bytes] = []
    send_command = nc._send_command

    async def counting(cmd: bytes, priority: bool = False) -> None:
        queued.append(cmd)
        await send_command(cmd, priority)

    async def flusher() -> None:
        while True:
            future = await nc._flush_queue.get()
            try:
                commands = queued[:]
                queued.clear()
                nc._pending, nc._pending_data_size = [], 0
                if commands:
                    nc._transport.writelines(commands)
                    await nc._transport.drain()
            finally:
                if not future.done():
                    future.set_result(None)

    nc._send_command = counting
    _replace_flusher(nc, flusher)


def parser_keeps_its_own_handler(nc) -> None:
    """``_process_msg``: the parser calls the handler it took at connect; setting ``nc._process_msg``
    afterwards changes nothing, so MSGs reach subscriptions the public way."""
    handler = nc._process_msg

    class ParsersView:
        def __getattr__(self, name: str):
            return getattr(nc, name)

    view = ParsersView()
    view._process_msg = handler
    nc._ps.nc = view


def status_parsed_elsewhere(nc) -> None:
    """``_process_headers`` no longer reports the inline status (``Status``/``Description``):
    ``_process_msg`` adds it to ``Msg.headers`` itself, so public subscriptions still see it."""
    process_headers, process_msg = nc._process_headers, nc._process_msg
    inside = [False]

    async def headers_only(headers):
        parsed = await process_headers(headers)
        if inside[0] or not parsed:
            return parsed
        return {key: value for key, value in parsed.items() if key not in ("Status", "Description")} or None

    async def with_status(sid, subject, reply, data, headers):
        inside[0] = True
        try:
            await process_msg(sid, subject, reply, data, headers)
        finally:
            inside[0] = False

    nc._process_headers = headers_only
    nc._process_msg = with_status


STAND_INS = {
    "flusher drains another buffer": (flusher_drains_another_buffer, "send",
                                      "not sent within 2s (nats-py's flusher did not write Client._pending"),
    "write path counts commands": (flusher_counts_commands, "send",
                                   "not sent within 2s (nats-py's flusher did not write Client._pending"),
    "parser keeps its own handler": (parser_keeps_its_own_handler, "receive",
                                     "did not come through Client._process_msg in nats-py's reader task"),
    "status parsed elsewhere": (status_parsed_elsewhere, "receive",
                                "a status message (no reply subject) reached the fast path without a Status header"),
}


@pytest.mark.parametrize("name", list(STAND_INS))
async def test_the_probe_turns_a_path_off_when_an_internal_changes_meaning(nc, name):
    break_it, lost, why = STAND_INS[name]
    break_it(nc)
    path = await probe(nc)
    assert (path.receive, path.send) == (lost != "receive", lost != "send"), path
    assert why in path.reason
    assert f"fast paths off ({lost})" in describe(path)
    # What the probe did left the connection as it was: one more round trip, the parser hook restored.
    await nc.flush(timeout=2)
    assert "_process_msg" not in vars(nc) or name == "status parsed elsewhere"


@pytest.mark.parametrize("name", list(STAND_INS))
async def test_with_an_internal_changed_the_node_runs_on_the_public_api(nats_server, js, workflow_stream,
                                                                        monkeypatch, caplog, name):
    break_it, lost, why = STAND_INS[name]

    async def connect_then_break(*args, **kwargs):
        client = await connect(*args, **kwargs)
        break_it(client)
        return client

    monkeypatch.setattr(kre_runner.run, "connect", connect_then_break)
    out = await Collector(js, f"{STREAM}.out").start()
    with caplog.at_level(logging.INFO, logger="kre_runner"):
        async with running_node(node_env(nats_server.url, "greet.py"), js):
            for i in range(20):
                await js.publish(f"{STREAM}.greeter", request_envelope(f"n{i}").SerializeToString())
            results = await out.take(20)
            await wait_settled(js, "v1-greeter")
    assert sorted(greeting(r).split(" init=")[0] for r in results) == sorted(f"Hello, n{i}!" for i in range(20))
    [line] = [r.getMessage() for r in caplog.records if "fast paths" in r.getMessage()]
    assert f"fast paths off ({lost})" in line and why in line
