"""What ``ctx.configuration`` costs: a cached ``get`` (per scope found), a ``set``, and how soon a change is seen.

Measures, on this machine, against an embedded nats-server with the three buckets:
  1. ``await get(key)`` of a cached key found in the node, workflow and project scope, and of a missing key;
  2. ``await set(key, value)`` (one round trip to the server);
  3. the delay from another connection's put to ``get`` returning the value (p50, p99, max over N changes).

Usage: python bench/configuration.py [--gets 200000] [--changes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time

import nats
from nats.js.api import KeyValueConfig

from kre_runner.dev.embedded import EmbeddedNats
from kre_runner.services.configuration import ConfigurationKeyNotFound, open_configuration

BUCKETS = {"project": "key-store_b_v1", "workflow": "key-store_b_v1_wf", "node": "key-store_b_v1_wf_n"}


async def _get_cost(config, key: str, n: int) -> float:
    get = config.get
    started = time.perf_counter()
    for _ in range(n):
        await get(key)
    return (time.perf_counter() - started) / n * 1e6


async def _missing_cost(config, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        with contextlib.suppress(ConfigurationKeyNotFound):
            await config.get("absent")
    return (time.perf_counter() - started) / n * 1e6


async def main(gets: int, changes: int) -> None:
    server = EmbeddedNats().start()
    try:
        nc = await nats.connect(server.url)
        other = await nats.connect(server.url)
        js = nc.jetstream()
        for bucket in BUCKETS.values():
            await js.create_key_value(KeyValueConfig(bucket=bucket))
        config = await open_configuration(js, BUCKETS, logging.getLogger("bench"))
        for scope in BUCKETS:
            await config.set(f"in_{scope}", "value", scope=scope)
        rows = [(f"get, found in the {scope} scope", f"{await _get_cost(config, f'in_{scope}', gets):.2f} µs")
                for scope in ("node", "workflow", "project")]
        rows.append(("get of a key in no scope (raises)", f"{await _missing_cost(config, gets // 10):.2f} µs"))
        started = time.perf_counter()
        for i in range(1000):
            await config.set("k", str(i))
        rows.append(("set (one round trip)", f"{(time.perf_counter() - started) / 1000 * 1e6:.0f} µs"))
        kv = await other.jetstream().key_value(BUCKETS["workflow"])
        delays = []
        for i in range(changes):
            started = time.perf_counter()  # from the put's start: its PubAck may come after the watch's entry
            await kv.put("rate", str(i).encode())
            while await _value(config) != str(i):  # noqa: ASYNC110  (the poll is what is measured)
                await asyncio.sleep(0)
            delays.append(time.perf_counter() - started)
        delays.sort()
        rows.append((f"change by another client seen, p50 / p99 / max of {changes}",
                     f"{delays[len(delays) // 2] * 1e3:.2f} / {delays[int(len(delays) * 0.99) - 1] * 1e3:.2f} / "
                     f"{delays[-1] * 1e3:.2f} ms"))
        await config.close()
        await other.close()
        await nc.close()
    finally:
        server.cleanup()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


async def _value(config) -> str | None:
    try:
        return await config.get("rate")
    except ConfigurationKeyNotFound:
        return None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gets", type=int, default=200_000)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.gets, args.changes))
