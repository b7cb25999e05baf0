"""A large object through ``ctx.object_store``: throughput and RSS growth, saved and read back.

Against an embedded nats-server (file storage), an object of --mb megabytes (random bytes):
  1. ``save`` (bytes in memory) and ``get`` (bytes back);
  2. ``save_file`` / ``get_to`` (streamed from and to a file);
reporting MB/s and the process's RSS growth over the step (peak from /proc/self/status VmHWM reset).

Usage: python bench/object_store.py [--mb 100]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from pathlib import Path

import nats

from kre_runner.dev.embedded import EmbeddedNats
from kre_runner.services.object_store import ObjectStore

MB = 1024 * 1024


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:  # "5" resets VmHWM to the current RSS
        refs.write("5")


async def _step(name: str, call, size: int, rows: list[tuple[str, str]]) -> object:
    gc.collect()
    _reset_peak()
    before = _rss()
    started = time.perf_counter()
    result = await call()
    elapsed = time.perf_counter() - started
    rows.append((name, f"{size / MB / elapsed:7.0f} MB/s   RSS peak +{(_peak() - before) / MB:6.1f} MB "
                       f"({(_peak() - before) / size:.2f} × the object)"))
    return result


async def main(mb: int) -> None:
    size = mb * MB
    server = EmbeddedNats().start()
    rows: list[tuple[str, str]] = []
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.create_object_store("bench")
        store = ObjectStore(js, "bench")
        data = os.urandom(size)
        await _step("save (bytes)", lambda: store.save("o", data), size, rows)
        back = await _step("get (bytes back; the caller's bytes are 1 ×)", lambda: store.get("o"), size, rows)
        assert back == data
        with tempfile.TemporaryDirectory() as tmp:
            source, target = Path(tmp, "in"), Path(tmp, "out")
            await asyncio.to_thread(source.write_bytes, data)
            await _step("save_file (streamed from a file)", lambda: store.save_file("f", source), size, rows)
            await _step("get_to (streamed to a file)", lambda: store.get_to("f", target), size, rows)
            assert (await asyncio.to_thread(target.stat)).st_size == size
        await nc.close()
    finally:
        server.cleanup()
    print(f"{mb} MB object, 128 KiB chunks, embedded nats-server (file storage), {os.cpu_count()} CPUs")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    asyncio.run(main(parser.parse_args().mb))
