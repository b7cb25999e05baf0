"""No handler speed from 0 to half the ack wait makes a healthy node call a handler twice for one input.

A sync handler on the event loop (the default) blocks the loop for its whole call: inputs delivered
behind it can neither start nor be kept alive meanwhile, so every one asked for too many waits past
its ack wait and is delivered again. The grid: handler calls of 1 ms, 50 ms, 120 ms and half the ack
wait, each a backlog published at once, on the four paths (inline, a thread, async, batches), one
node process per path; the speeds follow one another on the same node, so each backlog meets a node
that paced itself on the previous speed. bench/faults.py has the same rows at full size.
"""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kre_helpers import PROTOS, STREAM, Collector, greeting, node_env, request_envelope, wait_ready, wait_settled

from kre_runner.config import consumer_name

pytestmark = pytest.mark.integration

ACK_WAIT = 2.0
# (seconds a call takes, inputs in its backlog): each backlog takes longer than the ack wait to go through
# one at a time, except the 1 ms one (the fast path's own check).
GRID = [(0.001, 100), (0.05, 60), (0.12, 30), (ACK_WAIT / 2, 4)]
PATHS = {
    "inline": {"KRT_HANDLER_PATH": "paced.py:handler"},
    "thread": {"KRT_HANDLER_PATH": "paced.py:handler", "KRT_HANDLER_THREADS": "1"},
    "async": {"KRT_HANDLER_PATH": "paced.py:handler_async"},
    "batch": {"KRT_HANDLER_PATH": "paced.py:handler_batch", "KRT_BATCH_SIZE": "4"},
}


async def _one_path(path: str, nats_url: str, js, tmp_path: Path) -> dict[float, list[str]]:
    """Run the grid on one node process; the inputs called more than once, per call time."""
    calls = tmp_path / f"{path}.calls"
    env = node_env(nats_url, "paced.py", node=f"paced-{path}", KRT_NATS_OUTPUT=f"{STREAM}.out-{path}",
                   KRT_ACK_WAIT=str(ACK_WAIT), KRE_TEST_CALLS=str(calls), PYTHONPATH=str(PROTOS),
                   **PATHS[path])
    collector = await Collector(js, env["KRT_NATS_OUTPUT"]).start()
    log = (tmp_path / f"{path}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "kre_runner", "run"], env={**os.environ, **env},  # noqa: ASYNC220
                            stdout=log, stderr=subprocess.STDOUT)
    twice: dict[float, list[str]] = {}
    try:
        consumer = consumer_name("v1", env["KRT_NODE_NAME"])
        await wait_ready(js, consumer, timeout=30)
        for seconds, count in GRID:
            names = [f"{seconds}:{i}" for i in range(count)]
            for name in names:
                await js.publish(env["KRT_NATS_INPUT"], request_envelope(name).SerializeToString())
            # The backlog takes count × seconds one at a time; allow three times that, and the ack wait.
            outputs = await collector.take(count, timeout=3 * count * seconds + 3 * ACK_WAIT + 10)
            assert sorted(greeting(o) for o in outputs) == sorted(names), f"{path}, {seconds}s: outputs lost"
            await wait_settled(js, consumer, timeout=30)
            called = collections.Counter(line for line in calls.read_text().split() if line.startswith(f"{seconds}:"))
            twice[seconds] = sorted(name for name, n in called.items() if n > 1)
            assert set(called) == set(names), f"{path}, {seconds}s: inputs that never reached the handler"
        assert await collector.nothing_more()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    return twice


async def test_no_input_reaches_the_handler_twice_at_any_handler_speed(nats_server, js, workflow_stream, tmp_path):
    results = await asyncio.gather(*(_one_path(path, nats_server.url, js, tmp_path) for path in PATHS))
    second_calls = {path: {seconds: len(names) for seconds, names in twice.items()}
                    for path, twice in zip(PATHS, results, strict=True)}
    assert all(n == 0 for per_speed in second_calls.values() for n in per_speed.values()), second_calls
