"""``kre-runner``: ``run`` (a node's main), the local tools (``up``, ``call``, ``run-once``, ``check``,
``stream create``, ``config``, ``demo``) and ``mongo-writer``. The only place that exits.

Exit codes: 0 done, 1 failed (a handler error, an unreachable server, no answer), 2 usage or
configuration error (the one-line message names what to fix).

Over 400 lines, deliberately: the argument parsers of every command, and the one place that turns
errors into exit codes, read best together; each command's work lives in its own module (dev/).
"""

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
from .config import VARIABLES, Settings
from .errors import ConfigError, HandlerLoadError, SetupError, StartupError
from .ops.logs import configure_logging
from .run import run_node

__all__ = ["main"]


def _variables_help() -> str:
    width = max(len(name) for name, *_ in VARIABLES)
    lines = ["environment (run):"]
    for name, required, description, _ in VARIABLES:
        lines.append(f"  {name:<{width}}  {'required' if required else 'optional'}  {description}")
    return "\n".join(lines)


_EXAMPLES = """\
examples:
  kre-runner run-once handler.py --type Request --json '{"name": "Ann"}'   # one input, no NATS
  kre-runner up workflow.yaml --reload                  # the whole workflow locally (Ctrl-C stops it)
  kre-runner call workflow.yaml --json '{"name": "Ann"}'  # prints the answer; the tracking id on stderr
  kre-runner trace workflow.yaml TRACKING_ID            # where that request is
  kre-runner dead-letter list workflow.yaml             # inputs a node gave up on
  kre-runner check                                      # in a pod's environment: what would stop the node

`kre-runner COMMAND --help` says more; `kre-runner run --help` lists the KRT_* variables a node reads."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kre-runner",
        description="Run a Python handler(ctx, data) as a KRE workflow node on NATS JetStream.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kre-runner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the node described by the KRT_* environment (a pod's main)",
                        epilog=_variables_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    up = commands.add_parser(
        "up", help="run a workflow YAML locally: embedded NATS, the stream, every node as a process",
        description="Run every node of WORKFLOW.yaml as a `kre-runner run` process with the environment the KRE "
                    "manager gives a pod, on an embedded JetStream server (or --nats). Ctrl-C stops everything.")
    up.add_argument("workflow", metavar="WORKFLOW.yaml")
    up.add_argument("--nats", metavar="URL", help="use this NATS server instead of starting one")
    up.add_argument("--reload", action="store_true",
                    help="restart a node when its handler file, or a local module it imports, changes")
    up.add_argument("--services", action="store_true",
                    help="also start a local MongoDB stand-in and VictoriaMetrics for ctx.db/prediction/measurement "
                         "(unless KRT_MONGO_URI / KRT_INFLUX_URI are set)")
    call = commands.add_parser(
        "call", help="send requests to a workflow as its entrypoint does and print the answers as JSON",
        description="Send one request (--json) or several (JSON lines) to the workflow started by `kre-runner up "
                    "WORKFLOW.yaml`, or to a deployed one (--nats --stream --subject), wait for each answer on the "
                    "entrypoint subject and print it as JSON. Exit 1 when an answer is an error.")
    call.add_argument("workflow", metavar="WORKFLOW.yaml", nargs="?")
    call.add_argument("--nats", metavar="URL", help="a deployed workflow's NATS server (instead of WORKFLOW.yaml)")
    call.add_argument("--stream", help="its stream, e.g. demo-v1-greeter")
    call.add_argument("--subject", help="its first node's input subject, e.g. demo-v1-greeter.greeter")
    call.add_argument("--entrypoint", metavar="SUBJECT", help="where answers come (default {stream}.entrypoint)")
    call.add_argument("--proto-path", metavar="DIR", action="append", default=[],
                      help="also look for *_pb2 modules here (repeatable; default: the handlers' directories, or .)")
    _add_input_options(call)
    call.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answers (default 10)")
    call.add_argument("--all", dest="every", action="store_true",
                      help="KRE 3.x workflow: print every envelope each node sent for the request (node, channel, "
                           "message_type, payload), one JSON line each, not only the exitpoint's answer")
    call.epilog = ("A KRE 3.x workflow (nodes with inputs:) is called as the 3.x entrypoint: the request on "
                   "{stream}.entrypoint, the answer is the first envelope for it on the exitpoint's output.")
    once = commands.add_parser(
        "run-once", help="run a handler on one input (or JSON lines of inputs) without NATS",
        description="Load HANDLER (file.py or file.py:function), run init(ctx) once, then handler(ctx, data) on each "
                    "input, and print each output as JSON. Data services come from the usual KRT_* variables when "
                    "set. Exit 1 (with the traceback) when the handler raises.")
    once.add_argument("handler", metavar="HANDLER")
    _add_input_options(once)
    once.add_argument("--services", action="store_true",
                      help="start a throwaway MongoDB stand-in and VictoriaMetrics for ctx.db/prediction/measurement "
                           "and show what the handler stored (unless KRT_MONGO_URI / KRT_INFLUX_URI are set)")
    once.add_argument("--mongo", metavar="URI", help="ctx.db and ctx.prediction use this MongoDB (KRT_MONGO_URI), "
                                                     "e.g. the one `kre-runner up --services` prints")
    once.add_argument("--influx", metavar="URL", help="ctx.measurement writes here (KRT_INFLUX_URI)")
    commands.add_parser(
        "check", help="lint a node's environment: configuration, handler, NATS, stream, subjects, consumer",
        description="Check what `kre-runner run` would find with this environment; one line per check (✔/✘) "
                    "with the fix. Exit 0 when all pass, 1 otherwise.",
        epilog=_variables_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    stream = commands.add_parser("stream", help="manage the workflow stream (stream create)")
    stream_commands = stream.add_subparsers(dest="stream_command", metavar="ACTION", required=True)
    create = stream_commands.add_parser(
        "create", help="create KRT_NATS_STREAM with subjects {stream}.* and interest retention, as the manager does")
    create.add_argument("workflow", metavar="WORKFLOW.yaml", nargs="?",
                        help="the workflow's stream, on the server of its `up` (or --nats)")
    create.add_argument("--nats", metavar="URL", help="NATS server (default KRT_NATS_SERVER)")
    create.add_argument("--stream", help="stream name (default KRT_NATS_STREAM)")
    create.description = ("Create the stream unless it exists, and the key-value buckets (KRT_NATS_KEY_VALUE_STORE_"
                          "PROJECT/_WORKFLOW/_NODE) and the object store (KRT_NATS_OBJECT_STORE) whose variables are "
                          "set. What exists is left as it is.")
    config = commands.add_parser(
        "config", help="read and change live configuration (ctx.configuration) in a node's key-value buckets",
        description="get, set, delete or list configuration values in the buckets named by the node's "
                    "KRT_NATS_KEY_VALUE_STORE_PROJECT/_WORKFLOW/_NODE (or --project/--workflow/--node), on "
                    "KRT_NATS_SERVER (or --nats). Scopes as ctx.configuration: get without --scope looks in node, "
                    "then workflow, then project; set and delete default to the node scope. Running nodes see a "
                    "change within a second.")
    config.add_argument("action", choices=["get", "set", "delete", "list"])
    config.add_argument("key", nargs="?", help="[WORKFLOW.yaml] the key (get, set, delete)")
    config.add_argument("value", nargs="?", help="the value (set)")
    config.add_argument("rest", nargs="?", help=argparse.SUPPRESS)  # the value when WORKFLOW.yaml comes first
    config.epilog = ("With WORKFLOW.yaml first (kre-runner config set WORKFLOW.yaml KEY VALUE --node NODE), the "
                     "buckets are that workflow's (as `up` made them) on the server of its running `up` (or --nats), "
                     "and --node names a node of it (without --node: the project and workflow scopes).")
    config.add_argument("--scope", choices=["node", "workflow", "project"],
                        help="the scope (default: get looks in all three, set/delete use node, list shows all)")
    config.add_argument("--nats", metavar="URL", help="NATS server (default KRT_NATS_SERVER)")
    for scope in ("project", "workflow", "node"):
        config.add_argument(f"--{scope}", metavar="BUCKET",
                            help=f"the {scope} scope's bucket (default KRT_NATS_KEY_VALUE_STORE_{scope.upper()})")
    dead = commands.add_parser(
        "dead-letter", help="inspect and act on dead-lettered inputs (list, show, replay, purge)",
        description="Inputs that failed on every delivery are kept in the dead-letter stream "
                    "(KRT_DEAD_LETTER_STREAM, default {KRT_NATS_STREAM}-dead-letter). `replay` publishes them again "
                    "to their input subject and removes them; `purge` removes them.")
    dead.add_argument("action", choices=["list", "show", "replay", "purge"])
    dead.add_argument("seq", nargs="*", metavar="[WORKFLOW.yaml] SEQ",
                      help="the workflow (its `up`'s server and dead-letter stream), then dead-letter "
                           "sequence numbers (show/replay/purge; replay and purge need them, or --all)")
    dead.add_argument("--all", action="store_true", help="replay or purge every dead letter (of --node)")
    dead.add_argument("--node", help="only this node's dead letters")
    dead.add_argument("--nats", metavar="URL", help="NATS server (default KRT_NATS_SERVER)")
    dead.add_argument("--stream", help="dead-letter stream (default KRT_DEAD_LETTER_STREAM, "
                                       "else {KRT_NATS_STREAM}-dead-letter)")
    trace = commands.add_parser(
        "trace", help="where a request is, by the tracking id call prints: in flight, dead-lettered or answered",
        description="Find the request with TRACKING_ID (printed by `kre-runner call`, and in the nodes' log lines "
                    "about it): in flight (the node holding it unacked, its consumer's counts and, under up, its "
                    "redeliveries from the node's log), dead-lettered (which node, after how many deliveries, why) "
                    "or, under `kre-runner up`, answered (the nodes it passed, from the answer's tracking entries) and "
                    "the log lines naming it. Exit 1 when it is found nowhere.")
    trace.add_argument("workflow", metavar="WORKFLOW.yaml")
    trace.add_argument("tracking_id", metavar="TRACKING_ID")
    trace.add_argument("--nats", metavar="URL", help="a deployed workflow's NATS server (default: its running `up`)")
    stored = commands.add_parser(
        "stored", help="what the handlers saved: MongoDB collections, time series (of `up --services`, or given)",
        description="For each MongoDB collection its document count and newest document; for VictoriaMetrics each "
                    "series with its point count. WORKFLOW.yaml: the services its running `up --services` started.")
    stored.add_argument("workflow", metavar="WORKFLOW.yaml", nargs="?")
    stored.add_argument("--mongo", metavar="URI", help="a MongoDB (default KRT_MONGO_URI)")
    stored.add_argument("--db", help="its database (default KRT_MONGO_DB, else {KRT_RUNTIME_ID}-data)")
    stored.add_argument("--influx", metavar="URL", help="a VictoriaMetrics (default KRT_INFLUX_URI)")
    demo = commands.add_parser("demo", help="run the example workflow (examples/workflow.yaml) and send requests")
    demo.add_argument("--requests", type=int, default=500, help="requests to send (default 500)")
    demo.add_argument("--examples", default=None,
                      help="examples directory holding workflow.yaml (default: ./examples, else the repository's)")
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
        from .dev.demo import run_demo

        return _tool("demo", run_demo(args.requests, args.examples, services=not args.no_services))
    if args.command == "up":
        return _up(args)
    if args.command == "call":
        return _tool("call", _call(args))
    if args.command == "run-once":
        return _run_once(args)
    if args.command == "check":
        return _tool("check", _check())
    if args.command == "stream":
        return _tool("stream create", _stream_create(args))
    if args.command == "config":
        return _tool(f"config {args.action}", _config(args))
    if args.command == "dead-letter":
        return _tool("dead-letter", _dead_letter(args))
    if args.command == "trace":
        return _tool("trace", _trace(args))
    if args.command == "stored":
        return _tool("stored", _stored(args))
    if args.command == "mongo-writer":
        from .services.mongo_writer import WriterSettings, run_writer

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


class _UsageError(Exception):
    """Bad arguments or input: exit code 2 with a one-line message."""


class _Failure(Exception):
    """The command ran and failed: exit code 1 with a one-line message."""


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", dest="type_name", metavar="MESSAGE",
                        help="the request's protobuf message: Request, pkg.Request or module_pb2.Request")
    parser.add_argument("--json", metavar="JSON", help="the request as JSON (JSON lines: one request per line)")
    parser.add_argument("--file", metavar="FILE", help="read the JSON (or JSON lines) from FILE ('-': stdin)")


def _tool(command: str, work: Awaitable[int]) -> int:
    """Run a local tool's coroutine; turn its errors into one line and the exit code."""
    from .dev.calling import CallError
    from .dev.messages import MessageTypeError
    from .dev.up import UpError
    from .dev.workflow import WorkflowError

    try:
        return asyncio.run(work)  # type: ignore[arg-type]
    except (_UsageError, WorkflowError, MessageTypeError, ConfigError) as exc:
        print(f"kre-runner {command}: {exc}", file=sys.stderr)
        return 2
    except (_Failure, CallError, UpError, StartupError, HandlerLoadError, FileNotFoundError) as exc:
        # FileNotFoundError: a server binary (the demo/test extras) or the examples are missing.
        print(f"kre-runner {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _read_inputs(args: argparse.Namespace) -> list[Any]:
    from .dev.messages import parse_json_inputs

    if (args.json is None) == (args.file is None):
        raise _UsageError("give the request with --json '{...}' or --file FILE (JSON or JSON lines)")
    if args.json is not None:
        return parse_json_inputs(args.json, "--json")
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        raise _UsageError(f"--file {args.file}: {exc.strerror}") from None
    return parse_json_inputs(text, f"--file {args.file}")


def _messages(type_name: str | None, values: list[Any], directories: list[Any]) -> list[Any]:
    from .dev.messages import find_message_type, from_json

    if not type_name:
        raise _UsageError("--type is required: the request's message, e.g. --type Request")
    cls = find_message_type(type_name, directories)
    return [from_json(value, cls) for value in values]


async def _call(args: argparse.Namespace) -> int:
    import uuid
    from pathlib import Path

    from .dev.calling import call_workflow
    from .dev.messages import to_json
    from .dev.up import read_endpoint
    from .dev.workflow import load_workflow

    deployed = [args.nats, args.stream, args.subject]
    if args.workflow and any(deployed):
        raise _UsageError("give WORKFLOW.yaml (a workflow started by `kre-runner up`) or --nats/--stream/--subject "
                          "(a deployed one), not both")
    default_type = None
    workflow = None
    if args.workflow:
        workflow = load_workflow(args.workflow)
        endpoint = read_endpoint(workflow.path)
        if endpoint is None:
            raise _Failure(f"{args.workflow} is not running: start it with `kre-runner up {args.workflow}` "
                           f"(in another terminal), or call a deployed workflow with --nats --stream --subject")
        url, input_subject, entrypoint = endpoint.nats_url, endpoint.input_subject, endpoint.entrypoint_subject
        directories = [d for node in workflow.nodes for d in node.directories]
        default_type = workflow.request_type
    elif all(deployed):
        url, input_subject = args.nats, args.subject
        entrypoint = args.entrypoint or f"{args.stream}.entrypoint"
        directories = [Path.cwd()]
    else:
        raise _UsageError("give WORKFLOW.yaml, or --nats URL --stream STREAM --subject SUBJECT for a deployed workflow")
    directories += [Path(p) for p in args.proto_path]
    requests = _messages(args.type_name or default_type, _read_inputs(args), directories)
    if workflow is not None and workflow.generation == "v3":
        return await _call_v3(url, workflow.stream, requests, args.timeout, args.every)
    if args.every:
        raise _UsageError("--all shows every envelope of a KRE 3.x workflow (nodes with inputs:); a v2 request's "
                          "path is shown by kre-runner trace")
    nc = await _connect(url)
    tracking_ids = [str(uuid.uuid4()) for _ in requests]
    # On stderr before the answers: stdout stays JSON, and a request that gets none can still be traced.
    for i, tracking_id in enumerate(tracking_ids, 1):
        print(f"kre-runner call: {f'request {i}: ' if len(requests) > 1 else ''}tracking id {tracking_id}",
              file=sys.stderr, flush=True)
    try:
        answers = await call_workflow(nc, input_subject, entrypoint, requests, args.timeout, tracking_ids)
    finally:
        await nc.close()
    failed = 0
    for answer in answers:
        if answer.error:
            failed += 1
            print(answer.error, file=sys.stderr)
        else:
            print(to_json(answer.payload), flush=True)
    return 1 if failed else 0


def _run_once(args: argparse.Namespace) -> int:
    from pathlib import Path

    file_part, _, function = args.handler.rpartition(":")
    if not file_part or "/" in function or function.endswith(".py"):
        file_part = args.handler
    if not Path(file_part).is_file():
        print(f"kre-runner run-once: handler file {file_part} does not exist (HANDLER is file.py or "
              f"file.py:function)", file=sys.stderr)
        return 2
    return _tool("run-once", _run_handler_once(args))


async def _run_handler_once(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    from .dev.run_once import run_once
    from .handler import load_user_code

    values = _read_inputs(args)  # bad input is reported before the handler is imported
    asked = os.environ.get("KRT_LOG_LEVEL", "").strip().upper()
    level = asked if asked in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO"
    configure_logging(level, stream=sys.stderr)
    if not asked:
        # The runner's own INFO lines (which services are disabled) only when asked with KRT_LOG_LEVEL;
        # the handler's ctx.logger lines always.
        logging.getLogger("kre_runner").setLevel(logging.WARNING)
        logging.getLogger("kre_runner.handler").setLevel(logging.INFO)
    env = dict(os.environ)
    if args.mongo:
        env["KRT_MONGO_URI"] = args.mongo
    if args.influx:
        env["KRT_INFLUX_URI"] = args.influx
    code = load_user_code(Path.cwd(), args.handler)
    messages = _messages(args.type_name, values, [code.path.parent])
    with contextlib.ExitStack() as stack:
        if args.services:
            from .dev.up import start_local_services

            def skipped(text: str) -> None:  # only what could not start: the stored data is printed at the end
                if "SKIPPED" in text:
                    print(f"kre-runner run-once: {text}", file=sys.stderr)

            local = {k: v for k, v in start_local_services(stack, skipped).items()
                     if k not in env or not env[k].strip()}
            env.update(local)
        status = await run_once(code, messages, sys.stdout, sys.stderr, env=env)
        if args.services:
            from .dev.stored import stored

            db = env.get("KRT_MONGO_DB") or f"{env.get('KRT_RUNTIME_ID') or 'local'}-data"
            for line in await stored(env.get("KRT_MONGO_URI"), db, env.get("KRT_INFLUX_URI")):
                print(f"kre-runner run-once: {line}", file=sys.stderr)
    return status


async def _call_v3(url: str, stream: str, requests: list[Any], timeout: float, every: bool) -> int:
    """Call a 3.x workflow: the exitpoint's first envelope per request as JSON, or with ``every`` each envelope."""
    import json
    import uuid

    from .dev.calling import call_workflow_v3
    from .dev.messages import to_dict, to_json
    from .proto.kre_nats_msg_v3_pb2 import MessageType

    nc = await _connect(url)
    request_ids = [str(uuid.uuid4()) for _ in requests]
    for i, request_id in enumerate(request_ids, 1):
        print(f"kre-runner call: {f'request {i}: ' if len(requests) > 1 else ''}request id {request_id}",
              file=sys.stderr, flush=True)
    try:
        result = await call_workflow_v3(nc, stream, requests, timeout, request_ids, every=every)
    finally:
        await nc.close()
    failed = sum(1 for answer in result.answers if answer.message_type == MessageType.ERROR)
    if every:
        for subject, envelope in result.seen:
            node, _, channel = subject[len(stream) + 1:].partition(".")
            line = {"request_id": envelope.request_id, "node": node, "channel": channel,
                    "message_type": MessageType.Name(envelope.message_type),
                    "payload": to_dict(envelope.payload) if envelope.payload.type_url else None}
            if envelope.error:
                line["error"] = envelope.error
            print(json.dumps(line, ensure_ascii=False), flush=True)
        return 1 if failed else 0
    for answer in result.answers:
        if answer.message_type == MessageType.ERROR:
            print(answer.error, file=sys.stderr)
        else:
            print(to_json(answer.payload), flush=True)
    return 1 if failed else 0


async def _check() -> int:
    from .dev.check import run_checks

    findings = await run_checks(os.environ)
    for finding in findings:
        print(finding.line())
    return 0 if all(f.ok for f in findings) else 1


async def _stream_create(args: argparse.Namespace) -> int:

    from .nats.streams import ensure_key_value, ensure_object_store, ensure_stream

    url = args.nats or os.environ.get("KRT_NATS_SERVER", "").strip()
    stream = args.stream or os.environ.get("KRT_NATS_STREAM", "").strip()
    if args.workflow:
        workflow, url = _workflow_server(args.workflow, args.nats)
        stream = args.stream or workflow.stream
    if not url or not stream:
        raise _UsageError("set KRT_NATS_SERVER and KRT_NATS_STREAM (or pass --nats URL --stream NAME, or "
                          "WORKFLOW.yaml), e.g. KRT_NATS_STREAM=demo-v1-greeter")
    if any(c in stream for c in ".*> \t/\\"):
        raise _UsageError(f"stream name {stream!r} is invalid: no . * > / \\ or spaces, e.g. demo-v1-greeter")
    buckets = {name: os.environ.get(name, "").strip() for name in _BUCKET_VARIABLES} if not args.workflow else {}
    bad = [f"{name}={bucket!r}" for name, bucket in buckets.items() if bucket and not _valid_bucket(bucket)]
    if bad:
        raise _UsageError(f"{', '.join(bad)}: a bucket name is letters, digits, - and _, e.g. key-store_demo_v1")
    nc = await _connect(url)
    lines = []
    try:
        js = nc.jetstream()
        created = await ensure_stream(js, stream)
        lines.append(f"stream {stream} {'created' if created else 'already exists'} (subjects {stream}.*, "
                     f"interest retention)")
        for name, bucket in buckets.items():
            if not bucket:
                continue
            if name == "KRT_NATS_OBJECT_STORE":
                made = await ensure_object_store(js, bucket)
                lines.append(f"object store {bucket} {'created' if made else 'already exists'} ({name})")
            else:
                made = await ensure_key_value(js, bucket)
                lines.append(f"key-value bucket {bucket} {'created' if made else 'already exists'} ({name})")
    except Exception as exc:
        raise _Failure(f"JetStream refused: {type(exc).__name__}: {exc} (is nats-server started with -js?)") from None
    finally:
        await nc.close()
        for line in lines:
            print(line)
    return 0


_BUCKET_VARIABLES = ("KRT_NATS_KEY_VALUE_STORE_PROJECT", "KRT_NATS_KEY_VALUE_STORE_WORKFLOW",
                     "KRT_NATS_KEY_VALUE_STORE_NODE", "KRT_NATS_OBJECT_STORE")


def _valid_bucket(name: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None


async def _config(args: argparse.Namespace) -> int:
    from nats.js.errors import InvalidKeyError

    from .services.configuration import (
        SCOPE_VARIABLES,
        ConfigurationKeyNotFound,
        ConfigurationUnavailable,
        open_configuration,
    )

    url = args.nats or os.environ.get("KRT_NATS_SERVER", "").strip()
    if args.key and args.key.endswith((".yaml", ".yml")):
        url, buckets = _workflow_buckets(args)
    else:
        if args.rest is not None:
            raise _UsageError(f"unexpected {args.rest!r}: config {args.action} [WORKFLOW.yaml] KEY [VALUE]")
        buckets = {scope: getattr(args, scope) or os.environ.get(variable, "").strip()
                   for scope, variable in SCOPE_VARIABLES.items()}
    buckets = {scope: bucket for scope, bucket in buckets.items() if bucket}
    if not url or not buckets:
        raise _UsageError("set KRT_NATS_SERVER and KRT_NATS_KEY_VALUE_STORE_PROJECT/_WORKFLOW/_NODE (a node's "
                          "environment), or pass --nats URL and --project/--workflow/--node BUCKET")
    bad = [bucket for bucket in buckets.values() if not _valid_bucket(bucket)]
    if bad:
        raise _UsageError(f"bucket {bad[0]!r} is invalid: letters, digits, - and _, e.g. key-store_demo_v1")
    if args.action != "list" and not args.key:
        raise _UsageError(f"config {args.action} needs a KEY")
    if (args.action == "set") != (args.value is not None):
        raise _UsageError("config set needs KEY and VALUE" if args.action == "set" else
                          f"config {args.action} takes no VALUE")
    quiet = logging.getLogger("kre_runner.cli.config")
    quiet.propagate = False  # a missing bucket is this command's one-line error, not a warning too
    nc = await _connect(url)
    try:
        config = await open_configuration(nc.jetstream(), buckets, quiet)
        try:
            if args.action == "get":
                print(await config.get(args.key, args.scope))
            elif args.action == "set":
                await config.set(args.key, args.value, args.scope or "node")
            elif args.action == "delete":
                await config.delete(args.key, args.scope or "node")
            else:
                for key in await config.list(args.scope):
                    print(key)
        finally:
            await config.close()
    except (ConfigurationKeyNotFound, ConfigurationUnavailable) as exc:
        raise _Failure(str(exc)) from None
    except InvalidKeyError:
        raise _UsageError(f"key {args.key!r} is invalid: letters, digits and - / _ = . "
                          f"(e.g. model.threshold)") from None
    finally:
        await nc.close()
    return 0


def _workflow_buckets(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """``config ACTION WORKFLOW.yaml KEY [VALUE] [--node NODE]``: that workflow's buckets, on its server."""
    from .services.configuration import SCOPE_VARIABLES

    if args.project or args.workflow:
        raise _UsageError("with WORKFLOW.yaml the buckets are the workflow's: --node NODE names a node, "
                          "--project/--workflow BUCKET are for a node's environment")
    workflow, url = _workflow_server(args.key, args.nats)
    args.key, args.value, args.rest = args.value, args.rest, None
    if not workflow.uses_configuration:
        raise _UsageError(f"{workflow.path.name} has no configuration buckets: add `configuration: true` at its "
                          f"top (a KRE 3.x workflow always has them) and restart `kre-runner up`")
    node = None
    if args.node:
        try:
            node = workflow.node(args.node)
        except KeyError as exc:
            raise _UsageError(exc.args[0]) from None
    elif args.scope == "node":
        raise _UsageError("--scope node needs --node NODE (one of the workflow's nodes)")
    elif args.action in ("set", "delete") and not args.scope:
        args.scope = "workflow"  # no node named: the workflow's bucket, which every node reads
    variables = workflow.buckets(node)
    return url, {scope: variables[variable] for scope, variable in SCOPE_VARIABLES.items() if variable in variables}


async def _connect(url: str) -> Any:
    """A short-lived connection for a command: one try, and one line when it fails."""
    from .nats.connection import connect_once

    try:
        return await connect_once(url)
    except StartupError as exc:
        raise _Failure(str(exc)) from None


async def _dead_letter(args: argparse.Namespace) -> int:
    import json

    from nats.js.errors import NotFoundError

    from .dev import deadletters as deadletter

    url = args.nats or os.environ.get("KRT_NATS_SERVER", "").strip()
    workflow_stream = os.environ.get("KRT_NATS_STREAM", "").strip()
    dead_letter_stream = os.environ.get("KRT_DEAD_LETTER_STREAM", "").strip()
    words = list(args.seq)
    if words and words[0].endswith((".yaml", ".yml")):
        workflow, url = _workflow_server(words.pop(0), args.nats)
        workflow_stream = workflow.stream
        dead_letter_stream = workflow.node_env(workflow.nodes[0], url).get("KRT_DEAD_LETTER_STREAM", "")
    try:
        args.seq = [int(word) for word in words]
    except ValueError:
        raise _UsageError(f"dead-letter {args.action}: expected [WORKFLOW.yaml] then sequence numbers, got "
                          f"{' '.join(words)}") from None
    stream = args.stream or dead_letter_stream or (f"{workflow_stream}-dead-letter" if workflow_stream else "")
    if not url or not stream:
        raise _UsageError("give WORKFLOW.yaml (`dead-letter list workflow.yaml`), or set KRT_NATS_SERVER and "
                          "KRT_NATS_STREAM (or pass --nats URL --stream DEAD_LETTER_STREAM)")
    if args.action in ("replay", "purge") and not args.seq and not args.all:
        raise _UsageError(f"{args.action} needs dead-letter sequence numbers or --all")
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        try:
            letters = await deadletter.read(js, stream, args.node)
        except NotFoundError:
            raise _Failure(f"dead-letter stream {stream!r} does not exist: no node has dead-lettered anything "
                           f"(or set KRT_DEAD_LETTER_STREAM / --stream)") from None
        chosen = letters if (args.all or not args.seq) else [d for d in letters if d.seq in set(args.seq)]
        missing = set(args.seq) - {d.seq for d in letters}
        if missing:
            raise _Failure(f"no dead letter {', '.join(map(str, sorted(missing)))} in {stream}")
        for letter in chosen:
            h = letter.headers
            if args.action == "list":
                print(f"{letter.seq:>6}  {h.get('Kre-Time', '?')}  {h.get('Kre-Node', '?')}  "
                      f"{h.get('Kre-Subject', '?')} seq {h.get('Kre-Sequence', '?')}  "
                      f"({h.get('Kre-Deliveries', '?')} deliveries): {h.get('Kre-Error', '')[:120]}")
            elif args.action == "show":
                envelope = letter.envelope()
                print(json.dumps({"seq": letter.seq, "subject": letter.subject, "headers": h, "bytes": len(letter.data),
                                  "tracking_id": envelope.tracking_id if envelope else None,
                                  "payload_type": envelope.payload.type_url if envelope else None}, indent=2))
            elif args.action == "replay":
                await deadletter.replay(js, stream, letter)
                print(f"replayed {letter.seq} to {h.get('Kre-Subject')}")
            else:
                await js.delete_msg(stream, letter.seq)
                print(f"purged {letter.seq}")
        if args.action == "list":
            print(f"{len(chosen)} dead letter(s) in {stream}")
    finally:
        await nc.close()
    return 0


def _workflow_server(path: str, nats_url: str | None) -> tuple[Any, str]:
    """A workflow YAML and its NATS server: --nats (deployed), else the one its running ``up`` uses."""
    from .dev.up import read_endpoint
    from .dev.workflow import load_workflow

    workflow = load_workflow(path)
    if nats_url:
        return workflow, nats_url
    endpoint = read_endpoint(workflow.path)
    if endpoint is None:
        raise _Failure(f"{path} is not running: start it with `kre-runner up {path}` (in another terminal), or "
                       f"give a deployed workflow's server with --nats URL")
    return workflow, endpoint.nats_url


async def _trace(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .dev.trace import trace
    from .dev.up import read_endpoint

    workflow, url = _workflow_server(args.workflow, args.nats)
    endpoint = None if args.nats else read_endpoint(workflow.path)
    run_dir = Path(endpoint.run_dir) if endpoint is not None and endpoint.run_dir else None
    nc = await _connect(url)
    try:
        found, lines = await trace(nc.jetstream(), workflow, args.tracking_id, url, run_dir)
    finally:
        await nc.close()
    for line in lines:
        print(line)
    return 0 if found else 1


async def _stored(args: argparse.Namespace) -> int:
    from .dev.stored import stored
    from .dev.up import read_endpoint

    mongo = args.mongo or os.environ.get("KRT_MONGO_URI", "").strip()
    influx = args.influx or os.environ.get("KRT_INFLUX_URI", "").strip()
    runtime = os.environ.get("KRT_RUNTIME_ID", "").strip()
    db = args.db or os.environ.get("KRT_MONGO_DB", "").strip() or (f"{runtime}-data" if runtime else "")
    if args.workflow:
        from .dev.workflow import load_workflow

        workflow = load_workflow(args.workflow)
        endpoint = read_endpoint(workflow.path)
        if endpoint is None:
            raise _Failure(f"{args.workflow} is not running: start it with `kre-runner up {args.workflow} --services`, "
                           f"or give --mongo URI --db DB / --influx URL")
        mongo, influx = mongo or endpoint.mongo_uri, influx or endpoint.influx_url
        db = args.db or endpoint.mongo_db or f"{workflow.runtime}-data"
    if not (mongo and db) and not influx:
        raise _UsageError("give WORKFLOW.yaml (run by `kre-runner up --services`), or --mongo URI --db DATABASE "
                          "and/or --influx URL")
    for line in await stored(mongo or None, db or None, influx or None):
        print(line)
    return 0


def _up(args: argparse.Namespace) -> int:
    import contextlib

    from .dev.workflow import WorkflowError, load_workflow

    try:
        workflow = load_workflow(args.workflow)
    except WorkflowError as exc:
        print(f"kre-runner up: {exc}", file=sys.stderr)
        return 2
    return _tool("up", _run_up(workflow, args.nats, args.reload, args.services, contextlib.ExitStack()))


async def _run_up(workflow: Any, nats_url: str | None, reload: bool, services: bool, stack: Any) -> int:
    import time

    from .dev.up import LocalWorkflow, how_to_call, start_local_services

    started = time.monotonic()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: its terminal was closed; everything it started stops as on Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)

    extra: dict[str, str] | None = None

    def ready(endpoint: Any) -> None:
        reloading = "; --reload: a node restarts when its code changes" if reload else ""
        print(f"kre-runner up: {how_to_call(workflow, endpoint, extra)}\n"
              f"  (ready {time.monotonic() - started:.1f}s after start{reloading})", flush=True)

    with stack:
        extra = start_local_services(stack, lambda text: print(f"kre-runner up: {text}")) if services else None
        async with LocalWorkflow(workflow, nats_url=nats_url, reload=reload, extra_env=extra, on_ready=ready,
                                 record=True) as local:
            code = await local.wait(stop)
        print("kre-runner up: stopped", flush=True)
    return code
