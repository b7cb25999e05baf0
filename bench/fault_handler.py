"""The fault table's user code (``bench/faults.py``), behaviour chosen by the request name.

``die…`` kills the process (a segfault, the OOM killer); ``hang…`` blocks the event loop past the ack
wait the first time any replica sees it (a marker file in ``$FAULT_DIR`` says it happened); ``pad…``
works 20 ms, as a model would. ``handler_db`` stores a document per input with ``ctx.db`` and asks for
a retry while MongoDB is down; ``handler_measured`` saves a point per input with ``ctx.measurement``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from greeter_pb2 import Request, Response

from kre_runner import DatabaseError, Retry


def _name(data: Any) -> str:
    request = Request()
    data.Unpack(request)
    return request.name


def handler(ctx: Any, data: Any) -> Response:
    name = _name(data)
    if name.startswith("die"):
        os._exit(3)
    if name.startswith("hang"):
        marker = Path(os.environ["FAULT_DIR"]) / f"hung-{name}"
        if not marker.exists():
            marker.touch()
            time.sleep(float(os.environ.get("FAULT_HANG_S", "3")))
    if name.startswith("pad"):
        time.sleep(0.02)
        return Response(greeting=f"len {len(name)}")
    return Response(greeting=f"ok {name}")


async def handler_db(ctx: Any, data: Any) -> Response:
    name = _name(data)
    try:
        await ctx.db.save("faults", {"name": name})
    except DatabaseError as exc:
        raise Retry(f"MongoDB: {exc}", delay=0.5) from exc
    return Response(greeting=f"stored {name}")


def handler_measured(ctx: Any, data: Any) -> Response:
    name = _name(data)
    ctx.measurement.save("faults", {"length": len(name)})
    return Response(greeting=f"ok {name}")
