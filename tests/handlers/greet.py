"""Sync handler; init must have run (once) before any message."""

import os
import time

from greeter_pb2 import Request, Response

INIT_CALLS = []


def init(ctx):
    time.sleep(0.2)  # a slow model load: no message may be fetched before it ends
    INIT_CALLS.append(time.monotonic())
    ctx.set("init_calls", len(INIT_CALLS))


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    return Response(greeting=f"Hello, {request.name}! init={ctx.get('init_calls')} pid={os.getpid()}")
