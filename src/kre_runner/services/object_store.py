"""``ctx.object_store``: objects too large for a message, in the JetStream object store ``KRT_NATS_OBJECT_STORE``.

The kre-py 3.1+ contract (``save``, ``get``, ``delete``), plus ``list`` and streaming forms for large
objects. The original started the ``nats`` command-line tool for every call; this uses the JetStream
object-store format through nats-py, so objects are shared with the original's nodes and any client.

Saving goes through nats-py's ``ObjectStore.put`` (it reads its source a chunk at a time). Reading does
not: nats-py 2.16's ``get`` grows a bytes object chunk by chunk (quadratic) and pushes through a
flow-controlled consumer it answers every quarter second. Here a pull consumer fetches a few chunks at
a time, so a read holds at most one batch of chunks beyond what the caller keeps, and ``get`` fills a
buffer sized once from the object's metadata.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
from collections.abc import AsyncIterator, Callable
from hashlib import sha256
from typing import BinaryIO

from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore as NatsObjectStore

__all__ = ["ObjectStore", "ObjectStoreError", "ObjectStoreUnavailable", "StoredObjectNotFound", "open_object_store"]

_BATCH = 8  # chunks asked for per fetch: the most a read holds beyond the caller's bytes
_FETCH_TIMEOUT = 10.0  # seconds without a chunk before a read gives up


class ObjectStoreError(RuntimeError):
    """An object could not be saved or read as stored (a digest mismatch, a missing chunk)."""


class ObjectStoreUnavailable(RuntimeError):
    """``KRT_NATS_OBJECT_STORE`` names a bucket that does not exist."""


class StoredObjectNotFound(ObjectNotFoundError):
    """No object by that name (a :class:`nats.js.errors.ObjectNotFoundError`, with a message)."""

    def __init__(self, message: str) -> None:
        super().__init__(description=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ObjectStore:
    """One bucket; build with :func:`open_object_store`. Keys as nats-py allows (letters, digits, ``-/_=.``)."""

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self._js = js
        self.bucket = bucket
        self._stream = f"OBJ_{bucket}"
        self._store: NatsObjectStore | None = None

    async def save(self, key: str, data: bytes) -> None:
        """Store ``data`` as the object ``key`` (replacing it). Empty data is refused, as by the original."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"ctx.object_store.save({key!r}, ...): data must be bytes, got {type(data).__name__}; "
                            f"for a file use save_file({key!r}, path)")
        if len(data) == 0:
            raise ValueError(f"ctx.object_store.save({key!r}, b''): the object is empty; the object store keeps "
                             f"only non-empty objects (delete({key!r}) removes one)")
        store = await self._open()
        # bytes go to nats-py as they are (no copy); a bytearray or memoryview is read a chunk at a time.
        await store.put(key, data if isinstance(data, bytes) else _MemoryReader(data))

    async def save_file(self, key: str, source: str | os.PathLike[str] | BinaryIO) -> int:
        """Store a file (a path, or a binary file open for reading) a chunk at a time; return its size.

        An empty file is refused, as empty data is by :meth:`save`, and leaves any object ``key`` as it was.
        """
        store = await self._open()
        with contextlib.ExitStack() as stack:
            if isinstance(source, (str, os.PathLike)):
                file: BinaryIO = stack.enter_context(await asyncio.to_thread(open, source, "rb"))
            else:
                file = source
            if _remaining(file) == 0:
                raise ValueError(f"ctx.object_store.save_file({key!r}, ...): the file is empty; the object store "
                                 f"keeps only non-empty objects")
            info = await store.put(key, file)
        return int(info.size or 0)

    async def get(self, key: str) -> bytes:
        """The object's bytes. Raises :class:`StoredObjectNotFound` when there is none."""
        info = await self._info(key)
        buffer = io.BytesIO()
        if info.size:
            # Sized once (no re-allocation as chunks arrive); getvalue() then hands this buffer over uncopied.
            buffer.seek(info.size - 1)
            buffer.write(b"\0")
            buffer.seek(0)
        async for chunk in self._chunks(key, info):
            buffer.write(chunk)
        return buffer.getvalue()

    async def get_to(self, key: str, target: str | os.PathLike[str] | BinaryIO) -> int:
        """Write the object to ``target`` (a path, or a binary file open for writing); return its size.

        Holds one batch of chunks at a time; the writes run off the event loop.
        """
        info = await self._info(key)
        loop = asyncio.get_running_loop()
        with contextlib.ExitStack() as stack:
            if isinstance(target, (str, os.PathLike)):
                file: BinaryIO = stack.enter_context(await asyncio.to_thread(open, target, "wb"))
            else:
                file = target
            async for batch in self._batches(key, info):
                await loop.run_in_executor(None, _write_all, file.write, batch)
        return int(info.size or 0)

    async def chunks(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes a chunk at a time (for a caller that streams them elsewhere)."""
        info = await self._info(key)
        async for chunk in self._chunks(key, info):
            yield chunk

    async def delete(self, key: str) -> None:
        """Delete the object ``key``. Raises :class:`StoredObjectNotFound` when there is none."""
        store = await self._open()
        try:
            await store.delete(key)
        except ObjectNotFoundError:
            raise self._not_found(key) from None

    async def list(self) -> list[str]:
        """The names of the objects in the bucket (sorted)."""
        store = await self._open()
        try:
            infos = await store.list(ignore_deletes=True)
        except NotFoundError:  # nats-py's answer for an empty bucket
            return []
        return sorted(info.name for info in infos if info.name)

    def describe(self) -> str:
        return f"object store {self.bucket}"

    async def check(self) -> bool:
        """Whether the bucket exists (for the start-up line)."""
        try:
            await self._open()
        except ObjectStoreUnavailable:
            return False
        return True

    async def _open(self) -> NatsObjectStore:
        if self._store is None:
            try:
                self._store = await self._js.object_store(self.bucket)
            except (BucketNotFoundError, NotFoundError):
                raise ObjectStoreUnavailable(
                    f"object store {self.bucket} (KRT_NATS_OBJECT_STORE) does not exist: create it with "
                    f"`kre-runner stream create` (in this node's environment) or `nats object add {self.bucket}`"
                ) from None
        return self._store

    def _not_found(self, key: str) -> StoredObjectNotFound:
        return StoredObjectNotFound(f"no object {key!r} in object store {self.bucket}")

    async def _info(self, key: str) -> api.ObjectInfo:
        store = await self._open()
        try:
            info = await store.get_info(key)
        except ObjectNotFoundError:
            raise self._not_found(key) from None
        if info.is_link():
            raise ObjectStoreError(f"object {key!r} in {self.bucket} is a link: links are not followed")
        return info

    async def _chunks(self, key: str, info: api.ObjectInfo) -> AsyncIterator[bytes]:
        async for batch in self._batches(key, info):
            for chunk in batch:
                yield chunk

    async def _batches(self, key: str, info: api.ObjectInfo) -> AsyncIterator[list[bytes]]:
        """The object's chunks, a fetch at a time, checked against its size and SHA-256 digest at the end."""
        if not info.size:
            return
        subject = f"$O.{self.bucket}.C.{info.nuid}"
        consumer = await self._js.add_consumer(self._stream, api.ConsumerConfig(
            filter_subject=subject, deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE,
            mem_storage=True, num_replicas=1, inactive_threshold=30.0))
        psub = await self._js.pull_subscribe_bind(consumer.name, self._stream)
        digest = sha256()
        size = chunks = 0
        try:
            while chunks < (info.chunks or 0):
                try:
                    msgs = await psub.fetch(min(_BATCH, int(info.chunks or 0) - chunks), timeout=_FETCH_TIMEOUT)
                except Exception as exc:
                    raise ObjectStoreError(f"object {key!r} in {self.bucket}: chunk {chunks + 1} of {info.chunks} "
                                           f"did not come within {_FETCH_TIMEOUT:g}s ({type(exc).__name__})") from None
                batch = [msg.data for msg in msgs]
                for data in batch:
                    digest.update(data)
                    size += len(data)
                chunks += len(batch)
                yield batch
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self._stream, consumer.name)
        expected = (info.digest or "").partition("=")[2]
        if size != info.size or (expected and base64.urlsafe_b64decode(expected) != digest.digest()):
            raise ObjectStoreError(f"object {key!r} in {self.bucket} does not match its metadata (size {size} of "
                                   f"{info.size}, or its SHA-256 digest): it was changed while being read; read it "
                                   f"again")


class _MemoryReader(io.RawIOBase):
    """A bytearray or memoryview as a reader, so nats-py's put reads it a chunk at a time without a copy."""

    def __init__(self, data: bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), len(self._view) - self._at)
        buffer[:n] = self._view[self._at:self._at + n]
        self._at += n
        return n


def _remaining(file: BinaryIO) -> int | None:
    """Bytes left to read in a seekable file; None when it cannot tell (a pipe)."""
    try:
        if not file.seekable():
            return None
        at = file.tell()
        end = file.seek(0, os.SEEK_END)
        file.seek(at)
    except (OSError, AttributeError):
        return None
    return end - at


def _write_all(write: Callable[[bytes], object], batch: list[bytes]) -> None:
    for chunk in batch:
        write(chunk)


async def open_object_store(js: JetStreamContext, bucket: str) -> tuple[ObjectStore, bool]:
    """An :class:`ObjectStore` on ``bucket``, and whether the bucket exists now (calls fail until it does)."""
    store = ObjectStore(js, bucket)
    return store, await store.check()

