"""A workflow YAML (what ``up``, ``call`` and ``demo`` run) and the environment the KRE manager gives each node.

```yaml
workflow: greeter            # runtime: (default local), version: (default v1)
env: {KRT_LOG_LEVEL: INFO}   # optional, every node
request: {type: Request, example: {name: Ann}}   # optional: call's default --type, up's hint
nodes:                       # in order; the last one answers the entrypoint
  - name: greeter
    handler: greeter.py      # relative to this file; file.py:function names another function
  - name: decorator
    handler: decorator.py:decorate
    env: {KRT_HANDLER_THREADS: "2"}
    replicas: 2
    base_path: .             # optional: KRT_BASE_PATH (default: the handler file's directory)
```

A node with ``inputs:`` makes the file a KRE 3.x workflow (every node then has them): an input names
an upstream node, ``entrypoint`` or ``node.channel``; the node named ``exitpoint`` answers the caller.
The stream, subjects and buckets are laid out as the 3.x manager does (``kre-v3-reference.md``):

```yaml
workflow: greet
nodes:
  - {name: nodeA, handler: a.py, inputs: [entrypoint]}
  - {name: nodeB, handler: b.py, inputs: [nodeA.left]}
  - {name: exitpoint, handler: exit.py, inputs: [nodeA, nodeB]}
```

A v2 file gets ``ctx.configuration`` / ``ctx.object_store`` with ``configuration: true`` /
``object_store: true`` at its top (a 3.x file always has both, as the manager gives them).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nats.streams import StreamLayout, stream_name

__all__ = ["EXITPOINT", "NodeSpec", "Workflow", "WorkflowError", "load_workflow"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_TOP_KEYS = {"workflow", "runtime", "version", "env", "request", "nodes", "configuration", "object_store"}
_NODE_KEYS = {"name", "handler", "env", "replicas", "base_path", "inputs"}
EXITPOINT = "exitpoint"  # the 3.x node whose output answers the caller


class WorkflowError(ValueError):
    """The YAML does not describe a runnable workflow; the message lists every problem."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{path}: " + ("\n  ".join(["invalid workflow:", *problems]) if len(problems) > 1
                                        else problems[0]))


@dataclass(frozen=True)
class NodeSpec:
    name: str
    handler_file: Path  # absolute
    function: str | None
    base_path: Path  # absolute
    env: Mapping[str, str] = field(default_factory=dict)
    replicas: int = 1
    inputs: tuple[str, ...] = ()  # KRE 3.x: upstream node names, "entrypoint" or "node.channel"

    @property
    def handler_path(self) -> str:
        """``KRT_HANDLER_PATH``: the file relative to ``KRT_BASE_PATH`` (``file.py:function`` if named)."""
        rel = os.path.relpath(self.handler_file, self.base_path)
        return f"{rel}:{self.function}" if self.function else rel

    @property
    def directories(self) -> list[Path]:
        """Where this node's code and files live (watched by ``--reload``, searched for ``*_pb2``)."""
        dirs = [self.handler_file.parent]
        if self.base_path != self.handler_file.parent:
            dirs.append(self.base_path)
        return dirs


@dataclass(frozen=True)
class Workflow:
    path: Path  # the YAML, absolute
    name: str
    runtime: str
    version: str
    nodes: tuple[NodeSpec, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    request_type: str | None = None
    request_example: Any = None
    configuration: bool = False  # the key-value buckets of ctx.configuration (always in 3.x)
    object_store: bool = False  # the object store of ctx.object_store (always in 3.x)

    @property
    def generation(self) -> str:
        """``v3`` when the nodes name their ``inputs:`` (the 3.x manager's fan-in layout), else ``v2``."""
        return "v3" if self.nodes and self.nodes[0].inputs else "v2"

    @property
    def stream(self) -> str:
        if self.generation == "v3":
            return f"{self.runtime}_{self.version}_{self.name}"  # as the 3.x manager spells it
        return stream_name(self.runtime, self.version, self.name)

    @property
    def layout(self) -> StreamLayout:
        return StreamLayout(self.stream)

    @property
    def stream_subjects(self) -> list[str]:
        """The stream's subjects: ``{stream}.*``, and in 3.x ``{stream}.{node}.*`` for each node's channels."""
        subjects = self.layout.subjects
        if self.generation == "v3":
            subjects += [f"{self.stream}.{node.name}.*" for node in self.nodes]
        return subjects

    @property
    def input_subject(self) -> str:
        """Where the entrypoint sends requests: the first node's input (3.x: ``{stream}.entrypoint``)."""
        if self.generation == "v3":
            return self.layout.entrypoint
        return self.layout.node_subject(self.nodes[0].name)

    @property
    def answer_subject(self) -> str:
        """Where the answers come: v2 ``{stream}.entrypoint``; 3.x the exitpoint's output ``{stream}.exitpoint``."""
        return self.layout.node_subject(EXITPOINT) if self.generation == "v3" else self.layout.entrypoint

    def input_subjects(self, node: NodeSpec) -> list[str]:
        """A 3.x node's ``KRT_NATS_INPUTS``: ``{stream}.{input}`` (``node.channel`` → ``{stream}.node.channel``)."""
        return [f"{self.stream}.{name}" for name in node.inputs]

    @property
    def uses_configuration(self) -> bool:
        return self.configuration or self.generation == "v3"

    @property
    def uses_object_store(self) -> bool:
        return self.object_store or self.generation == "v3"

    def buckets(self, node: NodeSpec | None = None) -> dict[str, str]:
        """The data-store variables the manager sets (key-value per scope, the object store), by variable name.

        ``node`` None: the project and workflow scopes and the object store only (what every node shares).
        """
        base = f"{self.runtime}_{self.version}"
        out: dict[str, str] = {}
        if self.uses_configuration:
            out["KRT_NATS_KEY_VALUE_STORE_PROJECT"] = f"key-store_{base}"
            out["KRT_NATS_KEY_VALUE_STORE_WORKFLOW"] = f"key-store_{base}_{self.name}"
            if node is not None:
                out["KRT_NATS_KEY_VALUE_STORE_NODE"] = f"key-store_{base}_{self.name}_{node.name}"
        if self.uses_object_store:
            out["KRT_NATS_OBJECT_STORE"] = f"object-store_{base}_{self.name}"
        return out

    def node(self, name: str) -> NodeSpec:
        """The node called ``name``; KeyError naming the nodes there are."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in {self.path.name} (nodes: {', '.join(n.name for n in self.nodes)})")

    def example_json(self) -> str:
        return json.dumps(self.request_example if self.request_example is not None else {}, ensure_ascii=False)

    def node_env(self, node: NodeSpec, nats_url: str) -> dict[str, str]:
        """The ``KRT_*`` variables the KRE K8s manager would give ``node``'s pod, then the YAML's ``env``."""
        if self.generation == "v3":
            return self._node_env_v3(node, nats_url)
        layout = self.layout
        index = self.nodes.index(node)
        last = index == len(self.nodes) - 1
        return self._pod_env(node, nats_url, {
            "KRT_NATS_INPUT": layout.node_subject(node.name),
            "KRT_NATS_OUTPUT": layout.entrypoint if last else layout.node_subject(self.nodes[index + 1].name),
            "KRT_NATS_ENTRYPOINT_SUBJECT": layout.entrypoint,
            "KRT_IS_LAST_NODE": "true" if last else "false",
        })

    def _node_env_v3(self, node: NodeSpec, nats_url: str) -> dict[str, str]:
        """What the 3.x manager sets: the inputs comma-separated, the output ``{stream}.{node}``, every bucket."""
        return self._pod_env(node, nats_url, {
            "KRT_NATS_INPUTS": ",".join(self.input_subjects(node)),
            "KRT_NATS_OUTPUT": self.layout.node_subject(node.name),
        })

    def _pod_env(self, node: NodeSpec, nats_url: str, subjects: dict[str, str]) -> dict[str, str]:
        """A node's pod environment: what both generations' managers set, its ``subjects``, the buckets, then the
        workflow's and the node's own ``env`` (which win)."""
        env = {
            "KRT_WORKFLOW_NAME": self.name,
            "KRT_RUNTIME_ID": self.runtime,
            "KRT_VERSION_ID": f"{self.version}-id",
            "KRT_VERSION": self.version,
            "KRT_NODE_NAME": node.name,
            "KRT_NATS_SERVER": nats_url,
            "KRT_NATS_STREAM": self.stream,
            **subjects,
            "KRT_BASE_PATH": str(node.base_path),
            "KRT_HANDLER_PATH": node.handler_path,
            # Local runs stop on Ctrl-C: a pod's 25 s grace would only make the developer wait.
            "KRT_SHUTDOWN_GRACE": "5",
            **self.buckets(node),
        }
        env.update(self.env)
        env.update(node.env)
        return env


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow YAML; raise :class:`WorkflowError` naming every problem."""
    import yaml  # only the workflow commands pay for it

    file = Path(path).expanduser()
    if not file.is_file():
        raise WorkflowError(file, ["no such file (expected a workflow YAML, e.g. examples/workflow.yaml)"])
    file = file.resolve()
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise WorkflowError(file, [f"not valid YAML{at}: {getattr(exc, 'problem', None) or exc}"]) from None
    return _parse(file, data)


def _parse(file: Path, data: Any) -> Workflow:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise WorkflowError(file, ["expected a mapping with keys workflow: and nodes:"])
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"unknown key {key!r} (expected {', '.join(sorted(_TOP_KEYS))})")
    name = _name(data.get("workflow"), "workflow", problems, required=True)
    runtime = _name(data.get("runtime", "local"), "runtime", problems)
    version = _name(data.get("version", "v1"), "version", problems)
    env = _env(data.get("env"), "env", problems)
    request_type, example = _request(data.get("request"), problems)
    nodes: list[NodeSpec] = []
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        problems.append("nodes: expected a list of at least one node, e.g. [{name: greeter, handler: greeter.py}]")
        raw_nodes = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_nodes, 1):
        node = _node(file.parent, raw, f"nodes[{i}]", problems)
        if node is None:
            continue
        if node.name in seen:
            problems.append(f"nodes[{i}]: name {node.name!r} is used twice")
        seen.add(node.name)
        nodes.append(node)
    if "entrypoint" in seen:
        problems.append("a node cannot be called 'entrypoint': that subject is the workflow's answer")
    _check_inputs(nodes, problems)
    flags = {key: _flag(data.get(key), key, problems) for key in ("configuration", "object_store")}
    if problems:
        raise WorkflowError(file, problems)
    return Workflow(path=file, name=name, runtime=runtime, version=version, nodes=tuple(nodes), env=env,
                    request_type=request_type, request_example=example, **flags)


def _flag(value: Any, key: str, problems: list[str]) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        problems.append(f"{key}: {value!r} is invalid: expected true or false")
        return False
    return value


def _check_inputs(nodes: list[NodeSpec], problems: list[str]) -> None:
    """A 3.x file: every node has inputs, each naming ``entrypoint``, another node or ``node.channel``."""
    with_inputs = [n.name for n in nodes if n.inputs]
    if not with_inputs:
        return
    without = [n.name for n in nodes if not n.inputs]
    if without:
        problems.append(f"nodes {', '.join(without)} have no inputs: while {', '.join(with_inputs)} have, "
                        f"which makes this a KRE 3.x workflow (v2 and 3.x nodes cannot mix): give every node "
                        f"inputs: [entrypoint | NODE | NODE.CHANNEL], or none (a v2 chain in file order)")
        return
    names = {n.name for n in nodes}
    for node in nodes:
        for name in node.inputs:
            upstream, _, channel = name.partition(".")
            if name == "entrypoint":
                continue
            if upstream == node.name:
                problems.append(f"node {node.name!r}: input {name!r} is its own output (a loop)")
            elif upstream not in names:
                problems.append(f"node {node.name!r}: input {name!r} names no node (nodes: {', '.join(sorted(names))}; "
                                f"or entrypoint)")
            elif "." in channel:
                problems.append(f"node {node.name!r}: input {name!r} is invalid: expected NODE or NODE.CHANNEL")
    if EXITPOINT not in names:
        problems.append(f"no node is called {EXITPOINT!r}: in KRE 3.x the node named exitpoint answers the caller "
                        f"(add one, e.g. {{name: exitpoint, handler: exit.py, inputs: [{nodes[-1].name}]}})")
    if not any("entrypoint" in n.inputs for n in nodes):
        problems.append("no node reads the entrypoint: give the first node inputs: [entrypoint]")


def _name(value: Any, key: str, problems: list[str], required: bool = False) -> str:
    if value is None and required:
        problems.append(f"{key}: is missing (a name, e.g. {key}: greeter)")
        return ""
    if not isinstance(value, (str, int)) or not _NAME_RE.match(str(value)):
        problems.append(f"{key}: {value!r} is invalid: expected letters, digits, - or _ (it names subjects)")
        return ""
    return str(value)


def _env(value: Any, where: str, problems: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping of variables, e.g. {{KRT_HANDLER_THREADS: \"2\"}}")
        return {}
    env = {}
    for key, raw in value.items():
        if isinstance(raw, bool):
            env[str(key)] = "true" if raw else "false"
        elif isinstance(raw, (str, int, float)):
            env[str(key)] = str(raw)
        else:
            problems.append(f"{where}.{key}: expected a string or a number, got {type(raw).__name__}")
    return env


def _request(value: Any, problems: list[str]) -> tuple[str | None, Any]:
    if value is None:
        return None, None
    if isinstance(value, str):
        return value, None
    if isinstance(value, dict) and isinstance(value.get("type"), str) and set(value) <= {"type", "example"}:
        return value["type"], value.get("example")
    problems.append("request: expected a message type name or {type: Request, example: {name: Ann}}")
    return None, None


def _node(directory: Path, raw: Any, where: str, problems: list[str]) -> NodeSpec | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping with name: and handler:")
        return None
    name = _name(raw.get("name"), f"{where}.name", problems, required=True)
    where = f"node {name!r}" if name else where
    for key in sorted(set(raw) - _NODE_KEYS):
        problems.append(f"{where}: unknown key {key!r} (expected {', '.join(sorted(_NODE_KEYS))})")
    spec = raw.get("handler")
    if not isinstance(spec, str) or not spec.strip():
        problems.append(f"{where}: handler: is missing (a file relative to the YAML, e.g. handler: greeter.py)")
        return None
    file_part, _, function = spec.rpartition(":")
    if not file_part or "/" in function or function.endswith(".py"):
        file_part, function = spec, ""
    handler_file = (directory / file_part).resolve()
    if not handler_file.is_file():
        problems.append(f"{where}: handler file {handler_file} does not exist")
    base = raw.get("base_path")
    base_path = (directory / str(base)).resolve() if base is not None else handler_file.parent
    if base is not None and not base_path.is_dir():
        problems.append(f"{where}: base_path {base_path} is not a directory")
    replicas = raw.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        problems.append(f"{where}: replicas: {replicas!r} is invalid: expected an integer ≥ 1")
        replicas = 1
    env = _env(raw.get("env"), f"{where}.env", problems)
    return NodeSpec(name=name, handler_file=handler_file, function=function or None, base_path=base_path, env=env,
                    replicas=replicas, inputs=_inputs(raw.get("inputs"), where, problems))


def _inputs(value: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and all(_NAME_RE.match(p) for p in v.split(".")) for v in value):
        problems.append(f"{where}: inputs: {value!r} is invalid: expected a list of entrypoint, NODE or "
                        f"NODE.CHANNEL, e.g. inputs: [entrypoint]")
        return ()
    if len(set(value)) != len(value):
        problems.append(f"{where}: inputs: {value!r} names an input twice")
    return tuple(value)
