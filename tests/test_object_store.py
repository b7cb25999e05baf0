"""ctx.object_store on a real nats-server: round trips, the standard format both ways, errors, a large object."""

from __future__ import annotations

import gc
import io
import os

import pytest
from nats.js.errors import ObjectNotFoundError

from kre_runner.services.object_store import (
    ObjectStore,
    ObjectStoreUnavailable,
    StoredObjectNotFound,
    open_object_store,
)

pytestmark = pytest.mark.integration

BUCKET = "object-store_demo_v1_wf"
MB = 1024 * 1024


@pytest.fixture
async def store(js) -> ObjectStore:
    await js.create_object_store(BUCKET)
    opened, exists = await open_object_store(js, BUCKET)
    assert exists
    return opened


@pytest.mark.parametrize("size", [1, 1000, 128 * 1024, 3 * MB + 17])
async def test_round_trip_small_and_a_few_megabytes(store, size):
    data = os.urandom(size)
    await store.save("model.bin", data)
    assert await store.get("model.bin") == data
    assert b"".join([chunk async for chunk in store.chunks("model.bin")]) == data


async def test_objects_are_in_the_standard_format_both_ways(js, store):
    native = await js.object_store(BUCKET)
    data = os.urandom(MB + 5)
    await store.save("ours", data)
    assert (await native.get("ours")).data == data  # another client reads what this one saved
    await native.put("theirs", b"from nats-py")
    assert await store.get("theirs") == b"from nats-py"  # and this one reads what another saved
    assert await store.list() == ["ours", "theirs"]


async def test_replace_delete_list_and_not_found(store):
    await store.save("a", b"1")
    await store.save("a", bytearray(b"22"))  # replaced; a bytearray is read without a copy
    assert await store.get("a") == b"22"
    await store.delete("a")
    with pytest.raises(ObjectNotFoundError, match=f"no object 'a' in object store {BUCKET}"):
        await store.get("a")
    with pytest.raises(StoredObjectNotFound):
        await store.delete("a")
    assert await store.list() == []


async def test_empty_objects_are_refused_and_leave_the_old_one(store, tmp_path):
    await store.save("k", b"kept")
    with pytest.raises(ValueError, match="empty"):
        await store.save("k", b"")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        await store.save_file("k", empty)
    assert await store.get("k") == b"kept"
    with pytest.raises(TypeError, match="must be bytes"):
        await store.save("k", "text")  # type: ignore[arg-type]


async def test_files_stream_both_ways(store, tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(2 * MB + 3))
    assert await store.save_file("f", source) == source.stat().st_size
    target = tmp_path / "out.bin"
    assert await store.get_to("f", target) == source.stat().st_size
    assert target.read_bytes() == source.read_bytes()
    sink = io.BytesIO()
    await store.get_to("f", sink)
    assert sink.getvalue() == source.read_bytes()


async def test_a_missing_bucket_is_reported_and_calls_say_how_to_create_it(js):
    store, exists = await open_object_store(js, "object-store_absent")
    assert not exists
    with pytest.raises(ObjectStoreUnavailable, match="object-store_absent.*KRT_NATS_OBJECT_STORE.*kre-runner stream "
                                                      "create"):
        await store.save("k", b"x")
    await js.create_object_store("object-store_absent")  # created later: the next call finds it
    await store.save("k", b"x")
    assert await store.get("k") == b"x"


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_large_object_streams_without_holding_it(store, tmp_path):
    size = 64 * MB
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(size))
    gc.collect()
    before = _rss()
    await store.save_file("big", source)
    await store.get_to("big", tmp_path / "back.bin")
    grown = _rss() - before
    # Chunks are 128 KiB and a read holds 8 of them: a few MB. A quarter of the object is a generous bound
    # (allocator noise, the pages of nats-py's read buffer) that still fails if either side held the object.
    assert grown < size / 4, f"RSS grew {grown / MB:.1f} MB for a {size / MB:.0f} MB object"
    assert (tmp_path / "back.bin").stat().st_size == size
    gc.collect()
    before = _rss()
    data = await store.get("big")
    grown = _rss() - before
    # In memory: the caller's bytes (1 ×) and a batch of chunks, never a second copy.
    assert len(data) == size and grown < 1.5 * size, f"RSS grew {grown / MB:.1f} MB"
