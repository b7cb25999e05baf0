"""``ctx.measurement`` and the runner's metrics: line-protocol points buffered and written in batches.

(Over 400 lines, deliberately: the line-protocol escaping, the buffer and its writer, and the
``ctx.measurement`` API share one set of rules about what a point may hold.)

A handler must never wait on, or fail because of, the time-series database: :meth:`InfluxSink.add`
only appends to a bounded in-memory buffer (oldest points dropped, and counted, when it is full)
and a background task writes batches with InfluxDB's ``/api/v2/write`` (InfluxDB 1.8 with
``user:password`` as token, 2.x, 3.x, and anything speaking it such as VictoriaMetrics), retrying
with exponential backoff while the database is slow or down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import time as _time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from ..config import redact_url

__all__ = [
    "PRECISION_MS",
    "PRECISION_NS",
    "PRECISION_S",
    "PRECISION_US",
    "InfluxSink",
    "Measurement",
    "escape_field_str",
    "escape_measurement",
    "escape_tag",
]

PRECISION_S = "s"
PRECISION_MS = "ms"
PRECISION_US = "us"
PRECISION_NS = "ns"
_NS_PER_UNIT = {PRECISION_S: 1_000_000_000, PRECISION_MS: 1_000_000, PRECISION_US: 1_000, PRECISION_NS: 1}

# The same escaping as influxdb_client's Point, so precomputed tag sets match what Point writes.
_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})
# str.translate costs ~0.5 µs even when nothing changes; these searches skip it for clean text.
_NEEDS_KEY_ESCAPE = re.compile(r"[,= \n\t\r]").search
_NEEDS_MEASUREMENT_ESCAPE = re.compile(r"[, \n\t\r]").search
_KEY_CACHE_SIZE = 4096  # distinct field keys / tag sets remembered per Measurement

# Server answers that mean "this data will never be accepted": retrying would block the buffer forever.
_REJECTED_STATUSES = frozenset({400, 413, 422})
_LOG_EVERY_S = 30.0


def escape_measurement(value: str) -> str:
    """A measurement name escaped for line protocol."""
    return value.translate(_ESCAPE_MEASUREMENT) if _NEEDS_MEASUREMENT_ESCAPE(value) else value


def escape_tag_key(value: str) -> str:
    """A tag or field key escaped for line protocol."""
    value = str(value)
    return value.translate(_ESCAPE_KEY) if _NEEDS_KEY_ESCAPE(value) else value


def escape_tag(value: str) -> str:
    """A tag key or value escaped for line protocol (``,``, ``=``, spaces), as ``Point`` does."""
    escaped = escape_tag_key(value)
    # A trailing backslash would escape the separator that follows: Point pads it with a space.
    return escaped + " " if escaped.endswith("\\") else escaped


def escape_field_str(value: str) -> str:
    """A string field value escaped for line protocol, *without* the surrounding double quotes."""
    if '"' in value or "\\" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"')
    return value


class InfluxSink:
    """Bounded buffer of line-protocol lines plus the task that writes them in batches.

    Counters (for logs, health and tests): ``written`` points accepted by the server, ``dropped``
    points evicted from a full buffer or rejected by the server or left at close, ``rejected``
    points the server refused as invalid, ``failed_writes`` write attempts that failed.
    ``add`` may be called from handler threads; the counters are then approximate.
    """

    def __init__(
        self,
        *,
        url: str,
        token: str,
        org: str,
        bucket: str,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        buffer: int = 100_000,
        write_timeout: float = 10.0,
        max_backoff: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.bucket = bucket
        # InfluxDB 1.8 ignores the org but the client wants one; "-" is its documented placeholder.
        self.org = org or "-"
        self._token = token
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.capacity = buffer
        self.write_timeout = write_timeout
        self.max_backoff = max_backoff
        self._logger = logger or logging.getLogger("kre_runner.influx")
        self._buffer: deque[str] = deque(maxlen=buffer)
        self.written = 0
        self.dropped = 0
        self.rejected = 0
        self.failed_writes = 0
        self._wake: asyncio.Event | None = None
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._closing = False
        self._failing_since: float | None = None
        self._failures_in_row = 0
        self._last_log = 0.0

    @classmethod
    def from_settings(cls, settings: Any, logger: logging.Logger | None = None) -> InfluxSink:
        """A sink configured from :class:`~kre_runner.config.Settings` (``influx_uri`` must be set)."""
        return cls(
            url=settings.influx_uri,
            token=settings.influx_token,
            org=settings.influx_org,
            bucket=settings.influx_bucket,
            batch_size=settings.influx_batch_size,
            flush_interval=settings.influx_flush_interval,
            buffer=settings.influx_buffer,
            write_timeout=max(settings.db_timeout, 5.0),
            logger=logger,
        )

    def describe(self) -> str:
        return (f"{redact_url(self.url)} bucket {self.bucket!r}, batches of {self.batch_size} "
                f"every {self.flush_interval:g}s, buffer {self.capacity} points")

    @property
    def pending(self) -> int:
        """Points waiting in the buffer."""
        return len(self._buffer)

    def add(self, line: str) -> None:
        """Queue one line-protocol line; never blocks, never raises (hot path: once per message)."""
        buffer = self._buffer
        if len(buffer) == self.capacity:
            self.dropped += 1  # deque(maxlen) evicts the oldest on append
        buffer.append(line)
        if len(buffer) >= self.batch_size and not self._wake_pending and self._wake is not None:
            self._wake_pending = True
            if threading.get_ident() == self._loop_thread:
                self._wake.set()
            else:
                with contextlib.suppress(RuntimeError):  # loop closed: the writer is gone anyway
                    self._loop.call_soon_threadsafe(self._wake.set)  # type: ignore[union-attr]

    def start(self) -> None:
        """Create the client and the writer task; call from inside the running event loop."""
        if self._task is not None:
            return
        # Imported here: only nodes with KRT_INFLUX_URI pay for aiohttp.
        from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync

        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._client = InfluxDBClientAsync(url=self.url, token=self._token, org=self.org,
                                           timeout=int(self.write_timeout * 1000))
        self._write_api = self._client.write_api()
        self._task = asyncio.create_task(self._run(), name="kre-influx-writer")

    async def close(self, timeout: float) -> None:
        """Write what can be written within ``timeout`` seconds, then stop; what is left is dropped."""
        self._closing = True
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            except Exception:  # the writer task itself failed: already logged by _run
                pass
            self._task = None
        left = len(self._buffer)
        if left:
            self.dropped += left
            self._buffer.clear()
            self._logger.warning("InfluxDB: %d points not written at shutdown (database slow or down)", left)
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _run(self) -> None:
        """Write full batches as soon as they are full and partial ones every flush interval."""
        assert self._wake is not None
        wake = self._wake
        next_flush = _time.monotonic() + self.flush_interval
        backoff = 0.0
        while True:
            remaining = next_flush - _time.monotonic()
            if len(self._buffer) < self.batch_size and not self._closing and remaining > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), remaining)
            wake.clear()
            self._wake_pending = False
            now = _time.monotonic()
            flush_partial = self._closing or now >= next_flush
            if now >= next_flush:
                next_flush = now + self.flush_interval
            while len(self._buffer) >= self.batch_size or (flush_partial and self._buffer):
                if await self._write_batch():
                    backoff = 0.0
                    continue
                backoff = min(self.max_backoff, backoff * 2 if backoff else min(0.25, self.max_backoff))
                await asyncio.sleep(backoff)
            if self._closing and not self._buffer:
                return

    async def _write_batch(self) -> bool:
        """Write the oldest points; they leave the buffer only once accepted (or refused as invalid)."""
        count = min(self.batch_size, len(self._buffer))
        batch = list(islice(self._buffer, count))
        dropped_before = self.dropped
        try:
            # One string, not a list: influxdb-client serializes list items one by one in Python.
            await asyncio.wait_for(
                self._write_api.write(self.bucket, self.org, record="\n".join(batch), write_precision=PRECISION_NS),
                self.write_timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status in _REJECTED_STATUSES:
                self._remove_oldest(count, dropped_before)
                self.rejected += count
                self.dropped += count
                self._logger.error("InfluxDB refused %d points (HTTP %s): %s; they are dropped",
                                   count, status, _reason(exc))
                return True
            self._note_failure(exc)
            return False
        self._remove_oldest(count, dropped_before)
        self.written += count
        if self._failing_since is not None:
            self._logger.info("InfluxDB writes recovered after %d failed attempts (%.1fs); %d points dropped so far",
                              self._failures_in_row, _time.monotonic() - self._failing_since, self.dropped)
            self._failing_since = None
            self._failures_in_row = 0
        return True

    def _note_failure(self, exc: BaseException) -> None:
        """Count a failed attempt; log the first of an outage and then at most every 30 s."""
        self.failed_writes += 1
        self._failures_in_row += 1
        now = _time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._last_log = now
            self._logger.warning(
                "InfluxDB write to %s failed: %s; retrying with backoff, keeping up to %d points (oldest dropped)",
                redact_url(self.url), _reason(exc), self.capacity)
        elif now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            self._logger.warning("InfluxDB still failing after %d attempts: %s; %d points buffered, %d dropped",
                                 self._failures_in_row, _reason(exc), len(self._buffer), self.dropped)

    def _remove_oldest(self, count: int, dropped_before: int) -> None:
        # Points evicted by add() while the write was in flight were the oldest, i.e. part of this batch.
        evicted = self.dropped - dropped_before
        for _ in range(max(0, count - evicted)):
            try:
                self._buffer.popleft()
            except IndexError:
                break


class Measurement:
    """``ctx.measurement``: ``save(measurement, fields, tags=None, time=None, precision=PRECISION_NS)``.

    Points get the tags ``version``, ``workflow`` and ``node`` as in the original runner and are
    written in the background: ``save`` never waits for, nor fails because of, the database.
    """

    PRECISION_S = PRECISION_S
    PRECISION_MS = PRECISION_MS
    PRECISION_US = PRECISION_US
    PRECISION_NS = PRECISION_NS

    def __init__(self, sink: InfluxSink, *, version: str, workflow: str, node: str) -> None:
        self._add = sink.add
        self._system_tags = {"version": version, "workflow": workflow, "node": node}
        # A point's escaped "measurement,tags " head repeats from point to point: built once per
        # (measurement, user tags), as are escaped field keys.
        self._heads: dict[Any, str] = {}
        self._keys: dict[Any, str] = {}

    def save(
        self,
        measurement: str,
        fields: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
        time: int | float | datetime | str | None = None,
        precision: str = PRECISION_NS,
    ) -> None:
        """Queue a point. ``time`` is an int/float in ``precision`` units, a datetime (naive = UTC) or an
        ISO string; without it the point is stamped now (not when the batch is written).

        Raises ``ValueError``/``TypeError`` for bad arguments only.
        """
        self._add(self.line(measurement, fields, tags, time, precision))

    def line(
        self,
        measurement: str,
        fields: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
        time: int | float | datetime | str | None = None,
        precision: str = PRECISION_NS,
    ) -> str:
        """The line-protocol line :meth:`save` queues, at nanosecond precision.

        The common case (str tags; int, float, bool and str fields; a numeric time) is formatted
        here, byte for byte as influxdb-client's ``Point`` does (the tests compare the two), at a
        tenth of its cost: a point per message must not cost a node more than a few percent.
        Anything else (numpy or Decimal values, datetimes) is left to ``Point`` itself.
        """
        if precision not in _NS_PER_UNIT:
            raise ValueError(f"ctx.measurement.save: precision must be one of s, ms, us, ns, got {precision!r}")
        timestamp = _time.time_ns() if time is None else _to_ns(time, precision)
        if not fields or (type(fields) is not dict and not isinstance(fields, Mapping)):  # ABC checks are slow
            raise ValueError("ctx.measurement.save: fields must be a non-empty dict, e.g. {'value': 1.0}")
        if tags is not None and type(tags) is not dict and not isinstance(tags, Mapping):
            raise TypeError(f"ctx.measurement.save: tags must be a dict or None, got {type(tags).__name__}")
        head_key: Any = (measurement, *tags.items()) if tags else measurement
        try:
            head = self._heads.get(head_key)
        except TypeError:  # an unhashable tag value: Point turns it into a string
            head = None
        if head is None:
            head = self._head(measurement, tags, head_key)
            if head is None:
                return self._point_line(measurement, fields, self._all_tags(tags), timestamp)
        if type(timestamp) is not int:
            return self._point_line(measurement, fields, self._all_tags(tags), timestamp)
        parts = []
        keys = self._keys
        for key, value in sorted(fields.items()) if len(fields) > 1 else fields.items():
            kind = type(value)
            if value is None or (kind is float and not math.isfinite(value)):
                continue
            name = keys.get(key)
            if name is None:
                name = escape_tag_key(key)
                if len(keys) < _KEY_CACHE_SIZE:
                    keys[key] = name
            if kind is float:
                text = repr(value)
                parts.append(f"{name}={text[:-2] if text.endswith('.0') else text}")
            elif kind is int:
                parts.append(f"{name}={value}i")
            elif kind is bool:
                parts.append(f"{name}={'true' if value else 'false'}")
            elif kind is str:
                parts.append(f'{name}="{escape_field_str(value)}"')
            else:
                return self._point_line(measurement, fields, self._all_tags(tags), timestamp)
        if not parts:
            raise ValueError("ctx.measurement.save: no field has a value (None, NaN and inf are left out)")
        return f"{head}{','.join(parts)} {timestamp}"

    def _head(self, measurement: str, tags: Mapping[str, Any] | None, head_key: Any) -> str | None:
        """``measurement,tag=value,... `` escaped and sorted as ``Point`` writes it, remembered for next
        time; None when ``Point`` must format it."""
        if not isinstance(measurement, str) or not measurement:
            raise ValueError(f"ctx.measurement.save: measurement must be a non-empty string, got {measurement!r}")
        all_tags = self._all_tags(tags)
        if not all(type(value) is str for value in all_tags.values()):
            return None
        head = escape_measurement(measurement) + _tag_set(all_tags)
        with contextlib.suppress(TypeError):  # unhashable tag values are not remembered
            if len(self._heads) < _KEY_CACHE_SIZE:
                self._heads[head_key] = head
        return head

    def _all_tags(self, tags: Mapping[str, Any] | None) -> Mapping[str, Any]:
        """The user's tags and the system tags; system tags win, as in the original."""
        return {**tags, **self._system_tags} if tags else self._system_tags

    @staticmethod
    def _point_line(measurement: str, fields: Mapping[str, Any], tags: Mapping[str, Any],
                    timestamp: int | datetime | str | timedelta) -> str:
        # Imported here: influxdb-client takes ~0.2 s to import, paid only by nodes that need Point.
        from influxdb_client import Point

        point = Point(measurement)
        for key, value in tags.items():
            point.tag(key, value)
        for key, value in fields.items():
            point.field(key, value)
        point.time(timestamp, PRECISION_NS)
        line = point.to_line_protocol()  # raises ValueError for unsupported field types
        if not line:
            raise ValueError("ctx.measurement.save: no field has a value (None, NaN and inf are left out)")
        return line


def _tag_set(tags: Mapping[str, str]) -> str:
    """``,k=v,...`` sorted by key, as ``Point`` writes it, followed by the space before the fields."""
    pairs = [f"{escape_tag_key(str(key))}={escape_tag(value)}" for key, value in sorted(tags.items())
             if value is not None and str(key) and str(value)]
    return f"{',' if pairs else ''}{','.join(pairs)} "


def _to_ns(value: Any, precision: str) -> int | datetime | str | timedelta:
    """Nanoseconds for numbers, so a whole batch is written at one precision; Point converts the rest."""
    if value is None:
        return _time.time_ns()
    if isinstance(value, bool):
        raise TypeError("ctx.measurement.save: time must be a number, a datetime or an ISO string, not a bool")
    if isinstance(value, int):
        return value * _NS_PER_UNIT[precision]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"ctx.measurement.save: time must be finite, got {value!r}")
        return round(value * _NS_PER_UNIT[precision])
    if isinstance(value, (datetime, str, timedelta)):
        return value
    raise TypeError(f"ctx.measurement.save: time must be a number, a datetime or an ISO string, "
                    f"got {type(value).__name__}")


def _reason(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    text = str(exc).strip().replace("\n", " ")[:300] or type(exc).__name__
    return f"HTTP {status}: {text}" if status else f"{type(exc).__name__}: {text}"
