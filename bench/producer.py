"""A producer process: publish ``--count`` envelopes as fast as the fast path allows, then report.

It runs apart from the orchestrator so that building envelopes does not share a Python thread
with the collector; on a 2-core machine it still competes with the node and nats-server for CPU.
Prints one JSON line: ``{"start_ns", "end_ns", "stored"}`` on the shared monotonic clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import nats
from envelopes import make_request
from publisher import FastPublisher


async def produce(url: str, subject: str, count: int, limit: int) -> dict[str, int]:
    nc = await nats.connect(url, skip_subject_validation=True)
    try:
        publisher = await FastPublisher(nc, limit).start()
        start = time.monotonic_ns()
        for _ in range(count):
            await publisher.publish(subject, make_request())
        await publisher.wait_stored(timeout=max(30.0, count / 5000))
        return {"start_ns": start, "end_ns": time.monotonic_ns(), "stored": publisher.stored}
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--in-flight", type=int, default=2048, help="publishes awaiting a PubAck at most")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(produce(args.url, args.subject, args.count, args.in_flight))), flush=True)


if __name__ == "__main__":
    main()
