"""ctx.db, ctx.prediction, ctx.measurement and the mongo-writer against real servers.

Every test reads back what it wrote: documents with a separate motor client, points from the
time-series database's own read API.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import MongoProcess, TimeSeriesDB, VictoriaMetricsProcess, unique
from kre_helpers import services_settings as settings
from nats.aio.client import Client

from kre_runner.config import Settings
from kre_runner.dev.embedded import EmbeddedNats
from kre_runner.services import Services, open_services
from kre_runner.services.influx import InfluxSink, Measurement
from kre_runner.services.mongo import DatabaseError
from kre_runner.services.mongo_writer import WriterSettings, serve

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOGGER = logging.getLogger("test.data")


async def docs_in(reader: Any, database: str, coll: str, query: dict[str, Any]) -> list[dict[str, Any]]:
    return await reader[database][coll].find(query, {"_id": 0}).to_list(None)


async def open_checked(config: Settings, nc: Client | None = None) -> Services:
    return await open_services(config, nc, LOGGER)


class Writer:
    """A mongo-writer served in-process until the test ends."""

    def __init__(self, nc: Client, subject: str, mongo_uri: str, database: str, timeout: float = 5.0) -> None:
        self.settings = WriterSettings(nats_servers=("unused",), mongo_writer_subject=subject, mongo_uri=mongo_uri,
                                       mongo_db=database, db_timeout=timeout)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(serve(self.settings, nc, self.stop, LOGGER))

    async def ready(self, nc: Client) -> None:
        # The subscription exists once a flush after serve's subscribe has round-tripped.
        for _ in range(100):
            await asyncio.sleep(0.01)
            await nc.flush()
            if any(sub.subject == self.settings.mongo_writer_subject for sub in nc._subs.values()):
                return
        raise TimeoutError("mongo-writer did not subscribe")

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


@pytest.fixture
async def writer(nc: Client, mongo_uri: str, mongo_db_name: str) -> AsyncIterator[Writer]:
    served = Writer(nc, f"mongo_writer_data.{unique('w')}", mongo_uri, mongo_db_name)
    await served.ready(nc)
    try:
        yield served
    finally:
        await served.close()


# --- ctx.db direct ------------------------------------------------------------------------------

async def test_direct_save_and_find(mongo_uri: str, mongo_db_name: str, motor_reader: Any) -> None:
    services = await open_checked(settings(KRT_MONGO_URI=mongo_uri, KRT_MONGO_DB=mongo_db_name))
    try:
        db = services.db
        assert db is not None
        doc = {"name": "ada", "n": 1, "tags": ["x", "y"], "nested": {"k": 1.5}}
        await db.save("people", doc)
        assert doc == {"name": "ada", "n": 1, "tags": ["x", "y"], "nested": {"k": 1.5}}  # caller's dict untouched
        for n in range(2, 7):
            await db.save("people", {"name": f"p{n}", "n": n, "group": "g"})

        assert await docs_in(motor_reader, mongo_db_name, "people", {"name": "ada"}) == [doc]

        found = await db.find("people", {"name": "ada"})
        assert len(found) == 1 and isinstance(found[0]["_id"], str) and len(found[0]["_id"]) == 24
        assert {k: v for k, v in found[0].items() if k != "_id"} == doc
        json.dumps(found)  # JSON-friendly

        top = await db.find("people", {"group": "g"}, projection={"n": 1, "_id": 0}, sort=[("n", -1)], limit=3)
        assert top == [{"n": 6}, {"n": 5}, {"n": 4}]
        ascending = await db.find("people", {"n": {"$gte": 5}}, projection=["n"], sort="n")
        assert [d["n"] for d in ascending] == [5, 6] and set(ascending[0]) == {"_id", "n"}
        by_dict = await db.find("people", {"group": "g"}, projection={"name": 1, "_id": 0}, sort={"n": 1}, limit=1)
        assert by_dict == [{"name": "p2"}]
        assert await db.find("people", {"name": "nobody"}) == []
    finally:
        await services.close(1)


async def test_prediction_saved_in_original_shape(mongo_uri: str, mongo_db_name: str, motor_reader: Any) -> None:
    services = await open_checked(settings(KRT_MONGO_URI=mongo_uri, KRT_MONGO_DB=mongo_db_name))
    try:
        prediction = services.prediction
        assert prediction is not None
        await prediction.save("cat", "dog", extra={"score": 0.9})
        await prediction.save(error=prediction.ERR_MISSING_VALUES)
        with pytest.raises(ValueError, match="must be non-empty strings"):
            await prediction.save("cat", "")
        stored = await docs_in(motor_reader, mongo_db_name, "classificationMetrics", {"versionId": "v1-id"})
        assert len(stored) == 2
        first, second = sorted(stored, key=lambda d: d["error"])
        assert set(first) == {"date", "error", "predictedValue", "trueValue", "extra", "versionId", "versionName"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["date"])
        assert (first["predictedValue"], first["trueValue"], first["extra"], first["versionName"]) == (
            "cat", "dog", {"score": 0.9}, "v1")
        assert (second["error"], second["predictedValue"], second["trueValue"]) == ("missing_values", "", "")
    finally:
        await services.close(1)


# --- mongo-writer mode --------------------------------------------------------------------------

async def test_writer_mode_round_trip(nc: Client, writer: Writer, mongo_uri: str, mongo_db_name: str,
                                      motor_reader: Any) -> None:
    config = settings(KRT_MONGO_URI=mongo_uri, KRT_MONGO_DB=mongo_db_name,
                      KRT_NATS_MONGO_WRITER=writer.settings.mongo_writer_subject)
    services = await open_checked(config, nc)
    try:
        assert services.db is not None and services.prediction is not None
        assert "mongo-writer" in services.db.describe()
        await services.db.save("events", {"kind": "via-writer", "n": 1})
        await services.prediction.save("a", "b")
        assert await docs_in(motor_reader, mongo_db_name, "events", {"kind": "via-writer"}) == [
            {"kind": "via-writer", "n": 1}]
        found = await services.db.find("events", {"kind": "via-writer"})
        assert [d["n"] for d in found] == [1]
        stored = await docs_in(motor_reader, mongo_db_name, "classificationMetrics", {"predictedValue": "a"})
        assert stored[0]["trueValue"] == "b" and stored[0]["versionId"] == "v1-id"
    finally:
        await services.close(1)


async def test_writer_mode_without_uri_saves_but_cannot_find(nc: Client, writer: Writer, mongo_db_name: str,
                                                             motor_reader: Any) -> None:
    from kre_runner.context import ServiceNotConfigured

    services = await open_checked(settings(KRT_NATS_MONGO_WRITER=writer.settings.mongo_writer_subject,
                                           KRT_MONGO_DB=mongo_db_name), nc)
    try:
        assert services.db is not None
        await services.db.save("events", {"kind": "no-uri"})
        assert await docs_in(motor_reader, mongo_db_name, "events", {"kind": "no-uri"}) == [{"kind": "no-uri"}]
        with pytest.raises(ServiceNotConfigured, match="KRT_MONGO_URI"):
            await services.db.find("events", {"kind": "no-uri"})
    finally:
        await services.close(1)


async def test_writer_gzips_documents_over_the_payload_limit(nc: Client, writer: Writer, mongo_db_name: str,
                                                             motor_reader: Any) -> None:
    subject = writer.settings.mongo_writer_subject
    seen: list[bytes] = []

    async def record(msg: Any) -> None:
        seen.append(msg.data)

    spy = await nc.subscribe(subject, cb=record)  # not in the queue group: sees every request
    services = await open_checked(settings(KRT_NATS_MONGO_WRITER=subject, KRT_MONGO_DB=mongo_db_name), nc)
    try:
        assert services.db is not None
        blob = "".join(f"{i:07d}," for i in range(200_000))  # 1.6 MB, over NATS' default 1 MiB max_payload
        assert len(blob) > nc.max_payload
        await services.db.save("big", {"id": "large", "blob": blob})
        stored = await docs_in(motor_reader, mongo_db_name, "big", {"id": "large"})
        assert stored == [{"id": "large", "blob": blob}]
        assert seen and seen[0][:2] == b"\x1f\x8b" and len(seen[0]) < nc.max_payload
        assert json.loads(gzip.decompress(seen[0]))["doc"]["id"] == "large"
    finally:
        await spy.unsubscribe()
        await services.close(1)


async def test_writer_answers_bad_requests_and_keeps_serving(nc: Client, writer: Writer, mongo_db_name: str,
                                                             motor_reader: Any) -> None:
    subject = writer.settings.mongo_writer_subject
    for bad in (b"not json", b'{"doc": {"a": 1}}', b'{"coll": "", "doc": {}}', b'{"coll": "c", "doc": 3}',
                b"\x1f\x8b garbage", b"[1, 2]"):
        reply = json.loads((await nc.request(subject, bad, timeout=5)).data)
        assert reply["success"] is False and reply["error"].startswith("bad request"), (bad, reply)
    ok = json.loads((await nc.request(subject, b'{"coll": "c", "doc": {"still": "serving"}}', timeout=5)).data)
    assert ok == {"success": True}
    assert await docs_in(motor_reader, mongo_db_name, "c", {"still": "serving"}) == [{"still": "serving"}]


async def test_writer_without_responders_fails_fast(nc: Client) -> None:
    services = await open_checked(settings(KRT_NATS_MONGO_WRITER=f"mongo_writer_data.{unique('none')}",
                                           KRT_DB_TIMEOUT="2"), nc)
    assert services.db is not None
    started = time.monotonic()
    with pytest.raises(DatabaseError, match="mongo-writer"):
        await services.db.save("c", {"a": 1})
    assert time.monotonic() - started < 2.5
    await services.close(1)


async def test_mongo_writer_process_serves_and_stops_on_sigterm(nats_server: EmbeddedNats, nc: Client,
                                                                mongo_uri: str, mongo_db_name: str,
                                                                motor_reader: Any) -> None:
    subject = f"mongo_writer_data.{unique('proc')}"
    env = {**os.environ, "KRT_NATS_SERVER": nats_server.url, "KRT_NATS_MONGO_WRITER": subject,
           "KRT_MONGO_URI": mongo_uri, "KRT_MONGO_DB": mongo_db_name}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kre_runner", "mongo-writer",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        services = await open_checked(settings(KRT_NATS_MONGO_WRITER=subject, KRT_MONGO_DB=mongo_db_name), nc)
        assert services.db is not None
        deadline = time.monotonic() + 15
        while True:  # until the process has subscribed
            try:
                await services.db.save("proc", {"from": "subprocess"})
                break
            except DatabaseError:
                assert time.monotonic() < deadline, "mongo-writer process never answered"
                await asyncio.sleep(0.1)
        assert await docs_in(motor_reader, mongo_db_name, "proc", {"from": "subprocess"}) == [{"from": "subprocess"}]
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 15)
        text = output.decode()
        assert proc.returncode == 0, text
        assert "serving" in text and "stopped" in text
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- outages ------------------------------------------------------------------------------------

async def test_mongo_down_fails_fast_and_same_objects_recover(mongo_process: MongoProcess, nc: Client,
                                                              mongo_db_name: str) -> None:
    timeout = 1.0
    direct = await open_checked(settings(KRT_MONGO_URI=mongo_process.uri, KRT_MONGO_DB=mongo_db_name,
                                         KRT_DB_TIMEOUT=str(timeout)))
    served = Writer(nc, f"mongo_writer_data.{unique('down')}", mongo_process.uri, mongo_db_name, timeout)
    await served.ready(nc)
    via_writer = await open_checked(settings(KRT_NATS_MONGO_WRITER=served.settings.mongo_writer_subject,
                                             KRT_DB_TIMEOUT=str(timeout * 3)), nc)
    assert direct.db is not None and via_writer.db is not None and direct.prediction is not None
    try:
        await direct.db.save("c", {"phase": "before"})
        await via_writer.db.save("c", {"phase": "before-writer"})
        mongo_process.stop()

        for call in (lambda: direct.db.save("c", {"phase": "down"}),  # type: ignore[union-attr]
                     lambda: direct.db.find("c", {"phase": "before"}),  # type: ignore[union-attr]
                     lambda: direct.prediction.save("a", "b"),  # type: ignore[union-attr]
                     lambda: via_writer.db.save("c", {"phase": "down"})):  # type: ignore[union-attr]
            started = time.monotonic()
            with pytest.raises(DatabaseError) as info:
                await call()
            elapsed = time.monotonic() - started
            assert elapsed < timeout + 1.5, f"{info.value} took {elapsed:.2f}s"

        mongo_process.start()
        await direct.db.save("c", {"phase": "after"})
        await via_writer.db.save("c", {"phase": "after-writer"})
        phases = sorted(d["phase"] for d in await direct.db.find("c", {"phase": {"$exists": True}}))
        assert phases == ["after", "after-writer", "before", "before-writer"]
    finally:
        await direct.close(1)
        await via_writer.close(1)
        await served.close()


async def test_measurement_points_with_tags_reach_the_database(tsdb: TimeSeriesDB) -> None:
    sink = InfluxSink(url=tsdb.url, token=tsdb.token, org=tsdb.org, bucket=tsdb.bucket, flush_interval=0.1)
    sink.start()
    name = unique("m")
    measurement = Measurement(sink, version="v1", workflow="wf", node="node a")
    base_s = int(time.time()) - 60
    try:
        for i in range(3):
            measurement.save(name, {"value": i + 0.5, "count": i, "ok": i % 2 == 0, "label": f"l{i}"},
                             tags={"model": "m 1", "i": str(i)}, time=base_s + i, precision=measurement.PRECISION_S)
        points = await tsdb.points(name, expect=3)
    finally:
        await sink.close(5)
    assert sink.written == 3 and sink.dropped == 0 and sink.failed_writes == 0
    assert len(points) == 3
    for i, point in enumerate(points):
        assert point["tags"] == {"model": "m 1", "i": str(i), "version": "v1", "workflow": "wf", "node": "node a"}
        assert point["time_ms"] == (base_s + i) * 1000
        assert point["fields"]["value"] == i + 0.5
        assert point["fields"]["count"] == i
        assert point["fields"]["ok"] == (1 if i % 2 == 0 else 0)


async def test_tsdb_outage_buffers_drops_oldest_and_recovers(vm_process: VictoriaMetricsProcess) -> None:
    tsdb = TimeSeriesDB(url=vm_process.url)
    capacity = 20_000
    sink = InfluxSink(url=tsdb.url, token="t", org="", bucket="b", batch_size=1000, flush_interval=0.1,
                      buffer=capacity, write_timeout=1.0, max_backoff=0.5)
    sink.start()
    before, during, after = unique("before"), unique("during"), unique("after")
    # One millisecond apart (VictoriaMetrics keeps ms), in the recent past.
    start_ns = time.time_ns() - 120 * 10**9
    try:
        for i in range(10):
            sink.add(f"{before},phase=up f={i} {start_ns + i * 10**6}")
        assert len(await tsdb.points(before, expect=10)) == 10

        vm_process.stop()
        added = 50_000
        started = time.perf_counter()
        for i in range(added):
            sink.add(f"{during} f={i} {start_ns + i * 10**6}")
        add_seconds = time.perf_counter() - started
        assert add_seconds < 2.0, f"50k adds took {add_seconds:.2f}s while the database was down"
        assert sink.pending == capacity
        assert sink.dropped == added - capacity
        deadline = time.monotonic() + 5
        while sink.failed_writes < 2:  # the writer keeps trying, with backoff
            assert time.monotonic() < deadline, "no write attempts while the database was down"
            await asyncio.sleep(0.05)
        assert sink.written == 10

        vm_process.start()
        # The buffer is still full: these evict the 5 oldest buffered points.
        for i in range(5):
            sink.add(f"{after},phase=up f={i} {start_ns + i * 10**6}")
        assert len(await tsdb.points(after, expect=5)) == 5
        deadline = time.monotonic() + 15
        while sink.pending:
            assert time.monotonic() < deadline, f"{sink.pending} points still buffered"
            await asyncio.sleep(0.05)
        kept = await tsdb.points(during, expect=capacity - 5, timeout=15)
        # The newest points were kept: f counts the adds, so the survivors are the last ones.
        assert [p["fields"]["f"] for p in kept] == list(range(added - capacity + 5, added))
    finally:
        await sink.close(5)
    assert sink.written == 10 + capacity and sink.dropped == added - capacity + 5


async def test_full_batch_from_a_handler_thread_is_written_without_waiting_for_the_interval(
        tsdb: TimeSeriesDB) -> None:
    sink = InfluxSink(url=tsdb.url, token=tsdb.token, org=tsdb.org, bucket=tsdb.bucket, batch_size=10,
                      flush_interval=60)
    sink.start()
    name = unique("thread")
    measurement = Measurement(sink, version="v1", workflow="wf", node="n")
    base_s = int(time.time()) - 30
    try:
        await asyncio.sleep(0.05)  # the writer is now waiting for the interval or a wake-up
        # Sync handlers may run in a thread pool (KRT_HANDLER_THREADS): the wake-up must cross threads.
        await asyncio.to_thread(lambda: [measurement.save(name, {"i": i}, time=base_s + i, precision="s")
                                         for i in range(10)])
        deadline = time.monotonic() + 5
        while sink.written < 10:
            assert time.monotonic() < deadline, "a full batch waited for the 60 s flush interval"
            await asyncio.sleep(0.02)
        assert [p["fields"]["i"] for p in await tsdb.points(name, expect=10)] == list(range(10))
    finally:
        await sink.close(5)


async def test_close_flushes_a_partial_batch(tsdb: TimeSeriesDB) -> None:
    sink = InfluxSink(url=tsdb.url, token=tsdb.token, org=tsdb.org, bucket=tsdb.bucket, flush_interval=60)
    sink.start()
    name = unique("close")
    stamp = (int(time.time()) - 10) * 10**9
    for i in range(5):
        sink.add(f"{name} v={i} {stamp + i * 10**6}")
    await sink.close(5)
    assert (sink.written, sink.pending, sink.dropped) == (5, 0, 0)
    assert len(await tsdb.points(name, expect=5)) == 5


async def test_services_example_node_end_to_end(nats_server: EmbeddedNats, js: Any, workflow_stream: str,
                                                mongo_uri: str, mongo_db_name: str, motor_reader: Any,
                                                tsdb: TimeSeriesDB) -> None:
    """examples/services run by the real node loop: documents, predictions and points all arrive."""
    from kre_helpers import Collector, node_env, request_envelope, running_node

    from kre_runner.node.envelope import KreNatsMessage

    examples = EXAMPLES / "services"
    node = unique("svc")
    env = node_env(nats_server.url, "services.py", node=node, KRT_BASE_PATH=str(examples),
                   KRT_MONGO_URI=mongo_uri, KRT_MONGO_DB=mongo_db_name, KRT_INFLUX_URI=tsdb.url,
                   KRT_INFLUX_TOKEN=tsdb.token, KRT_INFLUX_ORG=tsdb.org, KRT_INFLUX_BUCKET=tsdb.bucket,
                   KRT_INFLUX_FLUSH_INTERVAL="0.1")
    out = await Collector(js, env["KRT_NATS_OUTPUT"]).start()
    names = ["Ada", "Ada", "Bartholomew"]
    async with running_node(env, js):
        for name in names:  # one at a time, so the visit count is deterministic
            await js.publish(env["KRT_NATS_INPUT"], request_envelope(name).SerializeToString())
            [result] = await out.take(1)
            assert isinstance(result, KreNatsMessage) and result.error == ""
    visits = await docs_in(motor_reader, mongo_db_name, "visits", {"name": {"$exists": True}})
    assert sorted(v["name"] for v in visits) == sorted(names)
    predictions = await docs_in(motor_reader, mongo_db_name, "classificationMetrics", {"versionName": "v1"})
    assert sorted(p["predictedValue"] for p in predictions) == ["long", "short", "short"]
    points = [p for p in await tsdb.points("visits", expect=3) if p["tags"].get("node") == node]
    assert sorted(p["fields"]["count"] for p in points) == [1, 1, 2]
    assert {p["tags"]["first"] for p in points} == {"true", "false"}
    elapsed = [p for p in await tsdb.points("node_elapsed_time", expect=3) if p["tags"].get("node") == node]
    assert len(elapsed) == 3 and all(p["fields"]["elapsed_ms"] >= 0 for p in elapsed)
