"""``kre-runner mongo-writer``: the service behind ``KRT_NATS_MONGO_WRITER``.

Nodes send ``{"coll": ..., "doc": ...}`` (JSON, gzip-compressed when large) as core-NATS requests;
the writer inserts the document into MongoDB and answers ``{"success": true}`` or
``{"success": false, "error": "..."}``. Replicas share the subject through a queue group. A bad
request or a MongoDB failure is answered and logged, never fatal.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ..config import (
    ConfigError,
    NatsAuth,
    _parse_mongo_uri,
    _parse_servers,
    _parse_subject,
    _positive_float,
    _Reader,
    parse_log_level,
    read_nats_auth,
    redact_url,
    url_field,
)
from ..nats.connection import connect
from .mongo import MongoConnection, decode_writer_payload

__all__ = ["QUEUE_GROUP", "WriterSettings", "run_writer", "serve"]

QUEUE_GROUP = "kre-mongo-writer"


def _log_format(raw: str) -> str:
    if raw.lower() not in ("text", "json"):
        raise ValueError(raw)
    return raw.lower()

_MAX_CONCURRENT = 64  # inserts in flight at once: enough to hide MongoDB latency, bounded for memory
_REPLY_OK = b'{"success":true}'


@dataclass(frozen=True)
class WriterSettings:
    """The writer's configuration; attribute names match :class:`~kre_runner.config.Settings`."""

    nats_servers: tuple[str, ...] = url_field()
    mongo_writer_subject: str
    mongo_uri: str = url_field()
    mongo_db: str
    db_timeout: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"
    nats_auth: NatsAuth = field(default_factory=NatsAuth)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WriterSettings:
        """Read ``KRT_NATS_SERVER``, ``KRT_NATS_MONGO_WRITER``, ``KRT_MONGO_URI``, ``KRT_MONGO_DB`` or
        ``KRT_RUNTIME_ID``, ``KRT_DB_TIMEOUT``, ``KRT_LOG_LEVEL``; raise ConfigError listing every problem."""
        problems: list[str] = []

        def get(name: str, parse: Any, expected: str, example: str, required: bool = True) -> Any:
            raw = env.get(name, "").strip()
            if not raw:
                if required:
                    problems.append(f"{name} is not set: expected {expected}, e.g. {name}={example}")
                return None
            try:
                return parse(raw)
            except ValueError:
                shown = redact_url(raw) if "://" in raw else raw
                problems.append(f"{name}={shown!r} is invalid: expected {expected}, e.g. {name}={example}")
                return None

        servers = get("KRT_NATS_SERVER", _parse_servers, "a nats:// URL", "nats://localhost:4222")
        subject = get("KRT_NATS_MONGO_WRITER", _parse_subject, "a subject without wildcards",
                      "mongo_writer_data.demo")
        uri = get("KRT_MONGO_URI", _parse_mongo_uri, "a mongodb:// URI", "mongodb://user:pass@localhost:27017")
        database = env.get("KRT_MONGO_DB", "").strip()
        if not database:
            runtime = env.get("KRT_RUNTIME_ID", "").strip()
            if runtime:
                database = f"{runtime}-data"
            else:
                problems.append("KRT_MONGO_DB and KRT_RUNTIME_ID are not set: set KRT_MONGO_DB=demo-data, or "
                                "KRT_RUNTIME_ID=demo to use the original's database {runtime}-data")
        timeout = get("KRT_DB_TIMEOUT", _positive_float, "seconds > 0", "5", required=False) or 5.0
        level = get("KRT_LOG_LEVEL", parse_log_level, "DEBUG, INFO, WARNING (or WARN) or ERROR", "INFO",
                    required=False) or "INFO"
        log_format = get("KRT_LOG_FORMAT", _log_format, "text or json", "json", required=False) or "text"
        # The same credential and TLS variables as a node (KRT_NATS_CREDS, ..., KRT_NATS_TLS_CA).
        auth_reader = _Reader(env)
        auth = read_nats_auth(auth_reader)
        problems.extend(auth_reader.problems)
        if problems:
            raise ConfigError(problems)
        return cls(nats_servers=servers, mongo_writer_subject=subject, mongo_uri=uri, mongo_db=database,
                   db_timeout=timeout, log_level=level, log_format=log_format, nats_auth=auth)


async def serve(settings: Any, nc: NatsClient, stop: asyncio.Event, logger: logging.Logger | None = None) -> None:
    """Answer writer requests on ``settings.mongo_writer_subject`` until ``stop`` is set, then drain.

    ``settings`` is a :class:`WriterSettings` or anything with the same attributes (a node's Settings).
    """
    log = logger or logging.getLogger("kre_runner.services.mongo_writer")
    connection = MongoConnection(settings.mongo_uri, settings.mongo_db, settings.db_timeout)
    slots = asyncio.Semaphore(_MAX_CONCURRENT)
    in_flight: set[asyncio.Task[None]] = set()

    async def on_request(msg: Msg) -> None:
        # nats-py runs one callback at a time per subscription: hand the insert to a task so a slow
        # MongoDB does not serialize every request, and bound how many run at once.
        await slots.acquire()
        task = asyncio.create_task(_handle(msg, connection, log))
        in_flight.add(task)
        task.add_done_callback(finished)

    def finished(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        slots.release()

    sub = await nc.subscribe(settings.mongo_writer_subject, queue=QUEUE_GROUP, cb=on_request)
    log.info("mongo-writer: serving %r (queue %s) into %s database %r", settings.mongo_writer_subject,
             QUEUE_GROUP, redact_url(settings.mongo_uri), settings.mongo_db)
    try:
        await stop.wait()
    finally:
        log.info("mongo-writer: stopping; draining requests")
        try:
            await asyncio.wait_for(sub.drain(), settings.db_timeout + 5)
        except Exception as exc:  # connection already closed, or drain too slow: finish what we have
            log.warning("mongo-writer: drain incomplete: %s: %s", type(exc).__name__, exc)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=settings.db_timeout + 1)
        connection.close()
        log.info("mongo-writer: stopped")


async def _handle(msg: Msg, connection: MongoConnection, log: logging.Logger) -> None:
    """Insert one request's document and answer it; every failure becomes ``success: false``."""
    try:
        request = decode_writer_payload(msg.data)
        if not isinstance(request, dict):
            raise ValueError("request is not a JSON object")
        coll, doc = request.get("coll"), request.get("doc")
        if not isinstance(coll, str) or not coll:
            raise ValueError("'coll' must be a non-empty string")
        if not isinstance(doc, dict):
            raise ValueError("'doc' must be a JSON object")
    except Exception as exc:  # gzip, JSON, shape
        await _reply(msg, f"bad request: {type(exc).__name__}: {exc}", log)
        return
    try:
        await asyncio.wait_for(connection.insert(coll, doc), connection.timeout)
    except Exception as exc:
        reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
        await _reply(msg, f"insert into {coll!r} failed: {reason.split(', Timeout:')[0][:300]}", log)
        return
    if msg.reply:
        try:
            await msg.respond(_REPLY_OK)
        except Exception as exc:
            log.warning("mongo-writer: cannot reply: %s", exc)


async def _reply(msg: Msg, error: str, log: logging.Logger) -> None:
    log.warning("mongo-writer: %s (subject %s, %d bytes)", error, msg.subject, len(msg.data))
    if not msg.reply:
        return
    try:
        await msg.respond(json.dumps({"success": False, "error": error}).encode())
    except Exception as exc:
        log.warning("mongo-writer: cannot reply: %s", exc)


async def run_writer(settings: WriterSettings, stop: asyncio.Event, logger: logging.Logger) -> None:
    """``kre-runner mongo-writer``: connect and serve until ``stop`` is set."""
    nc = await connect(settings.nats_servers, logger, name="kre-runner mongo-writer", auth=settings.nats_auth)
    try:
        await serve(settings, nc, stop, logger)
    finally:
        await nc.close()
