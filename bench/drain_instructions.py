"""CPU instructions per message of a real drain: each node process, on a real nats-server, under valgrind.

    python bench/drain_instructions.py            # the reference, then kre-runner (~10 min)

``instructions.py`` counts a node fed through a stand-in connection (no sockets, no server, no event
loop polling). This one counts everything the node process does in a real drain of a pre-loaded
backlog: socket reads and writes, pull requests and their status messages, the event loop, the
HTTP endpoint's thread. Two drains per node (2,000 and 8,000 inputs); the difference over 6,000 is
one message, start-up excluded. Under valgrind a node runs ~50 times slower, so it reads bigger
batches per socket read than at full speed: the counts compare the nodes' work, not their pace.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nats
from envelopes import make_request
from jetstream import CONSUMER, STREAM, create_consumer
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nodes import NodeSpec
from servers import EmbeddedNats
from v3 import _preload, _reset

COUNTS = (2_000, 8_000)


async def _count(url: str, js: JetStreamContext, kind: str, count: int) -> int:
    """Instructions of one node process that drains ``count`` inputs, then is stopped."""
    await _reset(js)
    await _preload(js, ["bench.in"], make_request(), count)
    args, env = NodeSpec(kind).command(url)
    if kind == "reference":
        await create_consumer(js, paused=False)
    else:
        env["KRT_ACK_WAIT"] = "600"  # valgrind's pace must not look like a stuck input
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *args],  # noqa: ASYNC220
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if (await js.consumer_info(STREAM, CONSUMER)).ack_floor.stream_seq >= count:
                break
        except NotFoundError:
            pass
        await asyncio.sleep(0.5)
    proc.terminate()
    _, err = proc.communicate(timeout=300)
    found = re.search(r"Collected : (\d+)", err)
    if not found:
        raise RuntimeError(f"{kind} under valgrind: no count ({proc.returncode}): {err[-2000:]}")
    return int(found.group(1))


async def main() -> None:
    server = EmbeddedNats().start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        print(f"CPU instructions per message of a real drain (valgrind, {COUNTS[1]:,} - {COUNTS[0]:,} inputs, "
              f"Python {sys.version.split()[0]}); the whole node process", flush=True)
        counts = {}
        for kind in ("reference", "kre-runner"):
            small, large = [await _count(server.url, js, kind, n) for n in COUNTS]
            counts[kind] = (large - small) / (COUNTS[1] - COUNTS[0])
            print(f"{kind:<12} {counts[kind]:>10,.0f}   {counts[kind] / counts['reference']:.2f} × reference",
                  flush=True)
        await nc.close()
    finally:
        server.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
