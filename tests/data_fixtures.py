"""Real MongoDB and time-series servers for the ctx data-service tests (never mocks).

* MongoDB: ``KRE_TEST_MONGO_URI`` if set, else ``nx-27017`` (a MongoDB wire-protocol server on
  SQLite, installed in the venv) on a free port with a temporary data directory.
* Time series: ``KRE_TEST_INFLUX_URL`` (+ ``KRE_TEST_INFLUX_TOKEN/ORG/BUCKET``, a real InfluxDB 2.x,
  read back with Flux) if set, else VictoriaMetrics (Debian package ``victoria-metrics``), which
  accepts InfluxDB line protocol on ``/api/v2/write`` and is read back with ``/api/v1/export``.

Outage tests always get their own nx-27017 / VictoriaMetrics process, which they stop and restart
on the same port and data directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from kre_runner.dev.embedded import (
    EmbeddedMongo,
    EmbeddedVictoriaMetrics,
    find_nx_27017,
    find_victoria_metrics,
)

__all__ = ["MongoProcess", "TimeSeriesDB", "VictoriaMetricsProcess", "find_nx_27017", "find_victoria_metrics"]

# The names the tests use for the launchers.
MongoProcess = EmbeddedMongo
VictoriaMetricsProcess = EmbeddedVictoriaMetrics


@dataclass
class TimeSeriesDB:
    """Where tests write points (``url``/``token``/``org``/``bucket``) and how they read them back."""

    url: str
    token: str = "test"
    org: str = "-"
    bucket: str = "test"
    kind: str = "victoria-metrics"  # or "influxdb"
    extra: dict[str, Any] = field(default_factory=dict)

    async def points(self, measurement: str, expect: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Points of ``measurement`` as ``{"tags", "fields", "time_ms"}``, polling until ``expect`` are there.

        Only numeric and boolean fields are compared across servers: VictoriaMetrics stores string
        fields as 0 (or not at all, depending on its version).
        """
        deadline = time.monotonic() + timeout
        while True:
            found = await (self._influx_points(measurement) if self.kind == "influxdb"
                           else asyncio.to_thread(self._vm_points, measurement))
            if len(found) >= expect or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)

    def _vm_points(self, measurement: str) -> list[dict[str, Any]]:
        # New series become searchable after an index flush: force it so polling is short.
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=5):
            pass
        selector = '{__name__=~"' + _regex_escape(measurement) + '_.+"}'
        query = urllib.parse.urlencode({"match[]": selector})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=10) as response:
            body = response.read().decode()
        points: dict[tuple[Any, ...], dict[str, Any]] = {}
        prefix = f"{measurement}_"
        for row in filter(None, body.splitlines()):
            series = json.loads(row)
            labels = dict(series["metric"])
            field_name = labels.pop("__name__")[len(prefix):]
            labels.pop("db", None)  # VictoriaMetrics may add the bucket as label "db"
            for value, stamp in zip(series["values"], series["timestamps"], strict=True):
                key = (tuple(sorted(labels.items())), stamp)
                point = points.setdefault(key, {"tags": labels, "fields": {}, "time_ms": stamp})
                point["fields"][field_name] = value
        return sorted(points.values(), key=lambda p: p["time_ms"])

    async def _influx_points(self, measurement: str) -> list[dict[str, Any]]:
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

        flux = (f'from(bucket: "{self.bucket}") |> range(start: 0) '
                f'|> filter(fn: (r) => r._measurement == "{measurement}")')
        points: dict[tuple[Any, ...], dict[str, Any]] = {}
        async with InfluxDBClientAsync(url=self.url, token=self.token, org=self.org) as client:
            tables = await client.query_api().query(flux)
        for table in tables:
            for record in table.records:
                values = dict(record.values)
                tags = {k: v for k, v in values.items()
                        if not k.startswith("_") and k not in ("result", "table")}
                stamp = int(record.get_time().timestamp() * 1000)
                key = (tuple(sorted(tags.items())), stamp)
                point = points.setdefault(key, {"tags": tags, "fields": {}, "time_ms": stamp})
                value = record.get_value()
                point["fields"][record.get_field()] = value if not isinstance(value, bool) else int(value)
        return sorted(points.values(), key=lambda p: p["time_ms"])


def _regex_escape(text: str) -> str:
    return "".join("\\\\" + c if c in r".^$*+?()[]{}|\\" else c for c in text)


def unique(prefix: str) -> str:
    """A name no other test (or earlier run against a shared server) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """A MongoDB URI shared by the session: ``KRE_TEST_MONGO_URI`` or a fresh nx-27017."""
    external = os.environ.get("KRE_TEST_MONGO_URI")
    if external:
        yield external
        return
    server = MongoProcess().start()
    try:
        yield server.uri
    finally:
        server.cleanup()


@pytest.fixture
def mongo_db_name() -> str:
    """A database name of the test's own, ``{runtime}-data`` style."""
    return f"{unique('t')}-data"


@pytest.fixture
def mongo_process() -> Iterator[MongoProcess]:
    """An nx-27017 of the test's own, to stop and restart."""
    server = MongoProcess().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def motor_reader(mongo_uri: str) -> AsyncIterator[Any]:
    """A plain motor client for reading back what the code under test wrote."""
    from motor.motor_asyncio import AsyncIOMotorClient

    client = AsyncIOMotorClient(mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def tsdb() -> Iterator[TimeSeriesDB]:
    """A time-series DB shared by the session: ``KRE_TEST_INFLUX_URL`` (InfluxDB 2.x) or VictoriaMetrics."""
    external = os.environ.get("KRE_TEST_INFLUX_URL")
    if external:
        yield TimeSeriesDB(url=external.rstrip("/"), token=os.environ.get("KRE_TEST_INFLUX_TOKEN", ""),
                           org=os.environ.get("KRE_TEST_INFLUX_ORG", "-"),
                           bucket=os.environ.get("KRE_TEST_INFLUX_BUCKET", "test"), kind="influxdb")
        return
    server = VictoriaMetricsProcess().start()
    try:
        yield TimeSeriesDB(url=server.url)
    finally:
        server.cleanup()


@pytest.fixture
def vm_process() -> Iterator[VictoriaMetricsProcess]:
    """A VictoriaMetrics of the test's own, to stop and restart."""
    server = VictoriaMetricsProcess().start()
    try:
        yield server
    finally:
        server.cleanup()
