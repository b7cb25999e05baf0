"""Batch handlers for the batching tests: each request's name chooses what its item of the list is.

``handler_batch`` is sync (run in a thread), ``classify_async`` the same as a coroutine marked with
the decorator. ``CALLS`` records each call's names and when it started, ``THREADS`` the thread each call ran in
(for in-process tests); a test holds every call while ``GATE`` is cleared.
"""

import os
import threading
import time

from google.protobuf.any_pb2 import Any as AnyProto
from greeter_pb2 import Request, Response

from kre_runner import Retry, batch_handler

CALLS: list[tuple[float, list[str]]] = []
THREADS: list[str] = []
# A test clears it to keep the model busy until it sets it again (sync handler only: it runs in a thread).
GATE = threading.Event()
GATE.set()


def _item(ctx, name):
    if name.startswith("none"):
        return None
    if name.startswith("any"):
        packed = AnyProto()
        packed.Pack(Response(greeting=f"packed {name}"))
        return packed
    if name.startswith("exc"):
        return ValueError(f"bad {name}")
    if name.startswith("retry"):
        if ctx.get(name) is None:  # the first delivery fails briefly, the next one succeeds
            ctx.set(name, True)
            return Retry("briefly unavailable", delay=0)
        return Response(greeting=f"retried {name}")
    if name.startswith("garbage"):
        return "a string"
    if name.startswith("early"):
        try:
            ctx.early_reply(Response(greeting="too soon"))
        except RuntimeError as exc:
            return Response(greeting=str(exc))
    if name.startswith("tracking"):
        return Response(greeting=",".join(ctx.batch_tracking_ids()))
    return Response(greeting=f"ok {name}")


def handler_batch(ctx, batch):
    names = []
    for data in batch:
        request = Request()
        data.Unpack(request)
        names.append(request.name)
    CALLS.append((time.time(), names))
    THREADS.append(threading.current_thread().name)
    GATE.wait(30)
    time.sleep(float(os.environ.get("BATCH_SECONDS", "0")))
    if "raise" in names:
        raise RuntimeError("the model crashed")
    results = [_item(ctx, name) for name in names]
    if "short" in names:
        return results[:-1]
    if "not-a-list" in names:
        return {"results": results}
    return results


@batch_handler
async def classify_async(ctx, batch):
    return handler_batch(ctx, batch)
