"""``ctx.configuration``: live configuration in three JetStream key-value buckets (project, workflow, node).

The kre-py 3.3+ contract: ``get(key)`` looks in the node's bucket, then the workflow's, then the
project's; ``get(key, scope)`` in that scope's only; values are UTF-8 strings. Unlike the original,
which asked the server on every ``get``, reads come from a cache that one KV watch per bucket keeps
fresh (an ordered push consumer: changes arrive as the server stores them), so a ``get`` of a key
that has a value costs no round trip. A miss is confirmed with the server (one request per scope),
since the watch may not yet have delivered a key that the upstream node set just before sending. A
node's own ``set``/``delete`` is in its cache when the call returns.

A missing bucket does not stop the node (the original failed at start): one start-up line says how
to create it, and calls on that scope raise :class:`ConfigurationUnavailable` naming the variable and
the bucket until it exists (it is looked up again, at most every few seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

__all__ = ["SCOPES", "SCOPE_VARIABLES", "Configuration", "ConfigurationKeyNotFound", "ConfigurationUnavailable",
           "open_configuration"]

# The lookup order of a scope-less get.
SCOPES = ("node", "workflow", "project")
SCOPE_VARIABLES = {
    "project": "KRT_NATS_KEY_VALUE_STORE_PROJECT",
    "workflow": "KRT_NATS_KEY_VALUE_STORE_WORKFLOW",
    "node": "KRT_NATS_KEY_VALUE_STORE_NODE",
}
_RETRY_MISSING = 5.0  # seconds between look-ups of a bucket that was missing


class ConfigurationKeyNotFound(KeyNotFoundError):
    """No value for the key; a :class:`nats.js.errors.KeyNotFoundError`, as the original raised with a scope."""


class ConfigurationUnavailable(RuntimeError):
    """The scope's bucket is not configured or does not exist on the server."""


@dataclass
class _Bucket:
    """One scope's bucket and the cache its watch keeps: key -> (revision, value; None once deleted)."""

    scope: str
    name: str
    kv: KeyValue | None = None
    values: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    watch: asyncio.Task[None] | None = None
    watcher: KeyValue.KeyWatcher | None = None
    missing_since: float = 0.0

    @property
    def live(self) -> bool:
        """The cache is authoritative: its watch has delivered the bucket's contents and still runs."""
        return self.watch is not None and not self.watch.done()

    def apply(self, key: str, revision: int, value: str | None) -> None:
        """Keep the newest revision: the watch may deliver an older entry after this node's own write."""
        known = self.values.get(key)
        if known is None or revision > known[0]:
            self.values[key] = (revision, value)


class Configuration:
    """The three scopes' buckets; build with :func:`open_configuration`."""

    def __init__(self, js: JetStreamContext, buckets: Mapping[str, str], logger: logging.Logger) -> None:
        self._js = js
        self._log = logger
        self._buckets = {scope: _Bucket(scope, name) for scope, name in buckets.items() if name}

    @property
    def buckets(self) -> dict[str, str]:
        """Scope -> bucket name, of the scopes configured (for /info and log lines)."""
        return {scope: bucket.name for scope, bucket in self._buckets.items()}

    async def get(self, key: str, scope: str | None = None) -> str:
        """The value of ``key``: in ``scope``, or the first of node, workflow, project that has it.

        Served from the watched cache: no round trip. A key not in the cache is asked of the server (it may
        have been set an instant ago, by the node that sent this input) before it is reported missing.
        Raises :class:`ConfigurationKeyNotFound` when there is no value, :class:`ConfigurationUnavailable`
        when the scope's bucket is missing.
        """
        if scope is not None:
            bucket = await self._bucket(scope)
            value = await self._read(bucket, key)
            if value is None and bucket.live:
                value = await self._confirm(bucket, key)
            if value is None:
                raise ConfigurationKeyNotFound(message=f"{key!r} in the {scope} scope (bucket {bucket.name})")
            return value
        missing = []
        for name in SCOPES:
            bucket = self._buckets.get(name)
            if bucket is None:
                continue
            if bucket.kv is None and not await self._reopen(bucket):
                missing.append(f"{bucket.name} ({SCOPE_VARIABLES[name]})")
                continue
            value = await self._read(bucket, key)
            if value is not None:
                return value
        # Not cached in any scope: a key set just before (by the upstream node that sent this input) may
        # not have reached the watches yet. Ask the server, in lookup order, before saying it is missing.
        for name in SCOPES:
            bucket = self._buckets.get(name)
            if bucket is not None and bucket.live:
                value = await self._confirm(bucket, key)
                if value is not None:
                    return value
        also = f"; missing bucket(s): {', '.join(missing)}" if missing else ""
        raise ConfigurationKeyNotFound(message=f"no value found for {key!r} in the node, workflow or project "
                                               f"scope{also}")

    async def set(self, key: str, value: str, scope: str = "node") -> None:
        """Put ``value`` (a string, stored as UTF-8) under ``key`` in ``scope``'s bucket."""
        if not isinstance(value, str):
            raise TypeError(f"ctx.configuration.set({key!r}, ...): the value must be a str (stored as UTF-8), "
                            f"got {type(value).__name__}: convert it, e.g. str(value) or json.dumps(value)")
        bucket = await self._bucket(scope)
        assert bucket.kv is not None
        revision = await bucket.kv.put(key, value.encode())
        bucket.apply(key, revision, value)

    async def delete(self, key: str, scope: str = "node") -> None:
        """Delete ``key`` in ``scope`` (a scope-less get then finds the next scope's value, if any)."""
        bucket = await self._bucket(scope)
        assert bucket.kv is not None
        known = bucket.values.get(key)
        await bucket.kv.delete(key)
        # The delete's own revision is not returned: the watch's entry for it (newer) confirms it.
        bucket.values[key] = (known[0] if known else 0, None)

    async def list(self, scope: str | None = None) -> list[str]:
        """The keys with a value in ``scope``, or in any scope (sorted, each once)."""
        scopes = [scope] if scope is not None else [s for s in SCOPES if s in self._buckets]
        keys: set[str] = set()
        for name in scopes:
            bucket = await self._bucket(name) if scope is not None else self._buckets[name]
            if bucket.kv is None and not await self._reopen(bucket):
                continue
            if bucket.live:
                keys.update(k for k, (_, v) in bucket.values.items() if v is not None)
            else:
                with contextlib.suppress(Exception):  # nats-py raises NoKeysError for an empty bucket
                    keys.update(await bucket.kv.keys())  # type: ignore[union-attr]
        return sorted(keys)

    async def start(self) -> None:
        """Open every configured bucket and start its watch; log one line per missing bucket."""
        for bucket in self._buckets.values():
            if not await self._open(bucket):
                self._log.warning(
                    "ctx.configuration: %s bucket %s (%s) does not exist: calls on that scope fail until it does; "
                    "create it with `kre-runner stream create` (in this node's environment) or `nats kv add %s`",
                    bucket.scope, bucket.name, SCOPE_VARIABLES[bucket.scope], bucket.name)

    async def close(self) -> None:
        """Stop the watches."""
        for bucket in self._buckets.values():
            if bucket.watch is not None:
                bucket.watch.cancel()
                await asyncio.gather(bucket.watch, return_exceptions=True)
            if bucket.watcher is not None:
                with contextlib.suppress(Exception):
                    await bucket.watcher.stop()

    def describe(self) -> str:
        return ", ".join(f"{scope} {bucket.name}" for scope, bucket in self._buckets.items())

    async def _bucket(self, scope: str) -> _Bucket:
        if scope not in SCOPE_VARIABLES:
            raise ValueError(f"scope {scope!r} is not one of 'node', 'workflow', 'project'")
        bucket = self._buckets.get(scope)
        if bucket is None:
            raise ConfigurationUnavailable(f"ctx.configuration has no {scope} scope: set "
                                           f"{SCOPE_VARIABLES[scope]} to its key-value bucket")
        if bucket.kv is None and not await self._reopen(bucket):
            raise ConfigurationUnavailable(f"the {scope} scope's bucket {bucket.name} ({SCOPE_VARIABLES[scope]}) "
                                           f"does not exist: create it with `kre-runner stream create`")
        return bucket

    async def _read(self, bucket: _Bucket, key: str) -> str | None:
        if bucket.live:
            known = bucket.values.get(key)
            return None if known is None else known[1]
        # The watch ended (it logged why): ask the server, as the original always did.
        assert bucket.kv is not None
        try:
            entry = await bucket.kv.get(key)
        except KeyNotFoundError:
            return None
        return None if entry.value is None else entry.value.decode()

    async def _confirm(self, bucket: _Bucket, key: str) -> str | None:
        """A cache miss asked of the server: a put the watch has not delivered yet is found and cached."""
        assert bucket.kv is not None
        try:
            entry = await bucket.kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        value = entry.value.decode(errors="replace")
        bucket.apply(key, entry.revision or 0, value)
        return value

    async def _reopen(self, bucket: _Bucket) -> bool:
        """A missing bucket is looked up again, at most every few seconds (it may have been created since)."""
        if time.monotonic() - bucket.missing_since < _RETRY_MISSING:
            return False
        if await self._open(bucket):
            self._log.info("ctx.configuration: %s bucket %s exists now", bucket.scope, bucket.name)
            return True
        return False

    async def _open(self, bucket: _Bucket) -> bool:
        try:
            kv = await self._js.key_value(bucket.name)
        except BucketNotFoundError:
            bucket.missing_since = time.monotonic()
            return False
        watcher = await kv.watchall()
        synced = asyncio.get_running_loop().create_future()
        bucket.watcher = watcher
        bucket.watch = asyncio.create_task(self._follow(bucket, watcher, synced), name=f"kv-watch {bucket.name}")
        await synced  # the bucket's current values are cached before the first call
        bucket.kv = kv
        return True

    async def _follow(self, bucket: _Bucket, watcher: KeyValue.KeyWatcher, synced: asyncio.Future[None]) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # the marker after the bucket's current contents
                    if not synced.done():
                        synced.set_result(None)
                    continue
                deleted = entry.operation in (KV_DEL, KV_PURGE) or entry.value is None
                bucket.apply(entry.key, entry.revision or 0,
                             None if deleted else entry.value.decode(errors="replace"))  # type: ignore[union-attr]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log.warning("ctx.configuration: the watch of %s ended (%s: %s): reads go to the server",
                              bucket.name, type(exc).__name__, exc)
        finally:
            if not synced.done():
                synced.set_result(None)


async def open_configuration(js: JetStreamContext, buckets: Mapping[str, str],
                             logger: logging.Logger) -> Configuration:
    """A :class:`Configuration` on ``buckets`` (scope -> bucket name, unset scopes left out), watches started."""
    configuration = Configuration(js, buckets, logger)
    await configuration.start()
    return configuration
