"""Second node: decorates the greeting (an async handler, as one that awaits I/O would be)."""

from greeter_pb2 import Response


async def handler(ctx, data):
    response = Response()
    data.Unpack(response)
    return Response(greeting=f"✨ {response.greeting} ✨")
