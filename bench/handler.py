"""The benchmark's user code, run by kre-runner through ``KRT_HANDLER_PATH=handler.py[:function]``.

``handler`` is the trivial job the reference node does too; the variants price one feature each.
"""

from __future__ import annotations

import asyncio
from typing import Any

from greeter_pb2 import Request, Response


def handler(ctx: Any, data: Any) -> Response:
    request = Request()
    data.Unpack(request)
    return Response(greeting="Hello, " + request.name + "!")


def handler_measured(ctx: Any, data: Any) -> Response:
    """As ``handler``, plus one ``ctx.measurement.save`` per message (a user metric)."""
    request = Request()
    data.Unpack(request)
    ctx.measurement.save("bench_greeting", {"name_length": len(request.name)}, {"model": "greeter"})
    return Response(greeting="Hello, " + request.name + "!")


async def handler_async(ctx: Any, data: Any) -> Response:
    """As ``handler``, but a coroutine: one task per message (the CPU limit of async handlers)."""
    return handler(ctx, data)


def handler_batch(ctx: Any, batch: list[Any]) -> list[Response]:
    """``handler`` as a batch handler (KRT_BATCH_SIZE): the runner's cost of the batch path."""
    return [handler(ctx, data) for data in batch]


async def handler_io(ctx: Any, data: Any) -> Response:
    """An async handler that waits 10 ms on I/O: throughput is bounded by KRT_MAX_INFLIGHT / 10 ms."""
    await asyncio.sleep(0.01)
    return handler(ctx, data)
