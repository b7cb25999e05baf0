"""``--soak N``: stream N messages through kre-runner and watch its resident memory.

INTEREST retention keeps the store small: an input leaves the stream once acked, and outputs
(no consumer on them) are not kept. The producer publishes flat out with bounded PubAcks, so
the node always has work; RSS is sampled every 2 s.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import nats
from jetstream import INPUT, acked_inputs, create_consumer, reset_stream, wait_acked, wait_ready
from nats.js.api import RetentionPolicy
from nodes import BENCH_DIR, NodeProcess, NodeSpec
from procstat import cpu_seconds, rss_mb

__all__ = ["soak"]

_SAMPLE_EVERY = 2.0


async def soak(nats_url: str, influx: str | None, count: int, log_dir: Path) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await reset_stream(js, RetentionPolicy.INTEREST)
    await create_consumer(js, paused=False)
    spec = NodeSpec("kre-runner", influx_url=influx)
    print(f"soak: {count:,} messages through kre-runner (elapsed metrics {'on' if influx else 'off'})", flush=True)
    try:
        with NodeProcess(spec, nats_url, log_dir / "soak.log") as node:
            await wait_ready(js, node.alive)
            await asyncio.sleep(0.5)
            samples = [rss_mb(node.pid)]
            print(f"  RSS idle after start: {samples[0]:.1f} MB", flush=True)
            cpu0 = cpu_seconds(node.pid)
            started = time.monotonic()
            producer = await asyncio.create_subprocess_exec(
                sys.executable, str(BENCH_DIR / "producer.py"), "--url", nats_url, "--subject", INPUT,
                "--count", str(count), stdout=asyncio.subprocess.DEVNULL,
            )
            done = asyncio.create_task(wait_acked(js, count, timeout=120 + count / 1000, poll=0.2))
            while not done.done():
                await asyncio.wait({done}, timeout=_SAMPLE_EVERY)
                samples.append(rss_mb(node.pid))
                acked, _ = await acked_inputs(js)
                print(f"  {time.monotonic() - started:6.1f}s  acked {acked:>10,}  RSS {samples[-1]:6.1f} MB",
                      flush=True)
            await done
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(node.pid) - cpu0
            if await producer.wait():
                raise RuntimeError(f"producer failed with code {producer.returncode}")
    finally:
        await nc.close()
    print(f"soak: {count:,} messages in {elapsed:.1f}s ({count / elapsed:,.0f} msgs/s, node CPU "
          f"{cpu / count * 1e6:.1f} µs/msg); RSS first {samples[0]:.1f} MB, last {samples[-1]:.1f} MB, "
          f"max {max(samples):.1f} MB over {len(samples)} samples")
