"""Async handler that awaits I/O; records the highest concurrency it saw."""

import asyncio

from greeter_pb2 import Request, Response

STATE = {"running": 0, "peak": 0}


async def init(ctx):
    await asyncio.sleep(0.01)
    ctx.set("prefix", "Hi")


async def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    STATE["running"] += 1
    STATE["peak"] = max(STATE["peak"], STATE["running"])
    try:
        await asyncio.sleep(float(ctx.get("delay", 0.02)))
    finally:
        STATE["running"] -= 1
    return Response(greeting=f"{ctx.get('prefix')}, {request.name}!")
