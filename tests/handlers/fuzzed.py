"""Every kind of handler outcome, chosen by the request name (tests/test_fuzz.py drives it at random).

``handler`` is sync (inline, or in threads with KRT_HANDLER_THREADS); ``handler_async`` the same as a
coroutine. An input whose payload is not a Request (random bytes that happen to parse) gets a value.
"""

from google.protobuf import descriptor_pb2
from greeter_pb2 import Request, Response

from kre_runner import Retry


def handler(ctx, data):
    request = Request()
    name = request.name if data.Unpack(request) else ""
    if name == "any":
        return data  # forwarded unchanged
    if name == "none":
        return None  # a filter: nothing published
    if name == "raise":
        raise ValueError("fuzzed failure")
    if name == "retry":
        raise Retry("fuzzed retry", delay=0)
    if name == "wrong":
        return {"greeting": name}  # not a protobuf message
    if name == "unserialisable":
        return descriptor_pb2.UninterpretedOption.NamePart()  # proto2: required fields unset
    return Response(greeting=f"ok {name}")


async def handler_async(ctx, data):
    return handler(ctx, data)
