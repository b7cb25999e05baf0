"""``kre-runner``: ``run`` (a node's main), ``demo``, ``mongo-writer``. The only place that exits."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from . import __version__
from .config import VARIABLES, ConfigError, Settings
from .connection import StartupError
from .consumer import SetupError
from .handler import HandlerLoadError
from .logs import configure_logging
from .node import run_node

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
    commands.add_parser(
        "mongo-writer", help="serve KRT_NATS_MONGO_WRITER: insert documents sent by ctx.db.save",
        epilog="environment (mongo-writer): KRT_NATS_SERVER, KRT_NATS_MONGO_WRITER, KRT_MONGO_URI, "
               "KRT_MONGO_DB (or KRT_RUNTIME_ID -> {runtime}-data), KRT_DB_TIMEOUT, KRT_LOG_LEVEL",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _serve("run", Settings.from_env, run_node)
    if args.command == "demo":
        from .demo import run_demo

        try:
            return asyncio.run(run_demo(args.requests, args.examples, services=not args.no_services))
        except FileNotFoundError as exc:  # nats-server (the demo extra) or the examples are missing
            print(f"kre-runner demo: {exc}", file=sys.stderr)
            return 1
    if args.command == "mongo-writer":
        from .mongo_writer import WriterSettings, run_writer

        return _serve("mongo-writer", WriterSettings.from_env, run_writer)
    _parser().print_help()
    return 2


def _serve(command: str, load: Callable[[Mapping[str, str]], Any],
           run: Callable[[Any, asyncio.Event, logging.Logger], Awaitable[Any]]) -> int:
    """Settings from the environment, logging, SIGTERM/SIGINT, exit codes: 0 stopped, 1 cannot start, 2 config."""
    try:
        settings = load(os.environ)
    except ConfigError as exc:
        print(f"kre-runner {command}: {exc}", file=sys.stderr)
        return 2
    logger = configure_logging(settings.log_level, getattr(settings, "log_format", "text"),
                               {"node": settings.node_name, "workflow": settings.workflow_name}
                               if isinstance(settings, Settings) else {"service": command})

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop, logger)

    try:
        asyncio.run(serve())
    except (HandlerLoadError, StartupError, SetupError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0
