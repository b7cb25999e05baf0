"""Sync handler meant for KRT_HANDLER_THREADS: blocks like a model call would."""

import threading
import time

from greeter_pb2 import Request, Response

THREADS = set()


def init(ctx):
    ctx.set("init_thread", threading.current_thread().name)


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    THREADS.add(threading.current_thread().name)
    time.sleep(0.02)
    if request.name.startswith("early"):
        ctx.early_reply(Response(greeting=f"early {request.name}"))
    return Response(greeting=f"{threading.current_thread().name} {request.name}")
