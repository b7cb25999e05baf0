"""How many points per second ctx.measurement and the runner's metrics buffer sustain.

Measures, on this machine:
  1. ``InfluxSink.add`` alone (the runner's per-message cost), writer not running;
  2. ``Measurement.save`` (Point formatting + add) with tags and four fields;
  3. end to end: points added as fast as possible into a started sink writing to a real
     VictoriaMetrics (``apt-get install victoria-metrics``), until the server has accepted all;
     the count is checked through VictoriaMetrics' export API.

Usage: python bench/measurement_throughput.py [--points 300000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any

from kre_runner.dev.embedded import EmbeddedVictoriaMetrics
from kre_runner.services.influx import InfluxSink, Measurement


def _count_samples(url: str, metric: str) -> int:
    with urllib.request.urlopen(f"{url}/internal/force_flush", timeout=10):
        pass
    query = urllib.parse.urlencode({"match[]": f'{{__name__="{metric}"}}'})
    with urllib.request.urlopen(f"{url}/api/v1/export?{query}", timeout=60) as response:
        return sum(len(json.loads(row)["values"]) for row in response.read().decode().splitlines() if row)


def _bench_add(n: int) -> float:
    sink = InfluxSink(url="http://127.0.0.1:1", token="", org="", bucket="b", buffer=n)
    line = 'node_elapsed_time,node=n,version=v1,workflow=wf elapsed_ms=1.25,node_from="a",tracking_id="x" 1'
    add = sink.add
    started = time.perf_counter()
    for _ in range(n):
        add(line)
    return n / (time.perf_counter() - started)


def _bench_save(n: int) -> float:
    sink = InfluxSink(url="http://127.0.0.1:1", token="", org="", bucket="b", buffer=n)
    measurement = Measurement(sink, version="v1", workflow="wf", node="n")
    started = time.perf_counter()
    for i in range(n):
        measurement.save("inference", {"score": 0.5, "latency_ms": 12.5, "label": "cat", "n": i},
                         tags={"model": "m1"})
    return n / (time.perf_counter() - started)


async def _bench_end_to_end(url: str, n: int, batch_size: int) -> dict[str, Any]:
    sink = InfluxSink(url=url, token="t", org="", bucket="bench", batch_size=batch_size, flush_interval=1.0,
                      buffer=n)
    sink.start()
    name = f"e2e_{uuid.uuid4().hex[:8]}"
    start_ns = time.time_ns() - n * 10**6 - 60 * 10**9  # 1 ms apart, in the past
    started = time.perf_counter()
    for i in range(n):
        sink.add(f"{name},node=n f={i} {start_ns + i * 10**6}")
        if i % 5000 == 4999:
            await asyncio.sleep(0)  # a node's loop yields between messages; let the writer run
    added = time.perf_counter() - started
    while sink.written + sink.dropped < n:  # noqa: ASYNC110  # polling counters is the point
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await sink.close(10)
    stored = await asyncio.to_thread(_count_samples, url, f"{name}_f")
    return {"batch": batch_size, "points": n, "add_s": added, "elapsed_s": elapsed, "rate": n / elapsed,
            "written": sink.written, "dropped": sink.dropped, "failed": sink.failed_writes, "stored": stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=300_000, help="points per end-to-end run (default 300000)")
    args = parser.parse_args()

    add_rate = _bench_add(1_000_000)
    save_rate = _bench_save(100_000)
    print("| what | points/s | cost per point |")
    print("|---|---:|---:|")
    print(f"| InfluxSink.add (1M lines, writer idle) | {add_rate:,.0f} | {1e6 / add_rate:.2f} µs |")
    print(f"| Measurement.save (100k, 1 user tag + 3 system tags, 4 fields) | {save_rate:,.0f} | "
          f"{1e6 / save_rate:.2f} µs |")

    with EmbeddedVictoriaMetrics() as server:
        for batch in (1000, 5000):
            result = asyncio.run(_bench_end_to_end(server.url, args.points, batch))
            print(f"| end to end into VictoriaMetrics, batch {batch} ({result['points']:,} points, "
                  f"added in {result['add_s']:.2f}s, all written after {result['elapsed_s']:.2f}s; "
                  f"stored {result['stored']:,}, dropped {result['dropped']}, failed writes {result['failed']}) "
                  f"| {result['rate']:,.0f} | {1e6 / result['rate']:.2f} µs |")


if __name__ == "__main__":
    main()
