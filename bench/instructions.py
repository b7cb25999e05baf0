"""CPU instructions per message, counted by valgrind: the comparison that machine noise cannot move.

    python bench/instructions.py                  # reference, kre-runner, without elapsed points, measured
    python bench/instructions.py --kre-src DIR    # kre-runner imported from a patched src/ tree
    python bench/instructions.py --check          # CI smoke run: the stand-in still fits, no valgrind

Each node runs in one process against a stand-in connection: real MSG protocol bytes (inputs with
``$JS.ACK`` reply subjects, then their PubAcks) go through nats-py's own parser, so parsing,
dispatch and the node's whole job are counted; what the node publishes is dropped (no socket, no
server, no event-loop polling). The process runs under ``valgrind --tool=callgrind`` with two
message counts; the difference over the count difference is the cost of one message, start-up
excluded. Repeated runs agree within ~0.5 % (envelope ids and hash seeds vary), busy machine or idle.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SMALL, LARGE = 1280, 5120  # messages in the two counted runs (multiples of the batch below)
_BATCH = 64  # inputs fed per parse call, then their PubAcks

_TARGETS = {
    "reference": "raw nats-py reference node",
    "kre-runner": "kre-runner (elapsed-time point per message)",
    "kre-runner-no-elapsed": "kre-runner without KRT_INFLUX_URI",
    "kre-runner-measured": "kre-runner + ctx.measurement.save per message",
    "kre-runner-threaded": "kre-runner, KRT_HANDLER_THREADS=1",
    "kre-runner-batch1": "kre-runner, handler_batch, KRT_BATCH_SIZE=1",
    "kre-runner-batch1-threaded": "handler_batch, KRT_BATCH_SIZE=1, 1 thread",
    "kre-runner-v3": "kre-runner, KRE 3.x, ctx.send_output",
}
_BATCH1 = {"KRT_BATCH_SIZE": "1", "KRT_HANDLER_PATH": "handler.py:handler_batch"}
_ENV = {"kre-runner-threaded": {"KRT_HANDLER_THREADS": "1"},
        "kre-runner-batch1": _BATCH1,
        "kre-runner-batch1-threaded": {**_BATCH1, "KRT_HANDLER_THREADS": "1"}}
# Targets whose handler runs in a thread: their outputs are published after the call returns to the loop.
_THREADED = {"kre-runner-threaded", "kre-runner-batch1-threaded"}


def _v3_request() -> bytes:
    """bench/v3.py's 3.x input: the same request, in the 3.x envelope."""
    from v3 import _v3_request as request

    return request()


async def _feed(target: str, count: int) -> None:
    """Run one node on the stand-in connection and feed it ``count`` inputs and their PubAcks."""
    from envelopes import make_request
    from jetstream import CONSUMER, NODE, OUTPUT, STREAM
    from nats.aio.client import Client
    from nats.protocol.parser import Parser
    from nodes import kre_env

    class StandIn(Client):
        """A real nats-py client that believes it is connected; what it would write is dropped."""

        def __init__(self) -> None:
            super().__init__()
            self._status = Client.CONNECTED
            self._max_payload = 1024 * 1024
            self._skip_subject_validation = True
            self._ps = Parser(self)
            self._flush_queue = asyncio.Queue()
            self._flusher_task = asyncio.create_task(self._drop())
            self._inboxes = 0

        async def _drop(self) -> None:
            while True:
                future = await self._flush_queue.get()
                self._pending, self._pending_data_size = [], 0
                if not future.done():
                    future.set_result(None)

        def new_inbox(self) -> str:
            self._inboxes += 1
            return f"_INBOX.benchinstructions{self._inboxes}"

    nc = StandIn()
    if target == "reference":
        from reference_node import ReferenceNode

        node = ReferenceNode(nc, STREAM, CONSUMER, OUTPUT, NODE, 256)
        await node.start()
        node._requested = 1 << 40  # credit is not what is measured: never pull
        inbox, prefix = node._inbox, node._prefix
    else:
        from kre_runner.config import Settings
        from kre_runner.context import Context, ContextV3
        from kre_runner.handler import load_user_code
        from kre_runner.node.consumer import Consumer
        from kre_runner.ops.elapsed import ElapsedRecorder, ElapsedRecorderV3
        from kre_runner.services.influx import Measurement

        measured = target == "kre-runner-measured"
        env = kre_env("nats://localhost:4222", "handler_measured" if measured else "handler")
        # Valgrind slows a call ~50 times: a long ack wait keeps a sync handler on the fast path it takes
        # at full speed (a handler slow against the ack wait is paced instead: credits.py).
        if target == "kre-runner-v3":  # the 3.x variables: KRT_NATS_INPUTS, no entrypoint subject
            env = {**{k: v for k, v in env.items() if k not in ("KRT_NATS_INPUT", "KRT_NATS_ENTRYPOINT_SUBJECT")},
                   "KRT_NATS_INPUTS": env["KRT_NATS_INPUT"], "KRT_HANDLER_PATH": "handler_v3.py"}
        settings = Settings.from_env({**env, "KRT_ACK_WAIT": "86400", **_ENV.get(target, {})})
        v3 = settings.generation == "v3"
        log = logging.getLogger("bench")

        class Sink:  # InfluxSink's hot-path half: lines into a bounded buffer
            def __init__(self) -> None:
                self.points: deque[str] = deque(maxlen=10_000)
                self.add = self.points.append

        sink = Sink()
        recorder = ElapsedRecorderV3 if v3 else ElapsedRecorder
        record = None if target == "kre-runner-no-elapsed" else recorder(settings, sink.add)
        measurement = Measurement(sink, version=settings.version, workflow=settings.workflow_name,  # type: ignore[arg-type]
                                  node=settings.node_name)
        ctx: Context | ContextV3
        if v3:  # as run.py wires it: the sends of the consumer built below
            ctx = ContextV3(base_path=settings.base_path, logger=log, measurement=measurement,
                            send=lambda *args: consumer.sends.send(*args),  # type: ignore[union-attr]
                            current_input=lambda what: consumer.sends.envelope(what))  # type: ignore[union-attr]
        else:
            ctx = Context(base_path=settings.base_path, logger=log, measurement=measurement)
        consumer = Consumer(settings, load_user_code(settings.base_path, settings.handler_path, settings.generation),
                            nc, ctx, log, record_elapsed=record)
        inbox = await consumer.attach()
        prefix = consumer.puback_prefix
    sids = {sub.subject: sid for sid, sub in nc._subs.items()}
    data = _v3_request() if target == "kre-runner-v3" else make_request()
    chunks = []
    for first in range(1, count + 1, _BATCH):
        numbers = range(first, first + _BATCH)
        inputs = b"".join(b"MSG %s %d $JS.ACK.%s.%s.1.%d.%d.1763700000000000000.%d %d\r\n%s\r\n"
                          % (inbox.encode(), sids[inbox], STREAM.encode(), CONSUMER.encode(), i, i, count - i,
                             len(data), data) for i in numbers)
        pubacks = b"".join(b"MSG %s%d %d %d\r\n%s\r\n" % (prefix.encode(), i, sids[prefix + "*"], len(ack), ack)
                           for i in numbers for ack in [b'{"stream":"bench","seq":%d}' % i])
        chunks.append((inputs, pubacks))
    published = 0
    for inputs, pubacks in chunks:
        await nc._ps.parse(inputs)
        await asyncio.sleep(0)  # the reference handles inputs in its subscription's task
        published += _BATCH
        # The handler thread's results: a few polls per chunk.
        while target in _THREADED and consumer.published < published:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await nc._ps.parse(pubacks)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    handled = node._counter if target == "reference" else consumer.processed  # outputs / acked inputs
    if handled != count:
        raise RuntimeError(f"{target} handled {handled} of {count} messages: the stand-in no longer fits")


def _instructions(target: str, count: int, kre_src: str | None) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [kre_src, str(BENCH_DIR), env.get("PYTHONPATH")]))
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                           __file__, "--worker", target, str(count)], env=env, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode or not found:
        raise RuntimeError(f"{target} under valgrind failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kre-src", help="import kre_runner from this src directory (to count a patch)")
    parser.add_argument("--check", action="store_true", help="smoke run for CI: each node handles 640 messages "
                        "on the stand-in connection, without valgrind (no counts)")
    parser.add_argument("--worker", nargs=2, metavar=("TARGET", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.check:
        sys.path.insert(0, str(BENCH_DIR))
        if args.kre_src:
            sys.path.insert(0, args.kre_src)
        for target, count in [args.worker] if args.worker else [(target, 640) for target in _TARGETS]:
            asyncio.run(_feed(target, int(count)))
        if args.check:
            print("instructions.py --check: every node handled its messages on the stand-in connection")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found (apt-get install -y valgrind)")
        return 1
    print(f"CPU instructions per message (valgrind callgrind, {LARGE:,} - {SMALL:,} messages, Python "
          f"{sys.version.split()[0]}); parsing + dispatch + the node's job, no sockets", flush=True)
    counts = {}
    for target, label in _TARGETS.items():
        small, large = (_instructions(target, n, args.kre_src) for n in (SMALL, LARGE))
        counts[target] = (large - small) / (LARGE - SMALL)
        ratio = counts[target] / counts["reference"]
        print(f"{label:<46} {counts[target]:>10,.0f}   {ratio:.2f} × reference", flush=True)
    cost = 1 - counts["kre-runner"] / counts["kre-runner-measured"]
    print(f"ctx.measurement.save once per message: {cost:.1%} of kre-runner's instructions per message")
    batch1, threaded = counts["kre-runner-batch1"], counts["kre-runner-batch1-threaded"]
    print(f"handler_batch at KRT_BATCH_SIZE=1: {batch1 / counts['kre-runner'] - 1:+.1%} over the plain handler on "
          f"the event loop, {threaded / counts['kre-runner-threaded'] - 1:+.1%} over it in a thread (both paths "
          f"the plain handler's; the difference is the one-item list, user code included)")
    v3 = counts["kre-runner-v3"] / counts["kre-runner"] - 1
    print(f"KRE 3.x (one input, one ctx.send_output per input): {v3:+.1%} over the v2 plain handler")
    return 0


if __name__ == "__main__":
    sys.exit(main())
