"""Async handler taking SLOW_SECONDS (env) per message, for shutdown tests."""

import asyncio
import os

from greeter_pb2 import Request, Response

CALLS: list[str] = []  # request names, in call order (for tests that run the node in-process)


async def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    CALLS.append(request.name)
    await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "0.2")))
    return Response(greeting=f"slow {request.name} pid={os.getpid()}")
