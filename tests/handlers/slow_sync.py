"""Sync handler taking SLOW_SECONDS (env) per message, for shutdown tests with KRT_HANDLER_THREADS."""

import os
import time

from greeter_pb2 import Request, Response


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    time.sleep(float(os.environ.get("SLOW_SECONDS", "0.2")))
    return Response(greeting=f"slow {request.name}")
