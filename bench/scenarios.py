"""One node, one set of measurements: backlog drain, live producer, latency, CPU and RSS.

Every measurement starts from a fresh stream. Timings come from the server's view (the
consumer's ack floor: every input acked, hence every output PubAcked first) polled every 10 ms,
so the orchestrator costs the node almost nothing while it is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from envelopes import make_request, sent_ns
from jetstream import INPUT, OUTPUT, create_consumer, reset_stream, start_at, wait_acked, wait_ready
from nats.aio.client import Client
from nats.aio.msg import Msg
from nodes import BENCH_DIR, NodeProcess, NodeSpec
from procstat import cpu_seconds, rss_mb
from publisher import FastPublisher

__all__ = ["Sizes", "asyncio_ceiling", "measure_node", "preload"]


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    backlog: int  # envelopes pre-loaded for the drain (and published live)
    latency_samples: int  # one-in-flight round trips
    paced_rate: int  # msgs/s for the paced latency
    paced_seconds: float


class _Collector:
    """Core subscriber on the output subject: end-to-end latency from the stamp in ``reply``."""

    def __init__(self, expected: int = 0) -> None:
        self.samples_ms: list[float] = []
        self.waiter: asyncio.Future[None] | None = None
        self.expected = expected
        self.complete = asyncio.Event()

    async def on_output(self, msg: Msg) -> None:
        self.samples_ms.append((time.monotonic_ns() - sent_ns(msg.data)) / 1e6)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(self.samples_ms) == self.expected:
            self.complete.set()


async def preload(nc: Client, count: int) -> None:
    publisher = await FastPublisher(nc).start()
    for _ in range(count):
        await publisher.publish(INPUT, make_request())
    await publisher.wait_stored()
    await publisher.close()


async def _drain(nc: Client, node: NodeProcess, count: int, others: dict[str, int]) -> dict[str, float]:
    """Unpause the consumer and time until every pre-loaded input is acked; CPU per message of the
    node and of ``others`` (name -> pid: nats-server, VictoriaMetrics), which share the cores."""
    js = nc.jetstream()
    pids = {"cpu_us": node.pid, **{f"{name}_cpu_us": pid for name, pid in others.items()}}
    cpu0 = {key: cpu_seconds(pid) for key, pid in pids.items()}
    t0 = await start_at(js)
    t1 = await wait_acked(js, count, timeout=60 + count / 500)
    result = {key: (cpu_seconds(pid) - cpu0[key]) / count * 1e6 for key, pid in pids.items()}
    result["drain"] = count / ((t1 - t0) / 1e9)
    return result


async def _live(nc: Client, nats_url: str, already: int, count: int) -> float:
    """A producer process publishes ``count`` envelopes flat out while the node runs: msgs/s end to end."""
    producer = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH_DIR / "producer.py"), "--url", nats_url, "--subject", INPUT, "--count", str(count),
        stdout=asyncio.subprocess.PIPE,
    )
    done = asyncio.create_task(wait_acked(nc.jetstream(), already + count, timeout=60 + count / 500))
    out, _ = await producer.communicate()
    t_end = await done
    if producer.returncode:
        raise RuntimeError(f"producer failed with code {producer.returncode}")
    start_ns = json.loads(out)["start_ns"]
    return count / ((t_end - start_ns) / 1e9)


async def _settle(pids: list[int], busy_share: float = 0.05, longest: float = 15.0) -> None:
    """Wait (bounded) until these processes are nearly idle, e.g. kre-runner's metrics buffer written
    to VictoriaMetrics after a burst, so a latency test measures the steady state, not the clean-up."""
    window = 0.5
    for _ in range(int(longest / window)):
        before = [cpu_seconds(pid) for pid in pids]
        await asyncio.sleep(window)
        if all(cpu_seconds(pid) - b < busy_share * window for pid, b in zip(pids, before, strict=True)):
            return


def _percentiles(samples: list[float], prefix: str) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {f"{prefix}_p50": statistics.median(samples), f"{prefix}_p99": cuts[98]}


async def _latency_one(nc: Client, samples: int) -> dict[str, float]:
    """One message in flight: publish, wait for its output, repeat."""
    collector = _Collector()
    sub = await nc.subscribe(OUTPUT, cb=collector.on_output)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(samples):
            collector.waiter = loop.create_future()
            await nc.publish(INPUT, make_request())
            await asyncio.wait_for(collector.waiter, 10)
    finally:
        await sub.unsubscribe()
    return _percentiles(collector.samples_ms, "lat1")


async def _latency_paced(nc: Client, rate: int, seconds: float) -> dict[str, float]:
    """Publish at ``rate`` msgs/s on a fixed schedule (no coordinated omission), collect every output."""
    count = int(rate * seconds)
    collector = _Collector(count)
    sub = await nc.subscribe(OUTPUT, cb=collector.on_output)
    loop = asyncio.get_running_loop()
    try:
        start = loop.time()
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await nc.publish(INPUT, make_request())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(collector.complete.wait(), 10)
    finally:
        await sub.unsubscribe()
    if len(collector.samples_ms) < count:
        raise RuntimeError(f"paced latency: {len(collector.samples_ms)}/{count} outputs arrived")
    return _percentiles(collector.samples_ms, "paced")


async def measure_node(nc: Client, nats_url: str, spec: NodeSpec, sizes: Sizes, *, full: bool,
                       others: dict[str, int] | None = None, log_dir: Path | None = None) -> dict[str, float]:
    """Run ``spec`` once: drain (always), then live, latency and RSS when ``full``."""
    js = nc.jetstream()
    await reset_stream(js)
    await create_consumer(js, paused=True)
    await preload(nc, sizes.backlog)
    log = log_dir / f"{spec.label.replace(':', '_')}.log" if log_dir else None
    with NodeProcess(spec, nats_url, log) as node:
        await wait_ready(js, node.alive)
        await asyncio.sleep(0.5)  # let start-up settle before reading the idle RSS
        result = {"rss_idle": rss_mb(node.pid)}
        # The previous node's run may have left nats-server (removing a stream of 60k+ stored messages)
        # or VictoriaMetrics (merging what it ingested) busy: every drain starts on quiet cores.
        await _settle([node.pid, *(others or {}).values()])
        result.update(await _drain(nc, node, sizes.backlog, others or {}))
        if full:
            result["live"] = await _live(nc, nats_url, sizes.backlog, sizes.backlog)
            await _settle([node.pid, *(others or {}).values()])
            result.update(await _latency_one(nc, sizes.latency_samples))
            result.update(await _latency_paced(nc, sizes.paced_rate, sizes.paced_seconds))
            result["rss_after"] = rss_mb(node.pid)
        if not node.alive():
            raise RuntimeError(f"{spec.label} exited during the run")
    return result


_SLEEPERS = """
import asyncio, sys, time
async def main(n, seconds):
    done = 0
    stop = time.monotonic() + seconds
    async def sleeper():
        nonlocal done
        while time.monotonic() < stop:
            await asyncio.sleep(0.01)
            done += 1
    start = time.monotonic()
    await asyncio.gather(*(sleeper() for _ in range(n)))
    print(done / (time.monotonic() - start))
asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
"""


async def asyncio_ceiling(n: int, seconds: float = 1.5) -> float:
    """What asyncio itself reaches with ``n`` tasks awaiting ``asyncio.sleep(0.01)`` in a loop, in a
    process of its own: the selector rounds timeouts up to the millisecond, so this is below n/10 ms."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _SLEEPERS, str(n), str(seconds),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return float(out)
