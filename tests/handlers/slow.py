"""Async handler taking SLOW_SECONDS (env) per message, for shutdown tests."""

import asyncio
import os

from greeter_pb2 import Request, Response


async def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "0.2")))
    return Response(greeting=f"slow {request.name} pid={os.getpid()}")
