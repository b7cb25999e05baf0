"""Transient failures, poison messages and large inputs, chosen by the request name.

Calls are counted per name in ``CALLS`` (in-process nodes) and appended to the file ``$CALLS_FILE``
when set (nodes run as processes, which may die).
"""

import os
import time

from greeter_pb2 import Request, Response

from kre_runner import Retry

CALLS: dict[str, int] = {}


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    name = request.name
    CALLS[name] = CALLS.get(name, 0) + 1
    if os.environ.get("CALLS_FILE"):
        with open(os.environ["CALLS_FILE"], "a") as f:
            f.write(name[:40] + "\n")
    if name.startswith("flaky-") and CALLS[name] <= int(name.split("-")[1]):
        raise Retry("GPU busy", delay=0.1)  # fails that many times, then works
    if name == "always-retry":
        raise Retry("database down", delay=0.1)
    if name == "die":
        os._exit(3)  # a C extension's segfault, the OOM killer: the process is gone
    if name.startswith("pad:"):
        time.sleep(0.02)
        return Response(greeting=f"len {len(name)}")
    return Response(greeting=f"ok {name}")
