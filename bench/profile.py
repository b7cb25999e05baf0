"""Where a node's time goes during a backlog drain: py-spy samples, summarised by function.

    python bench/profile.py kre-runner [--function handler] [--messages 100000]
    python bench/profile.py reference

Attaches ``py-spy record --nonblocking`` (``pip install py-spy``) to the node for the drain only,
keeps the collapsed stacks next to a summary of self and inclusive time per function.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nats
from jetstream import create_consumer, reset_stream, start_at, wait_acked, wait_ready
from nodes import NodeProcess, NodeSpec
from scenarios import preload
from servers import EmbeddedNats, EmbeddedVictoriaMetrics, victoria_metrics_available


def summarise(collapsed: Path, top: int) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed (``--format raw``) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self time:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


async def profile(args: argparse.Namespace, nats_url: str, influx: str | None, out: Path) -> None:
    spec = NodeSpec(args.node, args.function, args.max_inflight, influx, args.kre_src)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await reset_stream(js)
    await create_consumer(js, paused=True)
    await preload(nc, args.messages)
    with NodeProcess(spec, nats_url) as node:
        await wait_ready(js, node.alive)
        spy = await asyncio.create_subprocess_exec(
            "py-spy", "record", "--nonblocking", "-r", str(args.rate), "-p", str(node.pid), "-f", "raw", "-o", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.sleep(1.0)  # py-spy attaches
        t0 = await start_at(js)
        t1 = await wait_acked(js, args.messages, timeout=300)
        spy.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        await asyncio.wait_for(spy.wait(), 30)
    await nc.close()
    print(f"{spec.label}: {args.messages / ((t1 - t0) / 1e9):,.0f} msgs/s while profiled")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("node", choices=("kre-runner", "reference"))
    parser.add_argument("--function", default="handler", help="bench/handler.py function (kre-runner)")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--max-inflight", type=int, default=256)
    parser.add_argument("--kre-src", help="import kre_runner from this src directory (to profile a patch)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--no-influx", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, help="collapsed stacks file (default: a temp file)")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="kre-bench-prof-")) / f"{args.node}.txt"
    use_vm = not args.no_influx and victoria_metrics_available()
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedNats())
        influx = stack.enter_context(EmbeddedVictoriaMetrics()).url if use_vm else None
        asyncio.run(profile(args, server.url, influx, out))
    time.sleep(0.2)
    print(f"collapsed stacks: {out}\n")
    print(summarise(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
