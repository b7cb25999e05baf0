"""One handler per failure point between delivery and settlement, chosen by the request name.

``handler`` is sync (run inline, or in threads with KRT_HANDLER_THREADS); ``handler_async`` is the same
as a coroutine. ``CALLS`` records the names handled (for tests that run the node in-process).
"""

import os

from google.protobuf import descriptor_pb2
from greeter_pb2 import Request, Response

CALLS: list[str] = []


def _huge_text() -> str:
    return os.urandom(1_500_000).hex()  # 3 MB of hex: over 1 MiB even gzip-compressed


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    name = request.name
    CALLS.append(name)
    if name == "unserialisable":
        return descriptor_pb2.UninterpretedOption.NamePart()  # proto2: required fields unset
    if name == "raise":
        raise KeyError("threshold")
    if name == "raise-huge":
        raise ValueError(_huge_text())  # its error envelope would be too large whole
    if name == "too-large":
        return Response(greeting=_huge_text())
    if name == "early-too-large":
        try:
            ctx.early_reply(Response(greeting=_huge_text()))
        except Exception as exc:
            return Response(greeting=f"answered after {type(exc).__name__}")
        return Response(greeting="the early reply was sent")
    if name == "exit":
        ctx.early_exit()
        return Response(greeting="left early")
    return Response(greeting=f"ok {name}")


async def handler_async(ctx, data):
    return handler(ctx, data)
