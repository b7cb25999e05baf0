"""natsfast.py against a real nats-server: probed on, in order, harmless to the rest, and its fallback."""

from __future__ import annotations

import asyncio
from importlib.metadata import version

import nats
import pytest

from kre_runner.natsfast import Dispatcher, FastPath, Wire, describe, probe

pytestmark = pytest.mark.integration


async def test_the_pinned_nats_py_takes_both_fast_paths(nc):
    # If a nats-py upgrade changes the internals, the node still works (public API) but loses its
    # fast paths: this is the test that says so.
    path = probe(nc)
    assert path == FastPath(receive=True, send=True, reason="")
    assert Dispatcher(nc).direct
    assert describe(path) == f"nats-py {version('nats-py')}: fast paths on (direct MSG dispatch, direct PUB writes)"


async def test_the_probe_checks_behaviour_not_names(nc, monkeypatch):
    monkeypatch.setattr(nc, "_flush_pending", lambda force_flush=False: None)  # there, but not a coroutine
    monkeypatch.setattr(nc, "_pending", ())  # there, but not a list
    path = probe(nc)
    assert path.receive and not path.send
    assert "Client._pending is not a list" in path.reason
    assert "Client._flush_pending(force_flush=...) is not a coroutine function" in path.reason
    assert "fast paths partly off" in describe(path) and ">=2.16,<2.17" in describe(path)


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
