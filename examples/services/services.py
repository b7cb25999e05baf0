"""A node using every ctx data service: it records each request and passes it on unchanged.

Place it before ``greeter`` (input ``Request{name}``, output the same ``Request``). Each message:
  * ``ctx.db.save`` stores the request, ``ctx.db.find`` counts earlier visits of the same name;
  * ``ctx.measurement.save`` writes a point (buffered, never blocks the handler);
  * ``ctx.prediction.save`` stores a toy classification (is the name "long"?).
A service whose settings are missing is skipped, with one warning at start.
"""

import sys
import time
from pathlib import Path

# The example shares the greeter's protobufs; the runner only puts this file's directory on sys.path.
_GREETER = str(Path(__file__).resolve().parent.parent / "greeter")
if _GREETER not in sys.path:
    sys.path.insert(0, _GREETER)

from greeter_pb2 import Request  # noqa: E402

from kre_runner.context import ServiceNotConfigured  # noqa: E402
from kre_runner.services.mongo import DatabaseError  # noqa: E402


def init(ctx):
    enabled = set()
    for name in ("db", "measurement", "prediction"):
        try:
            getattr(ctx, name).save  # noqa: B018  # an unconfigured service raises on first use
            enabled.add(name)
        except ServiceNotConfigured as exc:
            ctx.logger.warning("services example: %s", exc)
    ctx.set("enabled", enabled)


async def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    enabled = ctx.get("enabled")
    started = time.perf_counter()
    visits = 0
    if "db" in enabled:
        try:
            earlier = await ctx.db.find("visits", {"name": request.name}, projection={"_id": 0, "at": 1})
            visits = len(earlier)
            await ctx.db.save("visits", {"name": request.name, "at": time.time()})
        except DatabaseError as exc:
            # The database is down or slow: this node chooses to carry on without the count.
            ctx.logger.warning("visit not recorded: %s", exc)
    if "prediction" in enabled:
        predicted = "long" if len(request.name) > 6 else "short"
        actual = "long" if len(request.name.encode()) > 6 else "short"
        try:
            await ctx.prediction.save(predicted_value=predicted, true_value=actual, extra={"name": request.name})
        except DatabaseError as exc:
            ctx.logger.warning("prediction not recorded: %s", exc)
    if "measurement" in enabled:
        ctx.measurement.save("visits", {"count": visits + 1, "db_ms": (time.perf_counter() - started) * 1000},
                             tags={"first": str(visits == 0).lower()})
    return request
