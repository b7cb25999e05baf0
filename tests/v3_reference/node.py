"""An independent KRE 3.x node (kre-py 3.4.1's contract), written only from the reference document.

Run as a process: ``python tests/v3_reference/node.py`` with the 3.x variables set. What it does, as
the reference describes the original: per input subject a durable push consumer with a deliver group,
both named ``{subject with '.' -> '-'}-{KRT_NODE_NAME}``, ``DeliverPolicy.NEW``, ack wait 22 hours,
``max_ack_pending = KRT_NATS_MAX_ACK_PENDING`` (an int); one message at a time per subscription; the
envelope decoded; ``custom_handlers[from_node]`` or ``default_handler`` called for every input,
whatever its message type; a raising handler's error envelope published to the output subject; the
input acked after the handler returns or raises. The original's bugs that would make tests flaky are
left out: no ``stream_info`` before each publish, no ``gc.collect()`` per message, and a failed publish
is not swallowed (the input is then left unacked). Not provided: ``ctx.db``, ``ctx.measurement``,
``ctx.prediction`` and the timing point (no test here needs them). It imports nothing of kre-runner.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError

sys.path.insert(0, str(Path(__file__).parent))

import wire

ACK_WAIT = 22 * 3600.0  # the original's value (seconds)
SCOPES = {"project": "KRT_NATS_KEY_VALUE_STORE_PROJECT", "workflow": "KRT_NATS_KEY_VALUE_STORE_WORKFLOW",
          "node": "KRT_NATS_KEY_VALUE_STORE_NODE"}


class Configuration:
    """``ctx.configuration``: one bucket per scope, every read a round trip (as the original)."""

    def __init__(self, buckets: dict[str, Any]) -> None:
        self._buckets = buckets

    async def set(self, key: str, value: str, scope: str = "node") -> None:
        await self._buckets[scope].put(key, value.encode())

    async def get(self, key: str, scope: str | None = None) -> str:
        if scope is not None:
            return (await self._buckets[scope].get(key)).value.decode()
        for name in ("node", "workflow", "project"):
            try:
                entry = await self._buckets[name].get(key)
            except KeyNotFoundError:
                continue
            return entry.value.decode()
        raise KeyError(f"no value found for key {key!r} in any scope")

    async def delete(self, key: str, scope: str = "node") -> None:
        await self._buckets[scope].delete(key)


class ObjectStore:
    """``ctx.object_store`` on ``KRT_NATS_OBJECT_STORE`` through nats-py's object store."""

    def __init__(self, store: Any, js: Any, bucket: str) -> None:
        self._store = store
        self._js = js
        self._bucket = bucket

    async def save(self, key: str, data: bytes) -> None:
        if not data:
            raise ValueError("empty payload")
        await self._store.put(key, data)

    async def get(self, key: str) -> bytes:
        # The object's chunks, read with a pull consumer on its chunk subject (the JetStream object-store
        # format), bounded in time: a read that races a replace of the same key (its chunks purged) fails
        # in 5 s instead of waiting forever as nats-py 2.16's reader does.
        info = await self._store.get_info(key)
        if not info.chunks:
            return b""
        sub = await self._js.pull_subscribe(f"$O.{self._bucket}.C.{info.nuid}", stream=f"OBJ_{self._bucket}")
        try:
            data = bytearray()
            while len(data) < info.size:
                for msg in await sub.fetch(min(64, info.chunks), timeout=5):
                    data += msg.data
            return bytes(data)
        finally:
            await sub.unsubscribe()

    async def delete(self, key: str) -> None:
        await self._store.delete(key)


class Context:
    """The 3.x ctx for one input."""

    def __init__(self, node: Node, message: Any) -> None:
        self._node = node
        self._message = message
        self.logger = node.logger
        self.configuration = node.configuration
        self.object_store = node.object_store

    def path(self, relative: str) -> str:
        return os.path.join(self._node.base_path, relative)

    def get_request_id(self) -> str:
        return self._message.request_id

    def is_message_ok(self) -> bool:
        return self._message.message_type == wire.OK

    def is_message_error(self) -> bool:
        return self._message.message_type == wire.ERROR

    def is_message_early_reply(self) -> bool:
        return self._message.message_type == wire.EARLY_REPLY

    def is_message_early_exit(self) -> bool:
        return self._message.message_type == wire.EARLY_EXIT

    async def send_output(self, msg: Any, channel: str = "") -> None:
        await self._send(msg, wire.OK, channel, pack=True)

    async def send_any(self, any_msg: Any, channel: str = "") -> None:
        await self._send(any_msg, wire.OK, channel, pack=False)

    async def send_early_reply(self, msg: Any, channel: str = "") -> None:
        await self._send(msg, wire.EARLY_REPLY, channel, pack=True)

    async def send_early_exit(self, msg: Any, channel: str = "") -> None:
        await self._send(msg, wire.EARLY_EXIT, channel, pack=True)

    async def _send(self, msg: Any, message_type: int, channel: str, pack: bool) -> None:
        out = wire.KreNatsMessage(request_id=self._message.request_id, from_node=self._node.name,
                                  message_type=message_type)
        if pack:
            out.payload.Pack(msg)
        else:
            out.payload.type_url, out.payload.value = msg.type_url, msg.value
        await self._node.publish(out, channel)


class Node:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.name = env["KRT_NODE_NAME"]
        self.base_path = env["KRT_BASE_PATH"]
        self.output = env["KRT_NATS_OUTPUT"]
        self.logger = logging.getLogger(f"v3-reference.{self.name}")
        self.configuration: Configuration | None = None
        self.object_store: ObjectStore | None = None
        self.module: Any = None
        self.limit = 1 << 20

    async def start(self) -> None:
        env = self.env
        timeout = int(env.get("KRT_JS_REQUEST_TIMEOUT", "30000")) / 1000  # milliseconds (the original: seconds)
        self.nc = await nats.connect(env["KRT_NATS_SERVER"], name=f"v3-reference {self.name}")
        self.js = self.nc.jetstream(timeout=timeout)
        stream = await self.js.stream_info(env["KRT_NATS_STREAM"])
        self.limit = min(self.nc.max_payload, stream.config.max_msg_size or self.nc.max_payload)
        if all(env.get(v) for v in SCOPES.values()):  # the original fails at start when a bucket is missing
            self.configuration = Configuration({s: await self.js.key_value(env[v]) for s, v in SCOPES.items()})
        if env.get("KRT_NATS_OBJECT_STORE"):
            bucket = env["KRT_NATS_OBJECT_STORE"]
            self.object_store = ObjectStore(await self.js.object_store(bucket), self.js, bucket)
        spec = importlib.util.spec_from_file_location("handler", os.path.join(self.base_path, env["KRT_HANDLER_PATH"]))
        assert spec and spec.loader
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        if hasattr(self.module, "init"):
            result = self.module.init(Context(self, wire.KreNatsMessage()))
            if inspect.isawaitable(result):
                await result
        max_ack_pending = int(env.get("KRT_NATS_MAX_ACK_PENDING", "-1"))
        self.subs = []
        for subject in env["KRT_NATS_INPUTS"].split(","):
            name = f"{subject.replace('.', '-')}-{self.name}"
            config = ConsumerConfig(durable_name=name, deliver_group=name, deliver_policy=DeliverPolicy.NEW,
                                    ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT, max_ack_pending=max_ack_pending)
            self.subs.append(await self.js.subscribe(subject, queue=name, durable=name, cb=self.handle,
                                                     manual_ack=True, config=config))
        self.logger.info("ready: %s", env["KRT_NATS_INPUTS"])

    async def publish(self, message: Any, channel: str = "") -> None:
        subject = f"{self.output}.{channel}" if channel else self.output
        await self.js.publish(subject, wire.encode(message, self.limit))

    async def handle(self, msg: Any) -> None:
        """One input: the handler chosen by ``from_node``, an error envelope if it raises, then the ack."""
        message = wire.decode(msg.data)
        handler = getattr(self.module, "custom_handlers", {}).get(message.from_node, self.module.default_handler)
        try:
            result = handler(Context(self, message), wire.payload_of(message))
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            error = wire.KreNatsMessage(
                request_id=message.request_id, from_node=self.name, message_type=wire.ERROR,
                error=f"Error in node '{self.name}' executing handler for node '{message.from_node}': {exc}")
            await self.publish(error)
        await msg.ack()

    async def stop(self) -> None:
        await self.nc.drain()  # inputs already delivered are handled; the durable consumers stay


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    node = Node(dict(os.environ))
    await node.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await node.stop()


if __name__ == "__main__":
    asyncio.run(main())
