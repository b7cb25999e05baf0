"""Sync handler for the operations tests: a slow or failing init, a handler that logs and can be slow.

INIT_SECONDS: init sleeps that long (a model loading); INIT_FAIL: init raises KeyError('threshold');
HANDLER_SECONDS: each call sleeps that long.
"""

import os
import time

from greeter_pb2 import Request, Response


def _load_model(ctx):
    config = {}
    if os.environ.get("INIT_FAIL"):
        return config["threshold"]  # the line the traceback must point at
    time.sleep(float(os.environ.get("INIT_SECONDS", "0")))
    return "model"


def init(ctx):
    ctx.set("model", _load_model(ctx))


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    ctx.logger.info("greeting %s", request.name)
    time.sleep(float(os.environ.get("HANDLER_SECONDS", "0")))
    return Response(greeting=f"Hello, {request.name}! model={ctx.get('model')}")
