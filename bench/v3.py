"""3.x rows: the same node drains a backlog in v2 mode, in 3.x mode with one input, and with three.

    python bench/v3.py            # 5 rounds of 50,000 inputs
    python bench/v3.py --quick    # smoke run (1 round of 2,000; no thresholds)

Each measurement: a fresh file-backed stream, the backlog published first, then ``kre-runner run``
started with KRT_DELIVER_POLICY=all; the drain is timed from the first acked input to the last (the
consumer's ack floor, polled every 10 ms), so start-up is not part of it. The three-input node gets
the same total backlog spread evenly over its inputs. Ratios are taken within each round (the
machine is shared and noisy) and their median is printed with the 3.x targets (≥ 0.95, ≥ 0.90),
beside the range of the rounds' ratios: the noise the median is read against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nats
from envelopes import make_request
from google.protobuf.any_pb2 import Any as AnyProto
from greeter_pb2 import Request
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError
from nodes import BENCH_DIR, kre_env
from servers import EmbeddedNats

from kre_runner.node.envelope import KreNatsMessageV3
from kre_runner.proto.kre_nats_msg_v3_pb2 import MessageType

STREAM = "bench"  # as nodes.kre_env
MODES = {"v2": ["bench.in"], "3.x, 1 input": ["bench.in"], "3.x, 3 inputs": ["bench.a", "bench.b", "bench.c"]}


def _v3_request() -> bytes:
    payload = AnyProto()
    payload.Pack(Request(name="bench-user"))
    return KreNatsMessageV3(request_id="bench", from_node="entrypoint", message_type=MessageType.OK,
                            payload=payload).SerializeToString()


async def _reset(js: JetStreamContext) -> None:
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*", f"{STREAM}.*.*"],
                                     storage=StorageType.FILE))


async def _preload(js: JetStreamContext, subjects: list[str], data: bytes, count: int) -> None:
    pending = []
    for i in range(count):
        pending.append(js.publish(subjects[i % len(subjects)], data))
        if len(pending) == 256:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


def _start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "kre_runner", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _drain(url: str, js: JetStreamContext, mode: str, count: int) -> float:
    """Inputs per second of one drain of ``count`` inputs in ``mode``."""
    await _reset(js)
    subjects = MODES[mode]
    await _preload(js, subjects, make_request() if mode == "v2" else _v3_request(), count)
    env = {**os.environ, **kre_env(url)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    env.pop("KRT_INFLUX_URI", None)
    if mode != "v2":
        for name in ("KRT_NATS_INPUT", "KRT_NATS_ENTRYPOINT_SUBJECT"):
            env.pop(name)
        env["KRT_NATS_INPUTS"] = ",".join(subjects)
        env["KRT_HANDLER_PATH"] = "handler_v3.py"
    proc = _start(env)
    try:
        first = None
        deadline = time.monotonic() + 60 + count / 500
        while time.monotonic() < deadline:
            try:
                floor = (await js.consumer_info(STREAM, "v1-node")).ack_floor.stream_seq
            except NotFoundError:
                floor = 0
            now = time.perf_counter()
            if floor and first is None:
                first = (now, floor)
            if floor >= count:
                assert first is not None
                return (floor - first[1]) / (now - first[0]) if now > first[0] else float("inf")
            await asyncio.sleep(0.01)
        raise RuntimeError(f"{mode}: not drained within the deadline (node exit code {proc.poll()})")
    finally:
        proc.terminate()
        proc.wait(30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=50_000)
    args = parser.parse_args()
    rounds, count = (1, 2_000) if args.quick else (args.rounds, args.count)
    server = EmbeddedNats().start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        ratios: dict[str, list[float]] = {mode: [] for mode in MODES if mode != "v2"}
        for _ in range(rounds):
            for mode in MODES:
                rates[mode].append(await _drain(server.url, js, mode, count))
            for mode in ratios:
                ratios[mode].append(rates[mode][-1] / rates["v2"][-1])
        await nc.close()
    finally:
        server.cleanup()
    print(f"3.x vs v2 drain, kre-runner, {rounds} round(s) of {count:,} inputs, {os.cpu_count()} cores")
    print(f"{'mode':<16}{'drain msgs/s (median)':>24}{'ratio to v2 (median)':>24}{'rounds':>14}{'target':>10}")
    targets = {"3.x, 1 input": "≥ 0.95", "3.x, 3 inputs": "≥ 0.90"}
    for mode in MODES:
        ratio = f"{statistics.median(ratios[mode]):.3f}" if mode in ratios else "1"
        spread = f"{min(ratios[mode]):.2f}–{max(ratios[mode]):.2f}" if mode in ratios else ""
        print(f"{mode:<16}{statistics.median(rates[mode]):>24,.0f}{ratio:>24}{spread:>14}{targets.get(mode, ''):>10}")


if __name__ == "__main__":
    asyncio.run(main())
