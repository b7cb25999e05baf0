"""Compressed inputs on a real server: a gzip bomb gets an error envelope and is never fully inflated, in any
handler mode; the inflated bytes of an input count against KRT_MAX_INFLIGHT_BYTES until it settles."""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib

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

from kre_runner.node.consumer import Consumer

pytestmark = pytest.mark.integration

IN = f"{STREAM}.greeter"
OUT = f"{STREAM}.out"
ENTRY = f"{STREAM}.entrypoint"
MIB = 1024 * 1024
BOMB_INFLATED = 100 * MIB  # each bomb: ~100 KB on the wire
BOMBS = 6
# A node refusing bombs never holds more than one inflation limit (4 MiB with the test server's 1 MiB
# max_payload) at a time; 48 MiB leaves room for the interpreter's own growth while it works.
MARGIN = 48 * MIB


def _bomb() -> bytes:
    """An envelope whose payload is 100 MiB of zeros, gzip-compressed, built without holding 100 MiB twice."""
    head = request_envelope("bomb")
    head.payload.value = b""
    prefix = head.SerializeToString()
    # Field 4 (payload, an Any) sent again with field 2 (value) of BOMB_INFLATED zeros: protobuf merges it.
    value_header = b"\x12" + _varint(BOMB_INFLATED)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [squeeze.compress(prefix + b"\x22" + _varint(len(value_header) + BOMB_INFLATED) + value_header)]
    zeros = bytes(MIB)
    for _ in range(BOMB_INFLATED // MIB):
        parts.append(squeeze.compress(zeros))
    parts.append(squeeze.flush())
    return b"".join(parts)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("handler", ["greet.py", "greet_async.py", "batch.py"])
async def test_gzip_bombs_get_error_envelopes_and_the_node_stays_small(nats_server, js, workflow_stream, handler):
    bomb = _bomb()
    assert len(bomb) < 512 * 1024 and gzip.decompress(bomb)[:2]  # a valid gzip stream, well under max_payload
    errors = await Collector(js, ENTRY).start()
    out = await Collector(js, OUT).start()
    proc = start_process(node_env(nats_server.url, handler))
    try:
        await wait_ready(js, "v1-greeter", timeout=30)
        await js.publish(IN, request_envelope("before").SerializeToString())
        assert len(await out.take(1, timeout=20)) == 1
        baseline = _peak_rss(proc.pid)
        for _ in range(BOMBS):
            await js.publish(IN, bomb)
        refused = await errors.take(BOMBS, timeout=60)
        await js.publish(IN, request_envelope("after").SerializeToString())
        [after] = await out.take(1, timeout=20)
        await wait_settled(js, "v1-greeter", timeout=20)
        grew = _peak_rss(proc.pid) - baseline
        assert proc.poll() is None, "the node must not die"
    finally:
        proc.terminate()
        proc.wait(30)
    assert grew < MARGIN, f"peak RSS grew by {grew / MIB:.0f} MiB under {BOMBS} bombs"
    assert len(refused) == BOMBS
    for error in refused:
        assert "inflates to more than 4194304 bytes" in error.error and "KRT_MAX_INFLATED_BYTES" in error.error
    assert "after" in greeting(after)


async def test_inflated_bytes_count_against_the_byte_budget_until_settled(nats_server, js, workflow_stream,
                                                                          monkeypatch):
    consumers: list[Consumer] = []
    original = Consumer.__init__

    def keep(self: Consumer, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        consumers.append(self)

    monkeypatch.setattr(Consumer, "__init__", keep)
    big = request_envelope("x" * (3 * MIB), reply="big")  # inflates to 3 MiB, within the 4 MiB limit
    data = gzip.compress(big.SerializeToString())
    out = await Collector(js, OUT).start()
    env = node_env(nats_server.url, "slow.py", SLOW_SECONDS="1", KRT_MAX_INFLIGHT_BYTES=str(2 * MIB))
    async with running_node(env, js):
        credits = consumers[0]._credits
        await js.publish(IN, data)
        deadline = time.monotonic() + 10
        held = 0
        while time.monotonic() < deadline and held < 3 * MIB:
            held = max(held, credits.held_bytes)
            await asyncio.sleep(0.01)
        assert held >= 3 * MIB, f"held {held} bytes for a {len(data)}-byte input that inflates to 3 MiB"
        assert len(await out.take(1, timeout=20)) == 1
        await wait_settled(js, "v1-greeter")
        deadline = time.monotonic() + 5
        while credits.held_bytes and time.monotonic() < deadline:  # noqa: ASYNC110  # polled with a deadline
            await asyncio.sleep(0.01)
        assert credits.held_bytes == 0
