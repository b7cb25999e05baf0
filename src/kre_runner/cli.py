"""``kre-runner``: ``run`` (a node's main), ``demo``, ``mongo-writer``. The only place that exits."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .config import VARIABLES, ConfigError, Settings
from .consumer import SetupError
from .handler import HandlerLoadError
from .logs import configure_logging
from .node import StartupError, run_node

__all__ = ["main"]


def _variables_help() -> str:
    width = max(len(name) for name, *_ in VARIABLES)
    lines = ["environment (run):"]
    for name, required, description, _ in VARIABLES:
        lines.append(f"  {name:<{width}}  {'required' if required else 'optional'}  {description}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kre-runner",
        description="Run a Python handler(ctx, data) as a KRE workflow node on NATS JetStream.",
        epilog=_variables_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kre-runner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the node described by the KRT_* environment (a pod's main)",
                        epilog=_variables_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = commands.add_parser("demo", help="run the example workflow on an embedded NATS server")
    demo.add_argument("--requests", type=int, default=500, help="requests to send (default 500)")
    demo.add_argument("--examples", default=None, help="examples directory (default: the repository's)")
    demo.add_argument("--no-services", action="store_true",
                      help="leave out the node that uses MongoDB and the time-series DB")
    commands.add_parser("mongo-writer", help="serve KRT_NATS_MONGO_WRITER: insert documents sent by ctx.db.save")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(os.environ)
    if args.command == "demo":
        from .demo import run_demo

        return asyncio.run(run_demo(args.requests, args.examples, services=not args.no_services))
    if args.command == "mongo-writer":
        from .mongo_writer import main as writer_main

        return writer_main(os.environ)
    _parser().print_help()
    return 2


def _run(env: os._Environ[str] | dict[str, str]) -> int:
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        print(f"kre-runner: {exc}", file=sys.stderr)
        return 2
    logger = configure_logging(settings.log_level)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_node(settings, stop, logger)

    try:
        asyncio.run(serve())
    except (HandlerLoadError, StartupError, SetupError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0
