"""``ctx.db``: save documents to MongoDB (directly or through a mongo-writer) and read them back.

Two write paths share one API so a handler does not care how the node is deployed:

* direct: ``insert_one`` with motor into ``KRT_MONGO_DB`` at ``KRT_MONGO_URI``;
* mongo-writer (``KRT_NATS_MONGO_WRITER`` set): a core-NATS request carrying
  ``{"coll": coll, "doc": doc}`` (gzip-compressed above the payload limit), answered by
  ``{"success": true|false}``, as the original KRE runner did.

Reads always go straight to MongoDB, to the database the saves end up in. Every failure of a
save or a find becomes a :class:`DatabaseError` within ``KRT_DB_TIMEOUT`` seconds, so a handler
can catch one exception type and decide (retry, skip, fail the message).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Mapping, Sequence
from typing import Any

from bson import ObjectId, json_util
from nats.aio.client import Client as NatsClient

from ..config import redact_url
from ..context import ServiceNotConfigured

__all__ = [
    "GZIP_THRESHOLD",
    "DatabaseError",
    "DirectWriter",
    "MongoConnection",
    "MongoDB",
    "MongoWriterClient",
    "decode_writer_payload",
    "encode_writer_request",
]

# The original compressed writer requests above 1 MiB (NATS' default max_payload).
GZIP_THRESHOLD = 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"


class DatabaseError(Exception):
    """A ``ctx.db`` / ``ctx.prediction`` call did not complete: MongoDB or the writer is down, slow or refused.

    The message says which; the original exception (if any) is chained as ``__cause__``.
    """


class MongoConnection:
    """One lazily created motor client for a database.

    The client is built on first use, inside the running event loop (motor binds to it), with
    server selection and operation timeouts tied to ``timeout`` so a down MongoDB fails fast.
    The same client recovers by itself once MongoDB is back: pymongo keeps monitoring the server.
    """

    def __init__(self, uri: str, database: str, timeout: float) -> None:
        self.uri = uri
        self.database_name = database
        self.timeout = timeout
        self._client: Any = None

    @property
    def redacted_uri(self) -> str:
        return redact_url(self.uri)

    def database(self) -> Any:
        """The motor database, creating the client on first call (must run inside the event loop)."""
        if self._client is None:
            # Imported here: motor pulls in a thread pool and is only needed when MongoDB is configured.
            from motor.motor_asyncio import AsyncIOMotorClient

            ms = max(int(self.timeout * 1000), 1)
            self._client = AsyncIOMotorClient(
                self.uri,
                appname="kre-runner",
                serverSelectionTimeoutMS=ms,
                connectTimeoutMS=ms,
                timeoutMS=ms,  # pymongo's client-side operation timeout, sent to the server as maxTimeMS
            )
        return self._client[self.database_name]

    async def insert(self, coll: str, doc: Mapping[str, Any]) -> None:
        """Insert a copy of ``doc`` (motor would add ``_id`` to the caller's dict otherwise)."""
        await self.database()[coll].insert_one(dict(doc))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class DirectWriter:
    """Saves with motor into the configured database."""

    def __init__(self, connection: MongoConnection) -> None:
        self.connection = connection

    def describe(self) -> str:
        return f"direct to {self.connection.redacted_uri} database {self.connection.database_name!r}"

    async def save(self, coll: str, doc: Mapping[str, Any]) -> None:
        try:
            await asyncio.wait_for(self.connection.insert(coll, doc), self.connection.timeout)
        except asyncio.TimeoutError as exc:
            raise DatabaseError(
                f"saving to {coll!r} timed out after {self.connection.timeout:g}s "
                f"(MongoDB {self.connection.redacted_uri})"
            ) from exc
        except Exception as exc:  # pymongo errors, and bson errors for documents it cannot encode
            raise DatabaseError(f"saving to {coll!r} failed: {_describe(exc)}") from exc


class MongoWriterClient:
    """Saves through the mongo-writer service: a core-NATS request per document."""

    def __init__(self, nc: NatsClient, subject: str, timeout: float) -> None:
        self.nc = nc
        self.subject = subject
        self.timeout = timeout

    def describe(self) -> str:
        return f"through mongo-writer subject {self.subject!r}"

    async def save(self, coll: str, doc: Mapping[str, Any]) -> None:
        max_payload = self.nc.max_payload or GZIP_THRESHOLD
        payload = encode_writer_request(coll, doc, min(GZIP_THRESHOLD, max_payload))
        if len(payload) > max_payload:
            raise DatabaseError(
                f"document for {coll!r} is {len(payload)} bytes even compressed, over the NATS server's "
                f"max_payload of {max_payload}; save it directly (KRT_MONGO_URI without KRT_NATS_MONGO_WRITER)"
            )
        try:
            reply = await self.nc.request(self.subject, payload, timeout=self.timeout)
        except Exception as exc:  # nats NoRespondersError, TimeoutError, ConnectionClosedError, ...
            raise DatabaseError(
                f"saving to {coll!r} through mongo-writer {self.subject!r} failed: {_describe(exc)}"
            ) from exc
        try:
            answer = json.loads(reply.data)
        except ValueError as exc:
            raise DatabaseError(
                f"mongo-writer {self.subject!r} sent an unreadable reply: {reply.data[:200]!r}"
            ) from exc
        if not isinstance(answer, dict) or answer.get("success") is not True:
            error = answer.get("error", "no reason given") if isinstance(answer, dict) else answer
            raise DatabaseError(f"mongo-writer {self.subject!r} could not save to {coll!r}: {error}")


class MongoDB:
    """``ctx.db``: ``await save(coll, doc)`` and ``await find(coll, query, ...)``."""

    def __init__(self, writer: DirectWriter | MongoWriterClient, reader: MongoConnection | None) -> None:
        self._writer = writer
        self._reader = reader
        self.errors = 0  # calls that raised DatabaseError (kre_db_errors_total)

    def describe(self) -> str:
        reads = (f"reads from {self._reader.redacted_uri} database {self._reader.database_name!r}"
                 if self._reader else "reads disabled (set KRT_MONGO_URI)")
        return f"saves {self._writer.describe()}, {reads}"

    async def save(self, coll: str, doc: Mapping[str, Any]) -> None:
        """Insert ``doc`` into collection ``coll``; raises :class:`DatabaseError` when it was not stored.

        ``doc`` is not modified. Through a mongo-writer, values must be JSON-serializable or BSON types
        (datetime, ObjectId, ...), which travel as MongoDB extended JSON.
        """
        _check_coll(coll)
        if not isinstance(doc, Mapping):
            raise TypeError(f"ctx.db.save: doc must be a dict, got {type(doc).__name__}")
        try:
            await self._writer.save(coll, doc)
        except DatabaseError:
            self.errors += 1
            raise

    async def find(
        self,
        coll: str,
        query: Mapping[str, Any],
        projection: Mapping[str, Any] | Sequence[str] | None = None,
        sort: str | Sequence[tuple[str, int]] | Mapping[str, int] | None = None,
        limit: int = 0,
    ) -> list[dict[str, Any]]:
        """Documents of ``coll`` matching ``query`` as plain dicts, ``_id`` as a string (JSON-friendly).

        ``sort`` is a key (ascending), a list of ``(key, 1|-1)`` pairs or a dict ``{key: 1|-1}``;
        ``limit=0`` means no limit.
        """
        _check_coll(coll)
        if not isinstance(query, Mapping) or not query:
            raise ValueError("ctx.db.find: query must be a non-empty dict, e.g. {'name': 'x'}")
        if projection is not None and not isinstance(projection, (Mapping, list, tuple)):
            raise TypeError("ctx.db.find: projection must be a dict or a list of field names")
        sort_spec = _sort_spec(sort)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"ctx.db.find: limit must be an integer ≥ 0, got {limit!r}")
        if self._reader is None:
            raise ServiceNotConfigured(
                "ctx.db.find needs KRT_MONGO_URI: with only KRT_NATS_MONGO_WRITER set, saves work but reads cannot"
            )
        reader = self._reader
        try:
            return await asyncio.wait_for(self._find(coll, query, projection, sort_spec, limit), reader.timeout)
        except asyncio.TimeoutError as exc:
            self.errors += 1
            raise DatabaseError(
                f"finding in {coll!r} timed out after {reader.timeout:g}s (MongoDB {reader.redacted_uri})"
            ) from exc
        except Exception as exc:
            self.errors += 1
            raise DatabaseError(f"finding in {coll!r} failed: {_describe(exc)}") from exc

    async def _find(self, coll: str, query: Mapping[str, Any], projection: Any, sort: list[tuple[str, int]] | None,
                    limit: int) -> list[dict[str, Any]]:
        assert self._reader is not None
        cursor = self._reader.database()[coll].find(dict(query), projection)
        if sort:
            cursor = cursor.sort(sort)
        if limit:
            cursor = cursor.limit(limit)
        docs = await cursor.to_list(None)
        for doc in docs:
            if isinstance(doc.get("_id"), ObjectId):
                doc["_id"] = str(doc["_id"])
        return docs

    def close(self) -> None:
        """Close the motor clients (safe to call twice)."""
        if isinstance(self._writer, DirectWriter):
            self._writer.connection.close()
        if self._reader is not None:
            self._reader.close()


def encode_writer_request(coll: str, doc: Mapping[str, Any], gzip_threshold: int = GZIP_THRESHOLD) -> bytes:
    """The mongo-writer request body: JSON ``{"coll", "doc"}``, gzip-compressed when over the threshold.

    Plain JSON documents encode exactly as ``json.dumps`` would (what the original's writer expects);
    BSON values (datetime, ObjectId, Decimal128, ...) become relaxed extended JSON, which our writer decodes.
    """
    try:
        data = json.dumps({"coll": coll, "doc": doc}, default=json_util.default, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"ctx.db.save: doc cannot be sent to the mongo-writer: {exc}") from exc
    if len(data) > gzip_threshold:
        data = gzip.compress(data, compresslevel=6)
    return data


def decode_writer_payload(data: bytes) -> Any:
    """Inverse of :func:`encode_writer_request` (gunzip when the gzip magic is there, extended JSON)."""
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    return json_util.loads(data)


def _check_coll(coll: object) -> None:
    if not isinstance(coll, str) or not coll:
        raise ValueError(f"ctx.db: coll must be a non-empty string, got {coll!r}")


def _sort_spec(sort: object) -> list[tuple[str, int]] | None:
    if sort is None:
        return None
    if isinstance(sort, str):
        pairs: list[tuple[Any, Any]] = [(sort, 1)]
    elif isinstance(sort, Mapping):
        pairs = list(sort.items())
    elif isinstance(sort, (list, tuple)):
        pairs = [tuple(item) if isinstance(item, (list, tuple)) else (item, 1) for item in sort]  # type: ignore[misc]
    else:
        raise TypeError("ctx.db.find: sort must be a key, a list of (key, 1|-1) pairs or a dict")
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or pair[1] not in (1, -1):
            raise ValueError(f"ctx.db.find: bad sort entry {pair!r}: expected (key, 1) or (key, -1)")
    return [(key, int(direction)) for key, direction in pairs]


def _describe(exc: BaseException) -> str:
    """A one-line reason; pymongo's messages embed the topology, which can be very long."""
    text = str(exc).split(", Timeout:")[0].split(" Topology Description:")[0].strip() or repr(exc)
    return f"{type(exc).__name__}: {text[:300]}"
