"""Every use of nats-py's private internals, behind one probe: the node's fast paths in and out.

Two busy streams of bytes cross nats-py on every message, and its public API costs more than the
node's own work for them:

* **In**: nats-py hands each MSG to a subscription through a ``Msg``, an ``asyncio.Queue`` and the
  subscription's task (~25k CPU instructions; a node receives two MSGs per input: the input and
  its output's PubAck). :class:`Dispatcher` takes the MSGs of chosen subscriptions straight from
  the protocol parser (``Client._process_msg``) and awaits their route in the reader task.
* **Out**: ``Client.publish`` re-validates and re-encodes a header dict on every call.
  :class:`Wire` writes ``PUB``/``HPUB`` lines into the outgoing buffer (``Client._pending``) and
  wakes the flusher as ``Client._send_command`` would, without its coroutine.

:func:`probe` checks, once connected and before the consumer starts, that the installed nats-py
behaves as these paths expect: types, coroutine-ness and signatures (:func:`check`), then a message
through each path to a private inbox, since internals can keep their names and change meaning.
:func:`describe` says the outcome in one line at start. Where a path fails, routes are plain
subscription callbacks and publishes go through the public API: slower, never wrong.
``tests/test_natsfast.py`` fails when the pinned nats-py loses a path, and breaks each internal
(names kept, meaning changed) to see the probe turn its path off.

Rules for routes (they run in nats-py's reader task): never raise (the read loop would stop;
the dispatcher logs and swallows) and never wait for something only the server's next bytes can
bring (a flush, a request): the reader that would read them is the one waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import MaxPayloadError

__all__ = ["PROBE_TIMEOUT", "TESTED_NATS_PY", "Dispatcher", "FastPath", "Route", "Wire", "check", "describe", "probe"]

# The nats-py releases these paths were tested with (pyproject.toml pins the same range).
TESTED_NATS_PY = ">=2.16,<2.17"

# (subject, reply, data, headers) of one MSG.
Route = Callable[[str, str, bytes, "dict[str, str] | None"], Awaitable[None]]

_FLUSH_WAIT = 5.0  # seconds a publish waits for a full outgoing buffer to be written
PROBE_TIMEOUT = 2.0  # seconds each of the probe's two tries waits for its messages
_PROBE_DATA = b"kre-runner fast path probe"
_PROBE_REPLY = "kre-probe-reply"
_PROBE_MISSING = "kre-probe-no-such-consumer"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPath:
    """Which fast paths this connection can take, and why not when it cannot."""

    receive: bool
    send: bool
    reason: str = ""


def check(nc: Client) -> FastPath:
    """What can be seen without I/O: the types, coroutine-ness and signatures both paths rely on.

    Names can stay while meanings change: :func:`probe` adds a message through each path. Alone,
    this is the default for a :class:`Dispatcher` or :class:`Wire` given no probe result (tests,
    benchmarks on a stand-in client).
    """
    problems: list[str] = []
    process_msg = getattr(nc, "_process_msg", None)
    if not inspect.iscoroutinefunction(process_msg):
        problems.append("Client._process_msg is not a coroutine function")
    elif list(inspect.signature(process_msg).parameters) != ["sid", "subject", "reply", "data", "headers"]:
        problems.append(f"Client._process_msg takes {list(inspect.signature(process_msg).parameters)}")
    if not inspect.iscoroutinefunction(getattr(nc, "_process_headers", None)):
        problems.append("Client._process_headers is not a coroutine function")
    if not isinstance(getattr(nc, "_subs", None), dict):
        problems.append("Client._subs is not a dict")
    receive = not problems

    send_problems: list[str] = []
    if not isinstance(getattr(nc, "_pending", None), list):
        send_problems.append("Client._pending is not a list")
    for name in ("_pending_data_size", "_max_pending_size", "_max_payload"):
        if not isinstance(getattr(nc, name, None), int):
            send_problems.append(f"Client.{name} is not an int")
    flush = getattr(nc, "_flush_pending", None)
    if not inspect.iscoroutinefunction(flush) or "force_flush" not in inspect.signature(flush).parameters:
        send_problems.append("Client._flush_pending(force_flush=...) is not a coroutine function")
    queue = getattr(nc, "_flush_queue", None)
    if not (queue is None or isinstance(queue, asyncio.Queue)):
        send_problems.append("Client._flush_queue is not an asyncio.Queue")
    problems += send_problems
    return FastPath(receive=receive, send=not send_problems, reason="; ".join(problems))


async def probe(nc: Client, timeout: float = PROBE_TIMEOUT) -> FastPath:
    """Try both paths once on the connected ``nc``: what nats-py does, not only what it names.

    After :func:`check`, a MSG and a JetStream status message come in through a :class:`Dispatcher`
    (the receive path), and a ``PUB`` and an ``HPUB`` go out through a :class:`Wire` (the send path);
    a path whose message is lost, late or different is off. Each of the two tries waits at most
    ``timeout`` seconds, so a start never hangs on it. Private inboxes only: nothing is stored, no
    other subscriber sees anything.
    """
    static = check(nc)
    receive, send = static.receive, static.send
    problems = [static.reason] if static.reason else []
    if receive:
        problem = await _attempt("receive", _try_receive, nc, timeout)
        receive = not problem
        problems += [problem] if problem else []
    if send:
        problem = await _attempt("send", _try_send, nc, timeout)
        send = not problem
        problems += [problem] if problem else []
    return FastPath(receive=receive, send=send, reason="; ".join(problems))


async def _attempt(name: str, attempt: Callable[[Client, float], Awaitable[str]], nc: Client, timeout: float) -> str:
    """One try; what went wrong, or "" when the path works."""
    try:
        return await attempt(nc, timeout)
    except Exception as exc:  # a connection failing now fails the node soon anyway: no fast path meanwhile
        return f"the {name} path's probe failed: {type(exc).__name__}: {exc}"


async def _try_receive(nc: Client, timeout: float) -> str:
    """A MSG with a header and a status message, sent the public way, received by a direct route."""
    inbox = nc.new_inbox()
    reader = getattr(nc, "_reading_task", None)
    got: dict[str, tuple[str, bytes, dict[str, str] | None, bool]] = {}
    both = asyncio.Event()

    async def route(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        # Routes must run in the reader task (see the module's rules), called by our parser hook.
        got[subject] = (reply, data, headers, reader is not None and asyncio.current_task() is reader)
        if len(got) == 2:
            both.set()

    dispatcher = Dispatcher(nc, FastPath(receive=True, send=False))
    try:
        sub = await dispatcher.subscribe(inbox + ".*", route)
        try:
            await nc.publish(inbox + ".msg", _PROBE_DATA, reply=_PROBE_REPLY, headers={"Kre-Probe": "1"})
            # A pull request for a consumer that does not exist: the server answers with a status
            # message (503, no responders), as it ends real pull requests with 404/408/409.
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{_PROBE_MISSING}.{_PROBE_MISSING}", b'{"batch":1}',
                             reply=inbox + ".status")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(both.wait(), timeout)
        finally:
            await sub.unsubscribe()
    finally:
        dispatcher.close()

    msg, status = got.get(inbox + ".msg"), got.get(inbox + ".status")
    if msg is None:
        return f"a MSG for a direct route did not arrive within {timeout:g}s"
    if not msg[3]:
        return "a MSG for a direct route did not come through Client._process_msg in nats-py's reader task"
    if msg[:3] != (_PROBE_REPLY, _PROBE_DATA, {"Kre-Probe": "1"}):
        return f"a MSG reached its direct route altered: {msg[:3]!r}"
    if status is None:
        return f"the status answer to a pull request did not arrive within {timeout:g}s"
    reply, data, headers, _ = status
    code = (headers or {}).get("Status", "")
    # The consumer tells status messages from inputs by the missing reply subject, and reads the
    # code from the Status header (as the PubAck route reads 503).
    if reply or data or not (len(code) == 3 and code.isdigit()):
        return (f"a status message (no reply subject) reached the fast path without a Status header: "
                f"reply {reply!r}, headers {headers!r}")
    return ""


async def _try_send(nc: Client, timeout: float) -> str:
    """A ``PUB`` and an ``HPUB`` written by a Wire, with no flush after them, received the public way."""
    inbox = nc.new_inbox()
    got: dict[str, tuple[str, bytes, dict[str, str] | None]] = {}
    both = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        got[msg.subject] = (msg.reply, msg.data, msg.headers)
        if len(got) == 2:
            both.set()

    sub = await nc.subscribe(inbox + ".*", cb=on_msg)
    try:
        # Nothing of ours is waiting to be written after this, so only the Wire's own wake-up of
        # the flusher can send what it writes: as for a pull request sent from a route.
        await nc.flush(timeout)
        wire = Wire(nc, FastPath(receive=False, send=True))
        await wire.publish(inbox + ".pub", _PROBE_DATA, reply=_PROBE_REPLY)
        await wire.publish(inbox + ".hpub", _PROBE_DATA, msg_id="kre-probe")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(both.wait(), timeout)
    finally:
        await sub.unsubscribe()

    expected = {inbox + ".pub": (_PROBE_REPLY, _PROBE_DATA, None),
                inbox + ".hpub": ("", _PROBE_DATA, {"Nats-Msg-Id": "kre-probe"})}
    if len(got) < 2:
        return (f"a PUB written by the fast path was not sent within {timeout:g}s (nats-py's flusher did not "
                f"write Client._pending after Client._flush_pending())")
    if got != expected:
        return f"what the fast path wrote arrived altered: {got!r}"
    return ""


def describe(path: FastPath) -> str:
    """One line for the start-up log."""
    version = _nats_py_version()
    if path.receive and path.send:
        return f"nats-py {version}: fast paths on (direct MSG dispatch, direct PUB writes)"
    off = " and ".join(name for name, on in (("receive", path.receive), ("send", path.send)) if not on)
    return (f"nats-py {version} (tested: {TESTED_NATS_PY}): fast paths off ({off}), using the public API "
            f"instead (slower, same behaviour): {path.reason}")


def _nats_py_version() -> str:
    try:
        return importlib.metadata.version("nats-py")
    except importlib.metadata.PackageNotFoundError:
        return "?"


class Dispatcher:
    """Routes the MSGs of chosen subscriptions of one connection straight to their handlers."""

    def __init__(self, nc: Client, path: FastPath | None = None) -> None:
        self._nc = nc
        self._routes: dict[int, Route] = {}
        self._direct = (path or check(nc)).receive
        if self._direct:
            self._hooked_instance = "_process_msg" in vars(nc)  # already replaced on this client (a stand-in)
            self._nats_process_msg = nc._process_msg
            nc._process_msg = self._process_msg  # type: ignore[method-assign]  # the parser calls nc._process_msg

    @property
    def direct(self) -> bool:
        """Whether routes bypass nats-py's subscription queues (False: plain callbacks)."""
        return self._direct

    def close(self) -> None:
        """Give the parser hook back (the probe's dispatcher lives only as long as the probe)."""
        if self._direct and vars(self._nc).get("_process_msg") == self._process_msg:
            if self._hooked_instance:
                self._nc._process_msg = self._nats_process_msg  # type: ignore[method-assign]
            else:
                del self._nc._process_msg
        self._routes.clear()

    async def subscribe(self, subject: str, route: Route) -> Subscription:
        """Subscribe to ``subject`` with ``route`` as its handler (no pending limits: credits bound it)."""

        async def callback(msg: Msg) -> None:  # only used without the direct path
            await route(msg.subject, msg.reply, msg.data, msg.headers)

        sub = await self._nc.subscribe(subject, cb=callback, pending_msgs_limit=-1, pending_bytes_limit=-1)
        if self._direct:
            self._routes[sub._id] = route
        return sub

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        route = self._routes.get(sid)
        # A MSG can arrive after our UNSUB went out (it was already on its way): nats-py has forgotten
        # the subscription by then and drops it; so must we.
        if route is None or sid not in self._nc._subs:
            await self._nats_process_msg(sid, subject, reply, data, headers)
            return
        try:
            parsed = await self._nc._process_headers(headers) if headers else None
            await route(subject.decode(), reply.decode(), data, parsed)
        except Exception:  # an exception here would end nats-py's read loop, and with it the connection
            _log.exception("handling a message on %s failed", subject.decode(errors="replace"))


class Wire:
    """``PUB``/``HPUB`` straight into nats-py's outgoing buffer; its public API when not connected."""

    def __init__(self, nc: Client, path: FastPath | None = None) -> None:
        self._nc = nc
        self._fast = (path or check(nc)).send

    async def publish(self, subject: str, payload: bytes, reply: str = "", msg_id: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
        """Publish; ``headers`` (rare: dead letters) go through the public API."""
        nc = self._nc
        if not self._fast or not nc.is_connected or headers is not None:
            # Reconnecting: the public API applies nats-py's buffering limits and closed-state errors.
            if msg_id is not None:
                headers = {**(headers or {}), "Nats-Msg-Id": msg_id}
            await nc.publish(subject, payload, reply=reply, headers=headers)
            return
        size = len(payload)
        if size > nc._max_payload:
            raise MaxPayloadError
        if msg_id is None:
            command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), size, payload)
        else:
            header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % msg_id.encode()
            command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), reply.encode(), len(header),
                                                           len(header) + size, header, payload)
        # What nats-py's _send_command does, without its coroutine: queue the bytes, and wake the
        # flusher task, or wait for it when the buffer is over its limit: backpressure, bounded,
        # since this may run in the reader task.
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        if nc._max_pending_size > 0 and nc._pending_data_size > nc._max_pending_size:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(nc._flush_pending(force_flush=True), _FLUSH_WAIT)
        elif nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
